//! in progress
#[derive(Debug)] pub struct SledStorage;
