//! tally-client: the agents' side of tally (in progress).

pub mod loadtest;
