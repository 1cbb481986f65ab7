//! in progress
#[derive(Debug)] pub struct EngineMetrics;
