//! x402 settlements in flight, kept on disk (`<data_dir>/x402-pending/`) from just before
//! `/settle` is sent until the journal has what it decided: the payment's credit and the
//! call's debit, or the record of a served call left unpaid. A crash in between (the
//! facilitator settled, the credit was not yet written) would otherwise lose a payer's
//! money without a trace; the next start finds the file and finishes the settlement (see
//! `payments::recover`). Each file is written to a temporary name, fsynced, renamed and
//! the directory fsynced, so a file that exists is whole.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tally_core::Command;

/// The directory under the data directory.
pub const PENDING_DIR: &str = "x402-pending";
/// Where settlements that could not be confirmed after a restart are set aside for an
/// operator (never deleted by tally).
pub const UNRESOLVED_DIR: &str = "unresolved";
/// Most settlements in flight at once; past it a payment is refused (503) before any
/// money moves.
pub const PENDING_FILES_MAX: usize = 10_000;
/// A pending file larger than this is not read (set aside as unreadable).
pub const PENDING_FILE_BYTES_MAX: u64 = 256 * 1024;

/// One settlement: what `/settle` is sent, and the journal entries that follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settlement {
    /// The payment's identity (`x402:<network>:<nonce>`), the credit's idempotency key.
    pub payment_id: String,
    /// The `PaymentPayload` as the client sent it.
    pub payload: Value,
    /// The `paymentRequirements` `/settle` is sent with.
    pub requirements: Value,
    /// The payment credited to the payer, keyed by the payment's identity.
    pub credit: Command,
    /// A call's debit (keyed `<identity>:call`); none for a top-up or a call that cost 0.
    pub debit: Option<Command>,
    /// For a call the upstream already served: the `payment_unsettled` record written
    /// when the settlement fails (keyed `<identity>:unsettled`).
    pub unsettled: Option<Command>,
    /// Whether the credit's metadata gets the settlement's `x402_transaction` (a call's;
    /// a top-up's credit stays as asked, so a retry replays its receipt).
    pub credit_transaction: bool,
}

/// Why a settlement could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{0} x402 settlements are already in flight")]
    Full(usize),
    #[error("the settlement could not be written to disk: {0}")]
    Io(#[from] io::Error),
}

/// The pending settlements' directory.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
    files_max: usize,
}

