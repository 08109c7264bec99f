//! Helpers for rbee's end-to-end tests: build and start the real binaries as processes on
//! loopback ports, find the test models, read job streams as a client would.
//!
//! The tests themselves live in `tests/`. Nothing here fakes a component: a daemon under test
//! is always the real binary.

mod cluster;
mod daemon;
mod hive;
mod hub;
mod jobs;
mod keeper;
mod loopback;
mod models;
mod openai_cluster;
mod procfs;
mod proxy;
mod python;
mod queen;
mod receiver;
mod sse;
mod wait;

pub use cluster::{CLUSTER_TOKEN, TestCluster};
pub use daemon::{Daemon, bin_path, free_port};
pub use hive::{HiveHeartbeatReceiver, TestHive, fake_worker, scratch_dir};
pub use hub::{Fault, FileRequest, HUB_COMMIT, TestHub, TestHubBuilder};
pub use jobs::JobApi;
pub use keeper::{KeeperEnv, KeeperOutput, send_signal};
pub use loopback::serve_on_loopback;
pub use models::{long_context_model, slow_model, smollm2, tiny_model};
pub use openai_cluster::{OpenAiCluster, OpenAiHive, chunks, model_id, sse_data};
pub use procfs::{child_pids, process_gone};
pub use proxy::TcpProxy;
pub use python::{ScriptRun, run_openai_script};
pub use queen::{Recorded, Script, ScriptedUpstream};
pub use receiver::HeartbeatReceiver;
pub use sse::{RawStream, read_raw_stream, read_raw_stream_signalling};
pub use wait::eventually;
