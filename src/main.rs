//! The `herald` command line: parse flags, load and check the config (binding nothing), set up
//! logging, then serve, check the config, or send one test push. `push-rules evaluate` needs no
//! config: it runs the push-rule engine on files and prints the verdict.
//!
//! Exit codes: 0 success; 64 (EX_USAGE) bad configuration or unusable input files; 1 runtime
//! failure; `send` exits 2 when the provider rejected the pushkey.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use herald::config::{Config, LogFormat};
use herald::dispatch::{DeviceResult, Dispatcher};
use herald::homeserver::pushrules::{
    CompiledRuleset, DisplayName, Evaluation, FlatEvent, PowerLevels, PushRulesContent, RoomCtx,
    Ruleset,
};
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
        /// The pusher's `data` object as JSON, e.g. a WebPush subscription's
        /// '{"endpoint":"https://…","auth":"…"}'.
        #[arg(long, value_parser = parse_data)]
        data: Option<serde_json::Map<String, serde_json::Value>>,
    },
    /// Work with Matrix push rules (no config needed).
    #[command(subcommand)]
    PushRules(PushRulesCommand),
    /// Run the embedded homeserver (client-server API subset on SQLite) for tests and demos.
    Homeserver(HomeserverArgs),
    /// Play the whole push flow in one process and narrate it: homeserver, gateway, and fake
    /// APNs and FCM, all on 127.0.0.1 (no config, no credentials, no network).
    Demo {
        /// Plain output even on a terminal (also: the NO_COLOR environment variable).
        #[arg(long)]
        no_color: bool,
    },
}

#[derive(clap::Args)]
struct HomeserverArgs {
    /// Serve the client-server API here.
    #[arg(long, default_value = "127.0.0.1:8008")]
    bind: SocketAddr,
    /// The server part of user and room ids.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The SQLite database file (created if missing).
    #[arg(long, default_value = "herald-homeserver.db")]
    db: PathBuf,
    /// Accept http:// pusher URLs on loopback hosts (tests and demos only).
    #[arg(long)]
    allow_insecure_pushers: bool,
}

#[derive(Subcommand)]
enum PushRulesCommand {
    /// Would this event notify this user, and why? Prints the first matching rule as JSON:
    /// {"rule_id", "actions", "notify", "tweaks"} (rule_id and actions are null when no rule
    /// matches).
    Evaluate(EvaluateArgs),
}

