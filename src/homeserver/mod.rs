//! The embedded homeserver side of the push flow, for tests and demos: a room event goes
//! through the user's push rules, then to their pushers, then to a push gateway.
//!
//! Never on the gateway's hot path: nothing under `server/`, `dispatch` or `providers/` uses it.

pub mod pushrules;
