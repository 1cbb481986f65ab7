//! The built `tally` binary as a child process, for the tests that kill it: started on
//! 127.0.0.1:0 over a data dir, with the listening address read from its stdout.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Proc {
    pub child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// stdout lines before the listening line.
    pub preamble: Vec<String>,
}

impl Proc {
    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

/// A test that panics before it kills its server must not leave `tally serve` running
/// after the test binary exits (found: leftover servers from failed runs).
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `tally serve` over `dir`; with `admin_token`, that token (by its SHA-256) is the admin.
pub fn spawn(dir: &Path, admin_token: Option<&str>) -> Proc {
    spawn_with(dir, admin_token, &[])
}

/// [`spawn`] with more environment (`TALLY_STORAGE`, say). The child is killed and reaped
/// when the returned [`Proc`] drops, if the test did not do so itself.
#[allow(clippy::zombie_processes)]
pub fn spawn_with(dir: &Path, admin_token: Option<&str>, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.arg("serve")
        .env("TALLY_DATA_DIR", dir)
        .env("TALLY_LISTEN", "127.0.0.1:0")
        .env("TALLY_LOG", "warn")
        .env_remove("TALLY_CONFIG")
        .env_remove("TALLY_ADMIN_TOKEN_SHA256")
        .env_remove("TALLY_STORAGE")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(token) = admin_token {
        cmd.env(
            "TALLY_ADMIN_TOKEN_SHA256",
            tally_server::auth::token_sha256_hex(token),
        );
    }
    let mut child = cmd.spawn().expect("spawn tally");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut preamble = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        if let Some(addr) = line.strip_prefix("tally listening on ") {
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Proc {
                child,
                base: addr.to_owned(),
                preamble,
            };
        }
        preamble.push(line);
    }
    let _ = child.kill();
    let status = child.wait();
    panic!("tally exited before its listening line ({status:?}); stdout: {preamble:?}");
}
