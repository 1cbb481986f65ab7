//! The `tally` binary: `tally serve` runs the HTTP service, `tally loadtest` drives one,
//! `tally export` pushes its change feed to an ingest URL as CloudEvents, `tally
//! token-hash` prints the SHA-256 a config file wants for a token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tally_server::auth::{bootstrap_admin, token_sha256_hex, Role};
use tally_server::config::StorageConfig;
use tally_server::Config;
use tally_store::SystemClock;

/// mimalloc instead of the system allocator: the engine allocates small objects on many
/// threads, where glibc's malloc measured about 20 % slower (benches/durable_debits).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Usage metering and quota ledger")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Drive a running tally with mock agents and check its invariants.
    Loadtest(tally_client::loadtest::LoadtestArgs),
    /// Push the change feed to an ingest URL as CloudEvents batches, at least once,
    /// resuming from a cursor file.
    Export(tally_server::export::ExportArgs),
    /// Print the SHA-256 (hex) of a token read from stdin, for `[[auth.tokens]]`.
    TokenHash,
    /// Standard Webhooks helpers for receivers of tally's threshold webhooks.
    #[command(subcommand)]
    Webhooks(WebhooksCmd),
    /// A no-op HTTP server with the same set-up, for the wrk comparison.
    #[command(hide = true)]
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCmd {
    /// Check a received webhook: its body on stdin, its headers as flags. Prints `valid`
    /// and exits 0, or says why not and exits 1.
    Verify {
        /// The endpoint's `whsec_…` secret.
        #[arg(long, env = "TALLY_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// The `webhook-id` header.
        #[arg(long)]
        id: String,
        /// The `webhook-timestamp` header.
        #[arg(long)]
        timestamp: String,
        /// The `webhook-signature` header.
        #[arg(long)]
        signature: String,
        /// How far (seconds) the timestamp may be from now.
        #[arg(long, default_value_t = tally_server::webhooks::SIGNATURE_TOLERANCE_S)]
        tolerance_s: i64,
    },
}

fn webhooks(cmd: WebhooksCmd) -> anyhow::Result<bool> {
    use std::io::Read as _;
    use tally_server::webhooks::{verify, Secret};
    let WebhooksCmd::Verify {
        secret,
        id,
        timestamp,
        signature,
        tolerance_s,
    } = cmd;
    let secret = Secret::parse(&secret).map_err(|e| anyhow::anyhow!("--secret: {e}"))?;
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    let now_s = chrono::Utc::now().timestamp();
    match verify(
        &secret,
        &id,
        &timestamp,
        &body,
        &signature,
        now_s,
        tolerance_s,
    ) {
        Ok(()) => {
            println!("valid");
            Ok(true)
        }
        Err(e) => {
            eprintln!("invalid: {e}");
            Ok(false)
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Config file (tally.toml); without one, built-in defaults.
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `server.listen`).
    #[arg(long, env = "TALLY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (overrides `server.data_dir`).
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log filter (overrides `server.log`), e.g. `info` or `tally=debug`.
    #[arg(long, env = "TALLY_LOG")]
    log: Option<String>,
    /// Where the ledger lives (overrides `storage.url`): `sled` (in the data directory)
    /// or `redis://host:port[,host:port...]`, a Redis Cluster shared by any number of nodes.
    #[arg(long, env = "TALLY_STORAGE")]
    storage: Option<String>,
    /// SHA-256 (hex) of an extra admin token.
    #[arg(long, env = "TALLY_ADMIN_TOKEN_SHA256", hide_env_values = true)]
    admin_token_sha256: Option<String>,
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tally_store::disable_transparent_huge_pages();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(log) = args.log {
        config.log = log;
    }
    if let Some(url) = &args.storage {
        let (wait_replicas, wait_timeout_ms, op_timeout_ms) = match &config.storage {
            StorageConfig::Redis {
                wait_replicas,
                wait_timeout_ms,
                op_timeout_ms,
                ..
            } => (*wait_replicas, *wait_timeout_ms, *op_timeout_ms),
            StorageConfig::Sled => (
                0,
                tally_store::REDIS_WAIT_TIMEOUT_MS_DEFAULT,
                tally_store::REDIS_OP_TIMEOUT_MS_DEFAULT,
            ),
        };
        config.storage = StorageConfig::parse(url, wait_replicas, wait_timeout_ms, op_timeout_ms)
            .map_err(|e| anyhow::anyhow!("--storage: {e}"))?;
    }
    if let Some(hash) = &args.admin_token_sha256 {
        config
            .add_admin_hash("env-admin", hash)
            .map_err(|e| anyhow::anyhow!("TALLY_ADMIN_TOKEN_SHA256: {e}"))?;
    }
    init_logging(&config.log);

    let has_admin = config.tokens.iter().any(|t| t.role == Role::Admin);
    let boot = bootstrap_admin(&config.data_dir, !has_admin)
        .with_context(|| format!("admin token file in {}", config.data_dir.display()))?;
    let mut new_token = None;
    if let Some(b) = boot {
        new_token = b.new_token.clone();
        config.tokens.push(b.hash);
    }

    let mut running = tally_server::start(config, Arc::new(SystemClock)).await?;
    let handle_addr = running.addr;
    let proxy_addr = running.proxy_addr;
    tokio::select! {
        ready = running.ready() => ready?,
        _ = shutdown_signal() => {
            running.shutdown().await?;
            return Ok(());
        }
    }
    {
        let mut out = std::io::stdout().lock();
        if let Some(token) = new_token {
            writeln!(out, "tally admin token (shown once, keep it): {token}")?;
        }
        writeln!(out, "tally listening on http://{handle_addr}")?;
        if let Some(p) = proxy_addr {
            writeln!(out, "tally proxy listening on http://{p}")?;
        }
        out.flush()?;
    }
    shutdown_signal().await;
    tracing::info!("signal received; shutting down");
    running.shutdown().await
}

async fn noop_server(listen: SocketAddr) -> anyhow::Result<()> {
    init_logging("warn");
    tally_server::noop::serve(
        listen,
        |addr| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "tally listening on http://{addr}");
            let _ = out.flush();
        },
        shutdown_signal(),
    )
    .await
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(args) => serve(args).await.map(|()| true),
        Cmd::Loadtest(args) => tally_client::loadtest::run(args).await,
        Cmd::Export(args) => tally_server::export::run(args, shutdown_signal())
            .await
            .map(|()| true),
        Cmd::TokenHash => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(anyhow::Error::from)
                .map(|_| {
                    println!("{}", token_sha256_hex(token.trim_end_matches(['\n', '\r'])));
                    true
                })
        }
        Cmd::Webhooks(cmd) => webhooks(cmd),
        Cmd::NoopServer { listen } => noop_server(listen).await.map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tally: {e:#}");
            ExitCode::from(2)
        }
    }
}
