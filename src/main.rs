//! The `herald` command line: parse flags, load and check the config (binding nothing), set up
//! logging, then serve, check the config, or send one test push.
//!
//! Exit codes: 0 success; 64 (EX_USAGE) bad configuration; 1 runtime failure; `send` exits 2
//! when the provider rejected the pushkey.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use herald::config::{Config, LogFormat};
use herald::dispatch::{DeviceResult, Dispatcher};
use herald::notification::{Counts, Device, Notification};
use herald::providers::BuildError;
use herald::{App, metrics::Metrics};
use serde_json::json;

const EX_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "herald", version, about = "A Matrix push gateway: APNs, FCM HTTP v1 and more")]
struct Cli {
    /// Path to gateway.yaml.
    #[arg(long, global = true, env = "HERALD_CONFIG", default_value = "gateway.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve {
        /// Listen here instead of the config's `listen` (repeatable).
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// Serve /metrics, /health and /ready here instead of the config's `admin_listen`.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Validate the config (files readable, keys parse, providers build) and exit 0, or 64 with
    /// the reason.
    CheckConfig,
    /// Send one test push through a configured app and print the provider's answer.
    Send {
        /// The app id, as a device would send it.
        #[arg(long)]
        app_id: String,
        /// The device's pushkey (e.g. the base64 APNs token, or the FCM registration token).
        #[arg(long)]
        pushkey: String,
        /// Message text.
        #[arg(long, default_value = "Test notification from herald")]
        body: String,
        /// Send the event_id_only format instead of a full notification.
        #[arg(long)]
        event_id_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald: configuration error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve { listen: Vec::new(), admin_listen: None });
    if let Command::Serve { listen, admin_listen } = &command {
        let listen = if listen.is_empty() { config.listen.clone() } else { listen.clone() };
        let admin = admin_listen.or(config.admin_listen);
        config.set_listen(listen, admin);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Providers (TLS identities, trust roots, service accounts) are built before anything is
    // bound, by `App::build` for `serve` and here for the other commands; a `BuildError` is a
    // configuration error (exit 64) for every command, `check-config` included.
    let build = || runtime.block_on(async { Dispatcher::new(&config, Arc::new(Metrics::new())) });
    let result = match command {
        Command::CheckConfig => build()
            .map(|_| {
                println!("{}: OK ({} apps)", cli.config.display(), config.apps.len());
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::Send { app_id, pushkey, body, event_id_only } => match build() {
            Err(e) => Err(e.into()),
            Ok(dispatcher) => {
                init_tracing(&config);
                runtime.block_on(send(
                    &dispatcher,
                    config.request_deadline,
                    app_id,
                    pushkey,
                    body,
                    event_id_only,
                ))
            }
        },
        Command::Serve { .. } => {
            init_tracing(&config);
            runtime.block_on(serve(config)).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<BuildError>().is_some() => {
            eprintln!("herald: configuration error: {e}");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    app.run(shutdown_signal()).await
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
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn send(
    dispatcher: &Dispatcher,
    request_deadline: Duration,
    app_id: String,
    pushkey: String,
    body: String,
    event_id_only: bool,
) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + request_deadline;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
    let data = event_id_only
        .then(|| json!({ "format": "event_id_only" }).as_object().cloned().unwrap_or_default());
    let notification = Notification {
        event_id: Some(format!("$herald-test-{now}")),
        room_id: Some("!herald-test:localhost".into()),
        event_type: (!event_id_only).then(|| "m.room.message".into()),
        sender: (!event_id_only).then(|| "@herald:localhost".into()),
        sender_display_name: (!event_id_only).then(|| "herald".into()),
        room_name: (!event_id_only).then(|| "herald test".into()),
        content: (!event_id_only).then(|| {
            json!({ "msgtype": "m.text", "body": body }).as_object().cloned().unwrap_or_default()
        }),
        counts: Counts { unread: Some(1), missed_calls: None },
        devices: vec![Device { app_id, pushkey, data, tweaks: None }],
        ..Notification::default()
    };
    let summary = dispatcher.dispatch(&notification, deadline).await;
    Ok(match summary.results.into_iter().next().map(|(_, r)| r) {
        Some(DeviceResult::Delivered) => {
            println!("delivered");
            ExitCode::SUCCESS
        }
        Some(DeviceResult::Rejected(why)) => {
            println!("rejected: {why}");
            ExitCode::from(2)
        }
        Some(DeviceResult::Failed(why)) => {
            println!("failed: {why}");
            ExitCode::FAILURE
        }
        None => ExitCode::FAILURE,
    })
}
