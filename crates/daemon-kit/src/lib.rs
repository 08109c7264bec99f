//! The pieces every rbee daemon needs in the same way, written once: bearer-token auth for
//! axum routes, duration and size parsing for flags, binding a port safely, heartbeats, logging
//! set-up, shutdown on signals and serving until a drain is done.
//!
//! It holds no daemon logic; anything specific to the queen, a hive or a worker lives in that
//! daemon's own crate.

mod auth;
mod duration;
mod heartbeat;
mod listen;
mod serve;
mod signals;
mod size;

pub use auth::{BearerAuth, constant_time_eq, require_bearer};
pub use duration::parse_duration;
pub use heartbeat::HeartbeatSender;
pub use listen::{ListenError, cluster_token_from_env, listen};
pub use serve::serve_until;
pub use signals::{cancel_on_signal, init_tracing};
pub use size::parse_size;
