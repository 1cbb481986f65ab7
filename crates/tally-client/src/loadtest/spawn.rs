//! `tally loadtest --spawn`: a temporary `tally serve` on 127.0.0.1:0 with its own data
//! directory, config and admin token, stopped (SIGTERM, then SIGKILL) when done.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the server may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd server may take to finish in-flight requests and flush.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The start of the line `tally serve` prints when it accepts connections.
const READY_PREFIX: &str = "tally listening on ";
/// Lines of the server's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// The plan for rate-limited mock agents, written into the spawned server's config.
#[derive(Debug, Clone)]
pub struct TightPlan {
    pub name: String,
    pub quota: u32,
    pub window_s: u64,
    pub burst: u32,
}

/// A running temporary server.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    pub url: String,
    pub token: String,
    log_path: PathBuf,
    // Dropped last: removes the data dir, config and log.
    _dir: tempfile::TempDir,
}

/// The `tally.toml` for a spawned server: the built-in `default` plan, the tight plan,
/// and a small sled cache (its 1 GiB default is too much next to a load generator).
pub fn config_toml(tight: &TightPlan) -> String {
    format!(
        "# Written by `tally loadtest --spawn`.\n\
         [engine]\n\
         sled_cache_bytes = 67108864\n\
         \n\
         [[plans]]\n\
         name = \"default\"\n\
         \n\
         [[plans]]\n\
         name = \"{name}\"\n\
         [[plans.buckets]]\n\
         name = \"default\"\n\
         quota = {quota}\n\
         window_s = {window_s}\n\
         burst = {burst}\n",
        name = tight.name,
        quota = tight.quota,
        window_s = tight.window_s,
        burst = tight.burst,
    )
}

impl Spawned {
    /// Starts `bin serve --listen 127.0.0.1:0 --data-dir <tmp> --config <file>` and waits
    /// for its ready line. With `config` the given file is used instead of a generated one.
    pub async fn start(
        bin: &Path,
        config: Option<&Path>,
        tight: &TightPlan,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tally-loadtest-")
            .tempdir()
            .context("creating a temporary directory")?;
        let config_path = match config {
            Some(path) => path.to_owned(),
            None => {
                let path = dir.path().join("tally.toml");
                std::fs::write(&path, config_toml(tight))
                    .with_context(|| format!("writing {}", path.display()))?;
                path
            }
        };
        let token = new_token();
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config_path)
            .env("TALLY_ADMIN_TOKEN_SHA256", sha256_hex(&token))
            .env("TALLY_LOG", "warn")
            .env_remove("TALLY_LISTEN")
            .env_remove("TALLY_DATA_DIR")
            .env_remove("TALLY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let stdout = child.stdout.take().context("server stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.trim().strip_prefix(READY_PREFIX) {
                    return Ok(Some(url.to_owned()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let url = match ready {
            Ok(Ok(Some(url))) => url,
            outcome => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                let why = match outcome {
                    Err(_) => format!("no ready line within {READY_TIMEOUT:?}"),
                    Ok(Err(e)) => format!("reading its stdout: {e}"),
                    _ => format!("it exited ({status:?}) without a ready line"),
                };
                anyhow::bail!(
                    "spawned tally did not start: {why}\n{}",
                    log_tail(&log_path)
                );
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            url,
            token,
            log_path,
            _dir: dir,
        })
    }

    /// SIGTERM, wait for a graceful exit, SIGKILL after [`STOP_TIMEOUT`].
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // A subprocess rather than libc::kill: the workspace forbids unsafe code.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => anyhow::bail!(
                "spawned tally exited with {status} after SIGTERM\n{}",
                log_tail(&self.log_path)
            ),
            Ok(Err(e)) => Err(e).context("waiting for the spawned tally"),
            Err(_) => {
                self.child
                    .kill()
                    .await
                    .context("killing the spawned tally")?;
                anyhow::bail!("spawned tally ignored SIGTERM for {STOP_TIMEOUT:?}; killed")
            }
        }
    }
}

/// 32 random bytes, hex.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("tlt_{}", hex::encode(bytes))
}

fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    format!(
        "server log ({}):\n{}",
        path.display(),
        lines[start..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let token = new_token();
        assert_eq!(token.len(), 4 + 64);
        assert_ne!(token, new_token());
    }

    #[test]
    fn config_names_both_plans() {
        let text = config_toml(&TightPlan {
            name: "tight".into(),
            quota: 5,
            window_s: 1,
            burst: 2,
        });
        assert!(text.contains("name = \"default\""));
        assert!(text.contains("name = \"tight\""));
        assert!(text.contains("quota = 5") && text.contains("burst = 2"));
    }
}
