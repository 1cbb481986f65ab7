//! `tally loadtest`: mock agents against a running tally (in progress).

/// Arguments of `tally loadtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// Base URL of a running tally (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8402")]
    pub url: String,
    /// Start a temporary `tally serve` on port 0 instead of using --url.
    #[arg(long)]
    pub spawn: bool,
}

/// Runs the load test; `Ok(false)` when an invariant failed.
pub async fn run(args: LoadtestArgs) -> anyhow::Result<bool> {
    let _ = args;
    anyhow::bail!("loadtest in progress")
}
