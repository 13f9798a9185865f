//! Test support for the integration test binary: loopback fakes of the real
//! upstreams (APNs, FCM + Google OAuth2, a Web Push service, a UnifiedPush
//! distributor) speaking the real protocols, and the TLS material they need.
#![allow(dead_code)]

pub mod fake_apns;
pub mod fake_fcm;
pub mod fake_unifiedpush;
pub mod fake_webpush;
pub mod gateway;
pub mod matrix;
pub mod proxy;
pub mod redis;
pub mod server;
pub mod tls;
