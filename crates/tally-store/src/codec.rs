//! in progress
#[derive(Debug, thiserror::Error)]
#[error("codec")]
pub struct CodecError;
