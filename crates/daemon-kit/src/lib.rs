//! The pieces every rbee daemon needs in the same way, written once: bearer-token auth for
//! axum routes, duration parsing for flags, binding a port safely, heartbeats, logging set-up and shutdown
//! on signals.
//!
//! It holds no daemon logic; anything specific to the queen, a hive or a worker lives in that
//! daemon's own crate.

mod auth;
mod duration;
mod heartbeat;
mod listen;
mod signals;

pub use auth::{BearerAuth, constant_time_eq, require_bearer};
pub use duration::parse_duration;
pub use heartbeat::HeartbeatSender;
pub use listen::{ListenError, cluster_token_from_env, listen};
pub use signals::{cancel_on_signal, init_tracing};
