//! Model references as the hive names them. The grammar (and its refusal of anything that
//! could name a path outside the hive's model directory) is the contract's, in
//! [`rbee_contract::model_ref`], so the queen refuses a malformed reference before it opens a
//! job; what a local path resolves to is the hive's own business (see the spawn admission).

pub(crate) use rbee_contract::model_ref::{HubRef, ModelRefError, ParsedModelRef as ModelRef};

/// Parses a reference as written on the wire.
pub(crate) fn parse(text: &str) -> Result<ModelRef, ModelRefError> {
    ModelRef::parse(text)
}
