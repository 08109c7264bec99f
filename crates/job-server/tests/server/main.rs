//! job-server tested through its HTTP face (raw reqwest, raw TCP and job-client) and its
//! in-process API, against the scripted executor in `common`.

mod cancellation;
mod common;
mod lifecycle;
mod protocol;