#[derive(clap::Args)]
struct EvaluateArgs {
    /// The event, as JSON (`type`, `sender`, `room_id`, `content`, …).
    #[arg(long, value_name = "EVENT.json")]
    event: PathBuf,
    /// The user who would be notified: a full Matrix ID such as @alice:example.org.
    #[arg(long)]
    user_id: String,
    /// The user's `m.push_rules` content ({"global": {...}}). Rules whose id starts with `.`
    /// change the `enabled`/`actions` of that server-default rule; others are the user's own.
    /// Without it, only the server-default rules apply.
    #[arg(long, value_name = "RULES.json")]
    rules: Option<PathBuf>,
    /// The user's display name in the room (for `contains_display_name`).
    #[arg(long)]
    display_name: Option<String>,
    /// The number of joined members (for `room_member_count`; without it those never match).
    #[arg(long)]
    member_count: Option<u64>,
    /// The room's `m.room.power_levels` content, or the whole event (for
    /// `sender_notification_permission`; without it, and without --sender-power-level, those
    /// never match).
    #[arg(long, value_name = "PL.json")]
    power_levels: Option<PathBuf>,
    /// The sender's power level, overriding what --power-levels says.
    #[arg(long, allow_hyphen_values = true)]
    sender_power_level: Option<i64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that need no gateway config run here; the rest continue as a `GatewayCommand`.
    let command = match cli
        .command
        .unwrap_or(Command::Serve { listen: Vec::new(), admin_listen: None })
    {
        Command::PushRules(PushRulesCommand::Evaluate(args)) => {
            return match evaluate_push_rules(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald: {e:#}");
                    ExitCode::from(EX_CONFIG)
                }
            };
        }
        Command::Homeserver(args) => return run_homeserver(&args),
        Command::Demo { no_color } => return run_demo(no_color),
        Command::Serve { listen, admin_listen } => GatewayCommand::Serve { listen, admin_listen },
        Command::CheckConfig => GatewayCommand::CheckConfig,
        Command::Send { app_id, pushkey, body, event_id_only, data } => {
            GatewayCommand::Send { app_id, pushkey, body, event_id_only, data }
        }
    };
    let mut config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald: configuration error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let GatewayCommand::Serve { listen, admin_listen } = &command {
        let listen = if listen.is_empty() { config.listen.clone() } else { listen.clone() };
        let admin = admin_listen.or(config.admin_listen);
        config.set_listen(listen, admin);
    }
    let runtime = match new_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Providers (TLS identities, trust roots, service accounts) are built before anything is
    // bound, by `App::build` for `serve` and here for the other commands; a `BuildError` is a
    // configuration error (exit 64) for every command, `check-config` included.
    let build = || runtime.block_on(async { Dispatcher::new(&config, Arc::new(Metrics::new())) });
    let result = match command {
        GatewayCommand::CheckConfig => build()
            .map(|_| {
                println!("{}: OK ({} apps)", cli.config.display(), config.apps.len());
                for app in &config.apps {
                    if let Some(key) = app.vapid_public_key() {
                        println!("apps.{}: VAPID public key {key}", app.pattern);
                    }
                }
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        GatewayCommand::Send { app_id, pushkey, body, event_id_only, data } => match build() {
            Err(e) => Err(e.into()),
            Ok(dispatcher) => {
                init_tracing(&config);
                let device = device(app_id, pushkey, data, event_id_only);
                runtime.block_on(send(&dispatcher, config.request_deadline, device, body))
            }
        },
        GatewayCommand::Serve { .. } => {
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

/// The commands that run on the gateway config.
enum GatewayCommand {
    Serve {
        listen: Vec<SocketAddr>,
        admin_listen: Option<SocketAddr>,
    },
    CheckConfig,
    Send {
        app_id: String,
        pushkey: String,
        body: String,
        event_id_only: bool,
        data: Option<serde_json::Map<String, serde_json::Value>>,
    },
}

/// `herald demo`: exit 0 when every expected push arrived, else 1 with the step named.
fn run_demo(no_color: bool) -> ExitCode {
    use herald::demo::{ColorChoice, Options};
    let color = if no_color { ColorChoice::Never } else { ColorChoice::Auto };
    let runtime = match new_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(herald::demo::run(Options { color })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `herald push-rules evaluate`: every input problem is an error naming the file.
fn evaluate_push_rules(args: &EvaluateArgs) -> anyhow::Result<()> {
    use anyhow::{Context as _, bail};

    fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<T> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de)
            .with_context(|| format!("{} is not valid", path.display()))
    }

    let user_id = args.user_id.as_str();
    if !user_id.starts_with('@') || !user_id.contains(':') {
        bail!("--user-id must be a full Matrix user ID such as @alice:example.org");
    }
    let event: serde_json::Value = read_json(&args.event)?;
    if !event.is_object() {
        bail!("{} must hold a JSON object (an event)", args.event.display());
    }
    let user_rules = match &args.rules {
        Some(path) => read_json::<PushRulesContent>(path)?.global,
        None => Ruleset::default(),
    };
    let (ruleset, ignored) = Ruleset::for_user(user_id, &user_rules);
    for id in ignored {
        eprintln!("herald: warning: `{id}` is not a server-default rule of its kind; ignored");
    }
    let mut levels = match &args.power_levels {
        Some(path) => {
            let pl: serde_json::Value = read_json(path)?;
            // Accept the whole state event as well as its content.
            let content = match pl.get("type").and_then(|t| t.as_str()) {
                Some("m.room.power_levels") => pl.get("content").cloned().unwrap_or_default(),
                _ => pl,
            };
            if !content.is_object() {
                bail!("{} must hold a JSON object (power levels)", path.display());
            }
            Some(PowerLevels::from_content(&content))
        }
        None => None,
    };
    if let Some(level) = args.sender_power_level {
        let sender = event.get("sender").and_then(|s| s.as_str()).unwrap_or_default();
        levels.get_or_insert_with(PowerLevels::default).users.insert(sender.to_owned(), level);
    }
    let name = args.display_name.as_deref().map(DisplayName::new);
    let room = RoomCtx {
        member_count: args.member_count,
        display_name: name.as_ref(),
        power_levels: levels.as_ref(),
    };
    let compiled = CompiledRuleset::compile(&ruleset, user_id);
    let flat = FlatEvent::new(&event);
    if flat.sender() == Some(user_id) {
        eprintln!("herald: note: {user_id} sent this event; a user's own events never notify");
    }
    let evaluation = Evaluation::from(compiled.evaluate(&flat, &room));
    let out = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        serde_json::to_string_pretty(&evaluation)?
    } else {
        serde_json::to_string(&evaluation)?
    };
    println!("{out}");
    Ok(())
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

/// `herald homeserver`: opens the database, binds, and serves until SIGTERM/ctrl-c. Exit 64 when
/// the database cannot be opened or the address cannot be bound.
fn run_homeserver(args: &HomeserverArgs) -> ExitCode {
    use herald::homeserver::{Homeserver, HomeserverConfig};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match new_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let mut config = HomeserverConfig::new(&args.server_name, &args.db);
        config.allow_insecure_pushers = args.allow_insecure_pushers;
        let hs = match Homeserver::open(config) {
            Ok(hs) => hs,
            Err(e) => {
                eprintln!("herald: {e:#}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        let listener = match tokio::net::TcpListener::bind(args.bind).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("herald: cannot bind {}: {e}", args.bind);
                return ExitCode::from(EX_CONFIG);
            }
        };
        let addr = listener.local_addr().map_or(args.bind, |a| a);
        tracing::info!(%addr, server_name = %args.server_name, db = %args.db.display(), "homeserver listening");
        // Tests and scripts read the bound address (the port may be 0) from this line.
        println!("listening on http://{addr}");
        match hs.serve(listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("herald: homeserver failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
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

/// `--data`: a JSON object.
fn parse_data(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The device `herald send` pushes to; `--event-id-only` sets `data.format`.
fn device(
    app_id: String,
    pushkey: String,
    data: Option<serde_json::Map<String, serde_json::Value>>,
    event_id_only: bool,
) -> Device {
    let mut data = data.unwrap_or_default();
    if event_id_only {
        data.insert("format".into(), "event_id_only".into());
    }
    Device { app_id, pushkey, data: (!data.is_empty()).then_some(data), tweaks: None }
}

async fn send(
    dispatcher: &Dispatcher,
    request_deadline: Duration,
    device: Device,
    body: String,
) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + request_deadline;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
    let event_id_only = device.event_id_only();
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
        devices: vec![device],
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

/// The async runtime every command runs on. With one CPU to use (a `taskset`, or a container's
/// CPU quota, both of which `available_parallelism` reads) it is tokio's current-thread
/// scheduler: no worker thread beside the main one, no cross-thread wake-ups or work-stealing
/// atomics, and tasks run in the order they were woken, so the pushes that several requests
/// queue on one upstream connection leave together. With more CPUs, or when
/// `TOKIO_WORKER_THREADS` is set, it is the multi-threaded scheduler. Blocking work
/// (`spawn_blocking`) has its own threads either way.
fn new_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let built = if cpus == 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Runtime::new()
    };
    built.map_err(|e| {
        eprintln!("herald: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}
