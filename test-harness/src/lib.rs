//! Helpers for rbee's end-to-end tests: build and start the real binaries as processes on
//! loopback ports, find the test models, read job streams as a client would.
//!
//! The tests themselves live in `tests/`. Nothing here fakes a component: a daemon under test
//! is always the real binary.

mod daemon;
mod hive;
mod jobs;
mod keeper;
mod loopback;
mod models;
mod procfs;
mod queen;
mod receiver;
mod sse;

pub use daemon::{Daemon, bin_path, free_port};
pub use hive::{HiveHeartbeatReceiver, TestHive, fake_worker, scratch_dir};
pub use jobs::JobApi;
pub use keeper::{KeeperEnv, KeeperOutput, send_signal};
pub use loopback::serve_on_loopback;
pub use models::{smollm2, tiny_model};
pub use procfs::{child_pids, process_gone};
pub use queen::{Recorded, Script, ScriptedUpstream};
pub use receiver::HeartbeatReceiver;
pub use sse::{RawStream, read_raw_stream};
