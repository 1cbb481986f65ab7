//! in progress
pub trait Storage {} pub struct AgentWrite;
