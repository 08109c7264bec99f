//! The rbee job protocol, client side: submit an operation to any rbee daemon and follow
//! its job as a stream of typed [`JobEvent`](rbee_contract::JobEvent)s.
//!
//! The stream holds the protocol's promises for its reader: it yields events up to and
//! including exactly one terminal event and ends after the server's `[DONE]`; a stream that
//! breaks off is resumed with `Last-Event-ID` a bounded number of times and otherwise ends
//! with an error, never silently. Dropping the stream closes the connection, which cancels
//! the job on the server (unless the job was created with `cancel_on_disconnect=false`).
//!
//! It is not a server (`job-server` is) and does not interpret events: relaying or printing
//! them is the caller's business.

mod client;
mod error;
mod events;

pub use client::{JobClient, JobHandle};
pub use error::ClientError;
pub use events::JobEventStream;
