//! Loopback load test of the `herald` daemon: `cargo bench --bench loadtest -- [options]`.
//!
//! One run starts a fake APNs + FCM upstream (TLS, in this process; its FCM listener also
//! answers WebPush and UnifiedPush endpoints with 201), starts the release
//! `herald` binary with a generated `gateway.yaml` aimed at it, drives N keep-alive HTTP/1.1
//! connections at `/notify` for T seconds per body variant, and reports requests/s, latency
//! percentiles, herald's peak RSS and CPU-seconds per 1,000 requests. Then it runs the same load
//! against a bare hyper server (this binary re-executed with `--serve-bare`) and prints the
//! ratio, and marks each target of the issue met or missed. `--soak SECS` instead sends unique
//! event ids at a fixed `--rate` and prints herald's RSS every 10 s.
//!
//! When `taskset` exists and there are two cores, the server under test (herald or the bare
//! server) runs on core 0 and this process (generator + fake upstream) on core 1.
//!
//! Only loopback addresses are ever contacted, and every run stops by itself. Run with no
//! arguments at all (as `cargo test --benches` does), it makes a 1-second smoke run instead.

#[path = "loadtest/bare.rs"]
mod bare;
#[path = "loadtest/load.rs"]
mod load;
#[path = "loadtest/procs.rs"]
mod procs;
#[path = "loadtest/report.rs"]
mod report;
#[path = "loadtest/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use load::{BodyKind, Plan, Progress, Window};
use procs::{Memory, Pinning, Server};
use report::{Measured, Scenario, SoakSample};
use upstream::FakeUpstream;

