//! herald, a Matrix push gateway.
//!
//! A homeserver POSTs `/_matrix/push/v1/notify`; herald answers with the pushkeys providers
//! rejected. The request flows:
//!
//! ```text
//! server::notify      read the body (bounded in size and time), parse it (notification)
//!   → dispatch        every device concurrently: app lookup, provider.prepare
//!     → dedup         (event_id, app_id, pushkey) already final? answer from cache
//!       → providers   one attempt at a time, retried with backoff inside the deadline
//!   ← 200 {"rejected": […]} when every device is delivered or rejected, else 502
//! ```
//!
//! [`App`] wires it together from a [`Config`]; `main.rs` is only the CLI.

pub mod app;
pub mod config;
pub mod dedup;
pub mod demo;
pub mod dispatch;
pub mod homeserver;
pub mod metrics;
pub mod notification;
pub mod providers;
pub mod server;

pub use app::App;
pub use config::Config;
