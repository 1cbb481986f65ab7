//! tally-client: the agents' side of tally.
//!
//! An async client of tally's `/v1` HTTP API (see `crates/tally-server/API.md`) that
//! behaves the way a metered agent should:
//!
//! - **Denials are values.** [`Client::debit`], [`Client::hold`] and [`Client::check`]
//!   return [`Outcome::Approved`] or [`Outcome::Denied`] with a typed [`Denial`]:
//!   [`Denial::InsufficientFunds`] (402), [`Denial::RateLimited`] and
//!   [`Denial::MonthlyCapReached`] (429), [`Denial::Suspended`] (403). Anything else is an
//!   [`Error`] carrying the problem `type` and status.
//! - **A 402 is never retried**: the caller gets the denial after exactly one request and
//!   must top up (or give up) rather than loop.
//! - **`Retry-After` is honoured** (delta-seconds or HTTP-date) on 429 and 503; without it
//!   the client backs off exponentially with full jitter, up to a cap, within a bounded
//!   number of attempts and a total time budget ([`RetryPolicy`]). A monthly-cap 429 whose
//!   reset lies beyond the budget is returned at once.
//! - **One idempotency key per logical call**, reused by every retry, so retrying a 503 or
//!   a dropped connection can never charge twice. It is generated per call unless you give
//!   one (`Debit::new(..).idempotency_key(..)`), which you should when you may repeat the
//!   call later, e.g. after a top-up.
//! - **Batches** ([`Client::batch`], `POST /v1/batch`): many debits, holds, captures,
//!   ... in one request, each [`BatchItem`] with its own key and its own typed
//!   [`BatchAnswer`]; safe to send again whole, since every item replays by its key.
//! - Time goes through `tokio::time`, so tests can run it under `tokio::time::pause`.
//!
//! The crate also holds [`loadtest`], the engine of `tally loadtest`.
//!
//! # Example
//!
//! ```no_run
//! use tally_client::{Client, Credit, Debit, Denial, NewAgent, Outcome};
//!
//! # async fn demo() -> Result<(), tally_client::Error> {
//! let client = Client::builder("http://127.0.0.1:8402")
//!     .token(std::env::var("TALLY_TOKEN").unwrap_or_default())
//!     .build()?;
//! client.create_agent(&NewAgent::new("agent-1").plan("default")).await?;
//! client.credit("agent-1", &Credit::new(5_000_000)).await?;
//!
//! match client.debit("agent-1", &Debit::new(1_500).task_type("llm")).await? {
//!     Outcome::Approved(receipt) => println!("charged; journal seq {}", receipt.seq),
//!     Outcome::Denied(Denial::InsufficientFunds { required_micros, available_micros, .. }) => {
//!         println!("top up: need {required_micros}, have {available_micros}")
//!     }
//!     Outcome::Denied(other) => println!("not now: {other}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! `examples/quickstart.rs` is the same as a program: start a server with
//! `tally serve`, then `cargo run -p tally-client --example quickstart -- http://127.0.0.1:8402`
//! with `TALLY_TOKEN` set.

mod batch;
mod client;
mod error;
pub mod loadtest;
pub mod retry;
mod types;

pub use batch::{BatchAnswer, BatchItem, BatchOutcome};
pub use client::{Client, ClientBuilder, IDEMPOTENCY_KEY_LEN_MAX, JOURNAL_PAGE_LIMIT};
pub use error::{Denial, Error, Outcome, Problem, PROBLEM_TYPE_PREFIX};
pub use retry::RetryPolicy;
pub use types::{
    Agent, AgentPage, AgentPatch, BucketInfo, Capture, CategoryUsage, CheckResult, Credit, Debit,
    EventsPage, FeedEvent, Hold, JournalEntry, JournalPage, Metadata, NewAgent, OpenHold, PlanInfo,
    Plans, Priority, Receipt, Refund, TaskUsage, Usage,
};
