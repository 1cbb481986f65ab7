//! A metered agent in a few lines: create an agent, top it up, debit until the money runs
//! out, and react to the typed denial instead of looping.
//!
//! ```text
//! tally serve                      # prints an admin token once
//! TALLY_TOKEN=<token> cargo run -p tally-client --example quickstart -- http://127.0.0.1:8402
//! ```

use tally_client::{Client, Credit, Debit, Denial, NewAgent, Outcome};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8402".to_owned());
    let token = std::env::var("TALLY_TOKEN").unwrap_or_default();
    let client = Client::builder(url).token(token).build()?;

    let agent_id = format!("quickstart-{}", &Client::new_idempotency_key()[..8]);
    client
        .create_agent(&NewAgent::new(&agent_id).plan("default"))
        .await?;
    client.credit(&agent_id, &Credit::new(5_000)).await?;

    for call in 1.. {
        // One key per logical call; retries of this call (503, dropped connection) reuse it.
        let debit = Debit::new(1_500).task_type("llm");
        match client.debit(&agent_id, &debit).await? {
            Outcome::Approved(receipt) => println!(
                "call {call}: charged {} micros, balance {} (journal seq {})",
                receipt.amount_micros, receipt.balance_micros, receipt.seq
            ),
            Outcome::Denied(Denial::InsufficientFunds {
                required_micros,
                available_micros,
                top_up,
                ..
            }) => {
                println!(
                    "call {call}: 402, need {required_micros} micros, have {available_micros}; \
                     top up at {}",
                    top_up.unwrap_or_default()
                );
                break;
            }
            Outcome::Denied(other) => {
                println!("call {call}: denied: {other}");
                break;
            }
        }
    }
    let journal = client.journal_all(&agent_id).await?;
    println!("journal of {agent_id}: {} entries", journal.len());
    Ok(())
}