/// The service-account key the integration tests use; the fake upstream never checks it.
const FCM_TEST_KEY_PEM: &str = include_str!("../tests/fixtures/fcm-test-key.pem");
/// herald's `dedup.max_entries` when the config does not set it.
const HERALD_DEFAULT_MAX_ENTRIES: u64 = 200_000;
const READY_LIMIT: Duration = Duration::from_secs(10);
const SOAK_REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    about = "Loopback load test of the herald daemon against a fake APNs/FCM upstream"
)]
struct Opts {
    /// Concurrent keep-alive connections (closed loop: one request in flight on each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per scenario and server (after the warm-up).
    #[arg(long, default_value_t = 8)]
    duration: u64,
    /// Warm-up seconds before measuring (not counted).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Which body variant to send.
    #[arg(long, value_enum, default_value_t = ScenarioArg::All)]
    scenario: ScenarioArg,
    /// The fake upstream answers after this many milliseconds.
    #[arg(long, default_value_t = 0)]
    upstream_delay: u64,
    /// Soak mode: run this many seconds at `--rate` with unique event ids and print herald's RSS
    /// every 10 s (no baseline).
    #[arg(long, value_name = "SECS")]
    soak: Option<u64>,
    /// Requests per second in total (open loop). Default: closed loop, or 1000 with `--soak`.
    #[arg(long, value_name = "RPS")]
    rate: Option<f64>,
    /// herald's `dedup.max_entries` (default: herald's own, 200000).
    #[arg(long)]
    max_entries: Option<u64>,
    /// Cycle through 1024 event ids, so nearly every device is a dedup hit.
    #[arg(long)]
    repeat_event_ids: bool,
    /// Skip the bare hyper baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Print machine-readable results (JSON) on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run the bare baseline server on ADDR.
    #[arg(long, hide = true, value_name = "ADDR")]
    serve_bare: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ScenarioArg {
    One,
    Four,
    EventIdOnly,
    Webpush,
    Unifiedpush,
    All,
}

impl ScenarioArg {
    fn kinds(self) -> Vec<BodyKind> {
        match self {
            ScenarioArg::One => vec![BodyKind::One],
            ScenarioArg::Four => vec![BodyKind::Four],
            ScenarioArg::EventIdOnly => vec![BodyKind::EventIdOnly],
            ScenarioArg::Webpush => vec![BodyKind::Webpush],
            ScenarioArg::Unifiedpush => vec![BodyKind::Unifiedpush],
            ScenarioArg::All => BodyKind::ALL.to_vec(),
        }
    }
}

fn main() -> ExitCode {
    let opts = if std::env::args_os().len() == 1 {
        // `cargo test --benches` (or `--all-targets`) runs benches with no arguments; `cargo
        // bench` always passes `--bench`. Check the harness end to end, briefly.
        eprintln!(
            "loadtest: no arguments (test mode): a 1 s smoke run; use `cargo bench --bench loadtest`"
        );
        Opts::parse_from([
            "loadtest",
            "--scenario=one",
            "--connections=4",
            "--warmup=0",
            "--duration=1",
            "--no-baseline",
        ])
    } else {
        Opts::parse()
    };
    if let Some(addr) = opts.serve_bare {
        return bare::serve(addr);
    }
    if opts.connections == 0 || opts.duration == 0 {
        eprintln!("loadtest: --connections and --duration must be at least 1");
        return ExitCode::from(2);
    }
    // Before any thread exists, so every thread of this process inherits the affinity.
    let pinning = Pinning::pin_self();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(&opts, pinning)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Paths and settings shared by every herald start.
struct Env {
    dir: tempfile::TempDir,
    pinning: Pinning,
    upstream: FakeUpstream,
    clock_ticks: u64,
}

async fn run(opts: &Opts, pinning: Pinning) -> Result<(), String> {
    let delay = Duration::from_millis(opts.upstream_delay);
    let upstream = FakeUpstream::start(delay).await.map_err(|e| format!("fake upstream: {e}"))?;
    load::set_push_base(format!("https://{}", upstream.fcm));
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    write_credentials(dir.path(), &upstream).map_err(|e| format!("writing credentials: {e}"))?;
    let env = Env { dir, pinning, upstream, clock_ticks: procs::clock_ticks_per_second() };
    note(&format!("pinning: {}", pinning_text(&env.pinning)));
    note(&format!("herald: {}", env!("CARGO_BIN_EXE_herald")));

    if let Some(secs) = opts.soak {
        return soak(opts, &env, Duration::from_secs(secs)).await;
    }
    let setup = report::Setup {
        connections: opts.connections,
        upstream_delay_ms: opts.upstream_delay,
        max_entries: opts.max_entries.unwrap_or(HERALD_DEFAULT_MAX_ENTRIES),
        pinned: env.pinning.applied,
        pinning: env.pinning.note.clone(),
    };
    let mut scenarios = Vec::new();
    for kind in opts.scenario.kinds() {
        let plan = Plan {
            addr: procs::free_addr().map_err(|e| e.to_string())?,
            kind,
            connections: opts.connections,
            warmup: Duration::from_secs(opts.warmup),
            duration: Duration::from_secs(opts.duration),
            rate: opts.rate,
            repeat_event_ids: opts.repeat_event_ids,
        };
        note(&format!("scenario {}: herald …", kind.name()));
        let herald = measure_herald(opts, &env, &plan).await?;
        let bare = if opts.no_baseline {
            None
        } else {
            note(&format!("scenario {}: bare hyper …", kind.name()));
            let plan = Plan { addr: procs::free_addr().map_err(|e| e.to_string())?, ..plan };
            Some(measure_bare(&env, &plan).await?)
        };
        let scenario = Scenario { kind, herald, bare };
        if !opts.json {
            report::print_scenario(&scenario, &setup, &plan);
        }
        scenarios.push(scenario);
    }
    let checks = report::checks(&scenarios, &setup);
    if opts.json {
        let doc = json!({
            "setup": setup.to_json(opts.duration, opts.warmup, opts.repeat_event_ids, opts.rate),
            "scenarios": scenarios.iter().map(Scenario::to_json).collect::<Vec<_>>(),
            "targets": checks.iter().map(report::Check::to_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("results are JSON"));
    } else {
        report::print_summary(&scenarios, &checks, &setup);
    }
    Ok(())
}

/// Starts herald, waits for `/ready`, runs the plan, and stops it.
async fn measure_herald(opts: &Opts, env: &Env, plan: &Plan) -> Result<Measured, String> {
    let (mut server, admin) = start_herald(env, plan.addr, opts.max_entries)?;
    let ready = match server.wait_ready(admin, "/ready", READY_LIMIT).await {
        Ok(ready) => ready,
        Err(e) => {
            server.stop().await;
            return Err(format!("herald {e}; its log:\n{}", herald_log(env).join("\n")));
        }
    };
    let before = env.upstream.served();
    let idle = server.memory();
    let mut measured = measure(env, &server, plan).await;
    measured.ready = Some(ready);
    measured.idle_rss_kib = idle.rss_kib;
    measured.upstream = Some(env.upstream.served().since(before));
    measured.memory = server.memory();
    measured.clean_exit = Some(server.stop().await);
    measured.log = herald_log(env);
    Ok(measured)
}

async fn measure_bare(env: &Env, plan: &Plan) -> Result<Measured, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let addr = plan.addr.to_string();
    let log = env.dir.path().join("bare.log");
    let mut server = Server::spawn(&exe, &["--serve-bare", &addr], &env.pinning, &log)
        .map_err(|e| format!("starting the bare server: {e}"))?;
    let ready = server.wait_ready(plan.addr, "/", READY_LIMIT).await;
    let ready = match ready {
        Ok(ready) => ready,
        Err(e) => {
            server.stop().await;
            return Err(format!("bare server {e}"));
        }
    };
    let idle = server.memory();
    let mut measured = measure(env, &server, plan).await;
    measured.ready = Some(ready);
    measured.idle_rss_kib = idle.rss_kib;
    measured.memory = server.memory();
    server.stop().await;
    Ok(measured)
}

/// Runs the load while sampling the server's and our own CPU time at the window's edges.
async fn measure(env: &Env, server: &Server, plan: &Plan) -> Measured {
    let window = load::window_after(plan.warmup, plan.duration);
    let sampler = async {
        tokio::time::sleep_until(window.from).await;
        let start = (server.cpu_ticks(), procs::own_cpu_ticks(), procs::core_jiffies());
        tokio::time::sleep_until(window.until).await;
        let end = (server.cpu_ticks(), procs::own_cpu_ticks(), procs::core_jiffies());
        (
            end.0.saturating_sub(start.0),
            end.1.saturating_sub(start.1),
            procs::core_busy(&start.2, &end.2),
        )
    };
    let progress = Arc::new(Progress::default());
    let (outcome, (server_ticks, own_ticks, core_busy)) =
        tokio::join!(load::run(plan, window, progress.clone()), sampler);
    let ticks = env.clock_ticks as f64;
    Measured {
        outcome,
        cpu_s: server_ticks as f64 / ticks,
        generator_cpu_s: own_ticks as f64 / ticks,
        core_busy,
        memory: Memory::default(),
        idle_rss_kib: 0,
        all_requests: progress.done.load(Ordering::Relaxed),
        ready: None,
        upstream: None,
        clean_exit: None,
        log: Vec::new(),
    }
}

/// Starts herald on `listen` with a fresh config; returns it and its admin address.
fn start_herald(
    env: &Env,
    listen: SocketAddr,
    max_entries: Option<u64>,
) -> Result<(Server, SocketAddr), String> {
    let admin = procs::free_addr().map_err(|e| e.to_string())?;
    let config = env.dir.path().join("gateway.yaml");
    std::fs::write(&config, gateway_yaml(listen, admin, &env.upstream, max_entries))
        .map_err(|e| format!("writing gateway.yaml: {e}"))?;
    let config = config.to_str().ok_or("temp dir path is not UTF-8")?.to_owned();
    let server = Server::spawn(
        Path::new(env!("CARGO_BIN_EXE_herald")),
        &["serve", "--config", &config],
        &env.pinning,
        &log_path(env),
    )
    .map_err(|e| format!("starting herald: {e}"))?;
    Ok((server, admin))
}

fn log_path(env: &Env) -> PathBuf {
    env.dir.path().join("herald.log")
}

fn herald_log(env: &Env) -> Vec<String> {
    std::fs::read_to_string(log_path(env)).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn gateway_yaml(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: &FakeUpstream,
    max_entries: Option<u64>,
) -> String {
    let dedup = max_entries.map(|n| format!("dedup: {{max_entries: {n}}}\n")).unwrap_or_default();
    format!(
        "listen: \"{listen}\"\nadmin_listen: \"{admin}\"\nlog: {{level: warn}}\n{dedup}\
         apps:\n  \
           {apns_app}:\n    type: apns\n    key_file: apns.p8\n    key_id: ABC123DEFG\n    \
             team_id: TEAM123456\n    topic: {apns_app}\n    endpoint: \"https://{apns}\"\n    \
             ca_file: ca.pem\n  \
           {fcm_app}:\n    type: fcm\n    service_account_file: fcm.json\n    \
             endpoint: \"https://{fcm}\"\n    ca_file: ca.pem\n  \
           {web_app}:\n    type: webpush\n    vapid_private_key_file: vapid.pem\n    \
             vapid_subject: \"mailto:bench@example.org\"\n    allow_internal_endpoints: true\n    \
             ca_file: ca.pem\n  \
           {up_app}:\n    type: unifiedpush\n    allow_internal_endpoints: true\n    ca_file: ca.pem\n",
        web_app = load::WEBPUSH_APP,
        up_app = load::UNIFIEDPUSH_APP,
        apns_app = load::APNS_APP,
        fcm_app = load::FCM_APP,
        apns = upstream.apns,
        fcm = upstream.fcm,
    )
}

/// `ca.pem`, an APNs `.p8` key (P-256, PKCS#8), a VAPID key and an FCM service account whose
/// `token_uri` is the fake.
fn write_credentials(dir: &Path, upstream: &FakeUpstream) -> std::io::Result<()> {
    std::fs::write(dir.join("ca.pem"), &upstream.ca_pem)?;
    let p8 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(std::io::Error::other)?;
    std::fs::write(dir.join("apns.p8"), p8.serialize_pem())?;
    let vapid = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(std::io::Error::other)?;
    std::fs::write(dir.join("vapid.pem"), vapid.serialize_pem())?;
    let account = json!({
        "type": "service_account",
        "project_id": "herald-bench",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": FCM_TEST_KEY_PEM,
        "client_email": "herald-bench@herald-bench.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "token_uri": format!("https://{}/token", upstream.fcm),
    });
    std::fs::write(dir.join("fcm.json"), account.to_string())
}

/// Soak: unique event ids at a fixed rate; RSS every 10 s.
async fn soak(opts: &Opts, env: &Env, length: Duration) -> Result<(), String> {
    let kind = match opts.scenario {
        ScenarioArg::All => BodyKind::One,
        one => one.kinds()[0],
    };
    let rate = opts.rate.unwrap_or(1000.0);
    let max_entries = opts.max_entries.unwrap_or(HERALD_DEFAULT_MAX_ENTRIES);
    let plan = Plan {
        addr: procs::free_addr().map_err(|e| e.to_string())?,
        kind,
        connections: opts.connections,
        warmup: Duration::ZERO,
        duration: length,
        rate: Some(rate),
        repeat_event_ids: opts.repeat_event_ids,
    };
    let fills_after = max_entries as f64 / (rate * kind.devices() as f64);
    note(&format!(
        "soak: {} s at {rate} req/s, body {}, dedup.max_entries {max_entries} (full after ~{fills_after:.0} s)",
        length.as_secs(),
        kind.name()
    ));
    if fills_after >= length.as_secs_f64() {
        note("soak: warning: the dedup cache will not fill; lower --max-entries");
    }
    let (mut server, admin) = start_herald(env, plan.addr, Some(max_entries))?;
    let ready = server.wait_ready(admin, "/ready", READY_LIMIT).await;
    if let Err(e) = ready {
        server.stop().await;
        return Err(format!("herald {e}"));
    }
    let window =
        Window { from: tokio::time::Instant::now(), until: tokio::time::Instant::now() + length };
    let counters = Arc::new(Progress::default());
    let reporter = async {
        let mut samples = Vec::new();
        let mut ticks =
            tokio::time::interval_at(window.from + SOAK_REPORT_EVERY, SOAK_REPORT_EVERY);
        while tokio::time::Instant::now() + SOAK_REPORT_EVERY / 2 < window.until {
            ticks.tick().await;
            let sample = SoakSample {
                at: window.from.elapsed(),
                requests: counters.done.load(Ordering::Relaxed),
                failed: counters.failed.load(Ordering::Relaxed),
                memory: server.memory(),
            };
            if !opts.json {
                report::print_soak_sample(&sample);
            }
            samples.push(sample);
        }
        samples
    };
    let (outcome, samples) = tokio::join!(load::run(&plan, window, counters.clone()), reporter);
    let memory = server.memory();
    let clean_exit = server.stop().await;
    let soak = report::Soak {
        kind,
        rate,
        max_entries,
        samples,
        outcome,
        final_memory: memory,
        clean_exit,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&soak.to_json()).expect("results are JSON"));
    } else {
        report::print_soak_summary(&soak);
    }
    Ok(())
}

fn pinning_text(pinning: &Pinning) -> String {
    if pinning.applied {
        format!("applied ({})", pinning.note)
    } else {
        format!("not applied ({})", pinning.note)
    }
}

/// Progress goes to stderr, so `--json` output stays clean.
fn note(line: &str) {
    eprintln!("loadtest: {line}");
}