impl Outbox {
    /// Opens (and makes) `<data_dir>/x402-pending`.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        Self::open_with(data_dir, PENDING_FILES_MAX)
    }

    /// With another limit of settlements in flight.
    pub fn open_with(data_dir: &Path, files_max: usize) -> io::Result<Self> {
        let dir = data_dir.join(PENDING_DIR);
        fs::create_dir_all(dir.join(UNRESOLVED_DIR))?;
        Ok(Self { dir, files_max })
    }

    fn path(&self, payment_id: &str) -> PathBuf {
        // The identity has characters a file name should not; its hash has none.
        let name = hex::encode(Sha256::digest(payment_id.as_bytes()));
        self.dir.join(format!("{name}.json"))
    }

    /// The settlements in flight (files in the directory, not counting set-aside ones).
    pub fn len(&self) -> usize {
        self.files().map_or(0, |f| f.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn files(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Records `s` durably before its `/settle` is sent.
    pub fn put(&self, s: &Settlement) -> Result<(), OutboxError> {
        let path = self.path(&s.payment_id);
        if !path.exists() && self.len() >= self.files_max {
            return Err(OutboxError::Full(self.files_max));
        }
        let bytes = serde_json::to_vec(s).map_err(io::Error::other)?;
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(sync_dir(&self.dir)?)
    }

    /// Forgets a settlement whose outcome is in the journal. A removal lost to a power
    /// failure only makes the next start look again: it finds the credit journaled.
    pub fn remove(&self, payment_id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(payment_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Moves a settlement tally could not confirm to `unresolved/`, for an operator.
    pub fn set_aside(&self, payment_id: &str) -> io::Result<PathBuf> {
        self.set_aside_path(&self.path(payment_id))
    }

    fn set_aside_path(&self, path: &Path) -> io::Result<PathBuf> {
        let name = path.file_name().unwrap_or_default();
        let to = self.dir.join(UNRESOLVED_DIR).join(name);
        fs::rename(path, &to)?;
        sync_dir(&self.dir)?;
        Ok(to)
    }

    /// Every settlement in flight. A file that cannot be read or parsed is set aside
    /// (and logged), never deleted.
    pub fn pending(&self) -> io::Result<Vec<Settlement>> {
        let mut out = Vec::new();
        for path in self.files()? {
            match read(&path) {
                Ok(s) => out.push(s),
                Err(e) => {
                    let to = self.set_aside_path(&path);
                    tracing::error!(file = %path.display(), error = %e, moved_to = ?to, "an x402 settlement file could not be read and was set aside");
                }
            }
        }
        Ok(out)
    }
}

fn read(path: &Path) -> io::Result<Settlement> {
    let len = fs::metadata(path)?.len();
    if len > PENDING_FILE_BYTES_MAX {
        return Err(io::Error::other(format!(
            "{len} bytes, more than {PENDING_FILE_BYTES_MAX}"
        )));
    }
    serde_json::from_slice(&fs::read(path)?).map_err(io::Error::other)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{AgentId, CommandKind};

    fn settlement(id: &str) -> Settlement {
        let agent = AgentId::new("x402:eip155:1:0xabc").expect("id");
        Settlement {
            payment_id: id.into(),
            payload: serde_json::json!({"x402Version": 2}),
            requirements: serde_json::json!({"amount": "5"}),
            credit: Command::new(agent.clone(), CommandKind::Credit { amount_micros: 5 }),
            debit: Some(Command::new(agent, CommandKind::Debit { amount_micros: 5 })),
            unsettled: None,
            credit_transaction: true,
        }
    }

    #[test]
    fn a_settlement_is_kept_until_removed_and_read_back_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let outbox = Outbox::open(dir.path()).expect("opens");
        assert!(outbox.is_empty());
        outbox.put(&settlement("x402:eip155:1:0x01")).expect("put");
        outbox.put(&settlement("x402:eip155:1:0x02")).expect("put");
        outbox
            .put(&settlement("x402:eip155:1:0x01"))
            .expect("the same payment again replaces it");
        let again = Outbox::open(dir.path()).expect("reopens");
        let mut ids: Vec<String> = again
            .pending()
            .expect("reads")
            .into_iter()
            .map(|s| s.payment_id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["x402:eip155:1:0x01", "x402:eip155:1:0x02"]);
        assert_eq!(
            again.pending().expect("reads")[0].debit,
            settlement("x").debit
        );
        again.remove("x402:eip155:1:0x01").expect("removes");
        again.remove("x402:eip155:1:0x01").expect("twice is fine");
        let to = again.set_aside("x402:eip155:1:0x02").expect("sets aside");
        assert!(to.exists(), "kept for an operator");
        assert!(again.is_empty());
    }

    #[test]
    fn past_the_limit_a_new_settlement_is_refused_and_a_known_one_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let outbox = Outbox::open_with(dir.path(), 2).expect("opens");
        outbox.put(&settlement("a")).expect("1");
        outbox.put(&settlement("b")).expect("2");
        assert!(matches!(
            outbox.put(&settlement("c")),
            Err(OutboxError::Full(2))
        ));
        outbox.put(&settlement("b")).expect("the same one again");
        outbox.remove("a").expect("removes");
        outbox.put(&settlement("c")).expect("room again");
    }

    #[test]
    fn an_unreadable_file_is_set_aside_not_deleted() {
        let dir = tempfile::tempdir().expect("tmp");
        let outbox = Outbox::open(dir.path()).expect("opens");
        let bad = dir.path().join(PENDING_DIR).join("bad.json");
        fs::write(&bad, b"{not json").expect("writes");
        outbox.put(&settlement("x402:eip155:1:0x03")).expect("put");
        let pending = outbox.pending().expect("reads");
        assert_eq!(pending.len(), 1);
        assert!(!bad.exists());
        assert!(dir
            .path()
            .join(PENDING_DIR)
            .join(UNRESOLVED_DIR)
            .join("bad.json")
            .exists());
    }
}
