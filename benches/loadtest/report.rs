//! What the load test prints: one table per scenario, a summary with the ratios and every
//! target of the issue marked met or missed, the soak lines, and the same as JSON.

use std::time::Duration;

use serde_json::{Value, json};

use crate::load::{self, BodyKind, Outcome, Plan};
use crate::procs::{GENERATOR_CORE, Memory, SERVER_CORE};
use crate::upstream::Served;

// The targets.
const MIN_THROUGHPUT_RATIO: f64 = 0.30;
const MAX_P99_INSTANT_MS: f64 = 10.0;
/// With an upstream delay, p99 may exceed the delay by this much (50 ms → 70 ms).
const MAX_P99_OVER_DELAY_MS: f64 = 20.0;
/// "Limited only by concurrency": at least this share of connections / delay.
const MIN_CONCURRENCY_SHARE: f64 = 0.90;
const MAX_PEAK_RSS_MIB: f64 = 20.0;
const MAX_CPU_S_PER_1K: f64 = 0.04;
const MAX_READY_MS: f64 = 200.0;
/// Above this, the generator's core was the bottleneck rather than the server.
const GENERATOR_SATURATED: f64 = 0.90;
/// Above this, other processes on the machine took enough of a pinned core to skew the numbers.
const FOREIGN_LOAD_NOTICEABLE: f64 = 0.10;
/// A soak's RSS counts as flat while max − min after the cache filled stays within this share
/// of the minimum (or 2 MiB, whichever is larger).
const SOAK_FLAT_SHARE: f64 = 0.10;
const SOAK_FLAT_MIN_MIB: f64 = 2.0;

/// One server under one load.
pub struct Measured {
    pub outcome: Outcome,
    /// Server CPU time during the measured window.
    pub cpu_s: f64,
    /// This process's (generator + fake upstream) CPU time during the window.
    pub generator_cpu_s: f64,
    /// How busy each core was during the window, counting every process on the machine.
    pub core_busy: Vec<f64>,
    /// At the end of the run.
    pub memory: Memory,
    /// RSS once ready, before any load.
    pub idle_rss_kib: u64,
    /// From spawn to the first 200 on `/ready` (or `/` for the bare server).
    pub ready: Option<Duration>,
    /// Answered requests, warm-up included.
    pub all_requests: u64,
    /// herald only: what the fake upstream served during the run (warm-up included).
    pub upstream: Option<Served>,
    /// herald only: exited 0 after SIGTERM.
    pub clean_exit: Option<bool>,
    /// herald's stderr (level warn).
    pub log: Vec<String>,
}

impl Measured {
    fn requests(&self) -> u64 {
        self.outcome.ok + self.outcome.bad_status
    }

    fn window_s(&self) -> f64 {
        self.outcome.window.as_secs_f64()
    }

    fn cpu_per_1k(&self) -> f64 {
        if self.requests() == 0 { f64::NAN } else { self.cpu_s * 1000.0 / self.requests() as f64 }
    }

    fn cpu_share(&self) -> f64 {
        self.cpu_s / self.window_s()
    }

    fn generator_share(&self) -> f64 {
        self.generator_cpu_s / self.window_s()
    }

    /// With pinning: how much of the server's and the generator's cores other processes on the
    /// machine took during the window (the larger of the two).
    fn foreign_load(&self) -> f64 {
        let other = |core: usize, own: f64| self.core_busy.get(core).map_or(0.0, |b| b - own);
        other(SERVER_CORE, self.cpu_share())
            .max(other(GENERATOR_CORE, self.generator_share()))
            .max(0.0)
    }

    fn peak_mib(&self) -> f64 {
        mib(self.memory.peak_kib)
    }

    fn to_json(&self) -> Value {
        let o = &self.outcome;
        json!({
            "requests": self.requests(),
            "requests_per_s": o.rps(),
            "latency_ms": {
                "p50": o.quantile_ms(0.50), "p99": o.quantile_ms(0.99),
                "p99_9": o.quantile_ms(0.999), "max": o.max_ms(),
                "mean": o.latency_us.mean() / 1000.0,
            },
            "non_200": o.bad_status,
            "connection_errors": o.conn_errors,
            "first_error": o.first_error,
            "cpu_s": self.cpu_s,
            "cpu_s_per_1000_requests": self.cpu_per_1k(),
            "cpu_share_of_window": self.cpu_share(),
            "generator_cpu_share_of_window": self.generator_share(),
            "core_busy_all_processes": self.core_busy,
            "foreign_load": self.foreign_load(),
            "peak_rss_kib": self.memory.peak_kib,
            "rss_kib": self.memory.rss_kib,
            "idle_rss_kib": self.idle_rss_kib,
            "ready_ms": self.ready.map(ms),
            "upstream": self.upstream.map(|u| json!({
                "apns": u.apns, "fcm": u.fcm, "token": u.token, "unknown": u.other,
                "apns_connections": u.apns_connections, "fcm_connections": u.fcm_connections,
            })),
            "clean_exit": self.clean_exit,
            "log_lines": self.log.len(),
        })
    }
}

/// One body variant: herald and, unless `--no-baseline`, the bare server.
pub struct Scenario {
    pub kind: BodyKind,
    pub herald: Measured,
    pub bare: Option<Measured>,
}

impl Scenario {
    /// herald's requests/s as a share of the bare server's.
    fn ratio(&self) -> Option<f64> {
        self.bare.as_ref().map(|b| self.herald.outcome.rps() / b.outcome.rps())
    }

    /// The bare server's CPU cost per request as a share of herald's: what the throughput ratio
    /// would be with both CPU-bound, whether or not the generator kept up with the bare server.
    fn cost_ratio(&self) -> Option<f64> {
        self.bare.as_ref().map(|b| b.cpu_per_1k() / self.herald.cpu_per_1k())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.kind.name(),
            "body_bytes": load::sample_body(self.kind).len(),
            "herald": self.herald.to_json(),
            "bare": self.bare.as_ref().map(Measured::to_json),
            "throughput_ratio": self.ratio(),
            "cpu_cost_ratio": self.cost_ratio(),
        })
    }
}

/// How the run was set up.
pub struct Setup {
    pub connections: usize,
    pub upstream_delay_ms: u64,
    /// herald's `dedup.max_entries` in this run.
    pub max_entries: u64,
    pub pinned: bool,
    pub pinning: String,
}

impl Setup {
    pub fn to_json(
        &self,
        duration_s: u64,
        warmup_s: u64,
        repeat_event_ids: bool,
        rate: Option<f64>,
    ) -> Value {
        json!({
            "connections": self.connections, "duration_s": duration_s, "warmup_s": warmup_s,
            "upstream_delay_ms": self.upstream_delay_ms, "pinned": self.pinned,
            "dedup_max_entries": self.max_entries,
            "pinning": self.pinning, "repeat_event_ids": repeat_event_ids, "rate": rate,
        })
    }
}

/// One target, with what was measured.
pub struct Check {
    pub name: String,
    pub value: String,
    pub limit: String,
    /// `None`: not applicable to this run (the reason is in `value`).
    pub met: Option<bool>,
}

impl Check {
    fn new(name: String, value: String, limit: String, met: bool) -> Check {
        Check { name, value, limit, met: Some(met) }
    }

    pub fn to_json(&self) -> Value {
        json!({"target": self.name, "value": self.value, "limit": self.limit, "met": self.met})
    }
}

/// Every target of the issue that applies to this run. The issue sets its targets for the
/// realistic 1-device full-format body, so only that scenario is marked; the others are
/// reported for comparison.
pub fn checks(scenarios: &[Scenario], setup: &Setup) -> Vec<Check> {
    let mut checks = Vec::new();
    let delay_ms = setup.upstream_delay_ms as f64;
    for s in scenarios.iter().filter(|s| matches!(s.kind, BodyKind::One)) {
        let name = s.kind.name();
        let h = &s.herald;
        let p99 = h.outcome.quantile_ms(0.99);
        if setup.upstream_delay_ms == 0 {
            if let Some(ratio) = s.ratio() {
                checks.push(Check::new(
                    format!("throughput vs bare hyper [{name}]"),
                    percent(ratio),
                    format!(">= {}", percent(MIN_THROUGHPUT_RATIO)),
                    ratio >= MIN_THROUGHPUT_RATIO,
                ));
            }
            checks.push(Check::new(
                format!("p99, {} conns, instant upstream [{name}]", setup.connections),
                format!("{p99:.2} ms"),
                format!("<= {MAX_P99_INSTANT_MS} ms"),
                p99 <= MAX_P99_INSTANT_MS,
            ));
        } else {
            let ideal = setup.connections as f64 / (delay_ms / 1000.0);
            let rps = h.outcome.rps();
            checks.push(Check::new(
                format!("throughput limited by concurrency only [{name}]"),
                format!("{rps:.0} req/s ({} of {ideal:.0})", percent(rps / ideal)),
                format!(">= {} of conns/delay", percent(MIN_CONCURRENCY_SHARE)),
                rps >= MIN_CONCURRENCY_SHARE * ideal,
            ));
            let limit = delay_ms + MAX_P99_OVER_DELAY_MS;
            checks.push(Check::new(
                format!("p99, {delay_ms} ms upstream [{name}]"),
                format!("{p99:.2} ms"),
                format!("<= {limit} ms"),
                p99 <= limit,
            ));
        }
        checks.push(Check::new(
            format!("peak RSS (VmHWM) [{name}]"),
            format!("{:.1} MiB", h.peak_mib()),
            format!("<= {MAX_PEAK_RSS_MIB} MiB"),
            h.peak_mib() <= MAX_PEAK_RSS_MIB,
        ));
        checks.push(Check::new(
            format!("CPU-s per 1,000 requests [{name}]"),
            format!("{:.4}", h.cpu_per_1k()),
            format!("<= {MAX_CPU_S_PER_1K}"),
            h.cpu_per_1k() <= MAX_CPU_S_PER_1K,
        ));
    }
    let slowest = scenarios.iter().filter_map(|s| s.herald.ready).max();
    if let Some(ready) = slowest {
        checks.push(Check::new(
            "ready after start (slowest of the starts)".into(),
            format!("{:.0} ms", ms(ready)),
            format!("<= {MAX_READY_MS} ms"),
            ms(ready) <= MAX_READY_MS,
        ));
    }
    if !setup.pinned {
        checks.push(Check {
            name: "pinning (herald alone on one core)".into(),
            value: setup.pinning.clone(),
            limit: "taskset and 2 cores".into(),
            met: None,
        });
    }
    checks
}

pub fn print_scenario(s: &Scenario, setup: &Setup, plan: &Plan) {
    let (connections, delay_ms) = (setup.connections, setup.upstream_delay_ms);
    println!();
    println!(
        "== scenario {}: {} — body {} bytes",
        s.kind.name(),
        s.kind.describe(),
        load::sample_body(s.kind).len()
    );
    let pace = match plan.rate {
        Some(rps) => format!("paced at {rps} req/s"),
        None => "closed loop".to_owned(),
    };
    println!(
        "   {connections} connections ({pace}), {} s measured after {} s warm-up, upstream delay {delay_ms} ms{}",
        plan.duration.as_secs(),
        plan.warmup.as_secs(),
        if plan.repeat_event_ids { ", repeated event ids" } else { "" },
    );
    let columns: Vec<&Measured> = std::iter::once(&s.herald).chain(s.bare.as_ref()).collect();
    let mut header = format!("   {:<30}{:>20}", "", "herald");
    if s.bare.is_some() {
        header += &format!("{:>20}{:>10}", "bare hyper", "ratio");
    }
    println!("{header}");
    let row = |label: &str, cell: &dyn Fn(&Measured) -> String, ratio: Option<String>| {
        let mut line = format!("   {label:<30}");
        for m in &columns {
            line += &format!("{:>20}", cell(m));
        }
        if let Some(r) = ratio {
            line += &format!("{r:>10}");
        }
        println!("{line}");
    };
    row("requests/s", &|m| thousands(m.outcome.rps()), s.ratio().map(percent));
    row("requests (measured)", &|m| thousands(m.requests() as f64), None);
    for (label, q) in
        [("latency p50 (ms)", 0.50), ("latency p99 (ms)", 0.99), ("latency p99.9 (ms)", 0.999)]
    {
        row(label, &|m| format!("{:.2}", m.outcome.quantile_ms(q)), None);
    }
    row("latency max (ms)", &|m| format!("{:.2}", m.outcome.max_ms()), None);
    row(
        "non-200 / broken connections",
        &|m| format!("{} / {}", m.outcome.bad_status, m.outcome.conn_errors),
        None,
    );
    row(
        "server CPU-s (share of window)",
        &|m| format!("{:.2} ({})", m.cpu_s, percent(m.cpu_share())),
        None,
    );
    row(
        "server CPU-s per 1,000 req",
        &|m| format!("{:.4}", m.cpu_per_1k()),
        s.cost_ratio().map(percent),
    );
    row("generator CPU (share of window)", &|m| percent(m.generator_share()), None);
    row(
        "cores busy, all processes",
        &|m| m.core_busy.iter().map(|b| percent(*b)).collect::<Vec<_>>().join(" / "),
        None,
    );
    row(
        "RSS idle / peak / end (MiB)",
        &|m| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                mib(m.idle_rss_kib),
                m.peak_mib(),
                mib(m.memory.rss_kib)
            )
        },
        None,
    );
    row(
        "ready after spawn (ms)",
        &|m| m.ready.map_or("-".into(), |r| format!("{:.1}", ms(r))),
        None,
    );
    if let Some(u) = s.herald.upstream {
        println!(
            "   upstream served: {} APNs + {} FCM + {} WebPush/UnifiedPush sends ({:.2} per request) over {} + {} TLS connections, {} token fetches{}",
            u.apns,
            u.fcm,
            u.push,
            u.sends() as f64 / s.herald.all_requests.max(1) as f64,
            u.apns_connections,
            u.fcm_connections,
            u.token,
            if u.other > 0 { format!(", {} unknown paths", u.other) } else { String::new() },
        );
    }
    if !plan.repeat_event_ids {
        // Unique event ids: one dedup entry per device, up to max_entries.
        let entries = (s.herald.all_requests * s.kind.devices()).min(setup.max_entries);
        let grown = s.herald.memory.peak_kib.saturating_sub(s.herald.idle_rss_kib) * 1024;
        println!(
            "   dedup: ~{} entries at the end (max_entries {}); RSS growth / entry ≈ {} bytes",
            thousands(entries as f64),
            thousands(setup.max_entries as f64),
            grown / entries.max(1)
        );
    }
    for m in &columns {
        if let Some(e) = &m.outcome.first_error {
            println!("   first error: {e}");
        }
    }
    if !s.herald.log.is_empty() {
        println!("   herald logged {} line(s) at warn or above; first:", s.herald.log.len());
        for line in s.herald.log.iter().take(3) {
            println!("     {line}");
        }
    }
    if s.herald.clean_exit == Some(false) {
        println!("   herald did not exit 0 within 3 s of SIGTERM");
    }
}

pub fn print_summary(scenarios: &[Scenario], checks: &[Check], setup: &Setup) {
    println!();
    println!(
        "== summary: {} connections, upstream delay {} ms; pinning {} ({})",
        setup.connections,
        setup.upstream_delay_ms,
        if setup.pinned { "applied" } else { "NOT applied" },
        setup.pinning
    );
    println!(
        "   {:<15}{:>13}{:>13}{:>8}{:>8}{:>10}{:>10}{:>11}{:>10}{:>10}",
        "scenario",
        "herald req/s",
        "bare req/s",
        "ratio",
        "cost",
        "p50 ms",
        "p99 ms",
        "CPU-s/1k",
        "peak MiB",
        "gen core"
    );
    for s in scenarios {
        let h = &s.herald;
        println!(
            "   {:<15}{:>13}{:>13}{:>8}{:>8}{:>10.2}{:>10.2}{:>11.4}{:>10.1}{:>10}",
            s.kind.name(),
            thousands(h.outcome.rps()),
            s.bare.as_ref().map_or("-".into(), |b| thousands(b.outcome.rps())),
            s.ratio().map_or("-".into(), percent),
            s.cost_ratio().map_or("-".into(), percent),
            h.outcome.quantile_ms(0.50),
            h.outcome.quantile_ms(0.99),
            h.cpu_per_1k(),
            h.peak_mib(),
            percent(h.generator_share()),
        );
    }
    println!();
    println!("   targets:");
    for c in checks {
        let mark = match c.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        println!("   {mark:>7}  {:<52}{:>28}   ({})", c.name, c.value, c.limit);
    }
    let disturbed: Vec<String> = scenarios
        .iter()
        .flat_map(|s| {
            std::iter::once(("herald", &s.herald, s.kind))
                .chain(s.bare.as_ref().map(|b| ("bare", b, s.kind)))
        })
        .filter(|(_, m, _)| setup.pinned && m.foreign_load() > FOREIGN_LOAD_NOTICEABLE)
        .map(|(who, m, kind)| format!("{} {who} ({})", kind.name(), percent(m.foreign_load())))
        .collect();
    if !disturbed.is_empty() {
        println!(
            "   note: other processes on this machine took a pinned core during: {}; those numbers are noisy",
            disturbed.join(", ")
        );
    }
    let saturated = |pick: fn(&Scenario) -> Option<&Measured>| -> Vec<&str> {
        scenarios
            .iter()
            .filter(|s| pick(s).is_some_and(|m| m.generator_share() > GENERATOR_SATURATED))
            .map(|s| s.kind.name())
            .collect()
    };
    let herald_saturated = saturated(|s| Some(&s.herald));
    if !herald_saturated.is_empty() {
        println!(
            "   note: the generator's core was saturated during herald's run of {}; herald's req/s there is a lower bound",
            herald_saturated.join(", ")
        );
    }
    let bare_saturated = saturated(|s| s.bare.as_ref());
    if !bare_saturated.is_empty() {
        println!(
            "   note: the generator's core was saturated during the bare server's run of {}: its req/s is a lower bound, so the",
            bare_saturated.join(", ")
        );
        println!(
            "         req/s ratio flatters herald; \"cost\" (bare CPU-s per request / herald's) does not depend on the generator"
        );
    }
    if scenarios.iter().any(|s| s.bare.is_some()) {
        println!(
            "   ratio = herald req/s / bare req/s; cost = bare CPU-s per request / herald CPU-s per request"
        );
        if setup.upstream_delay_ms > 0 {
            println!(
                "   (with an upstream delay the ratios are no target: the bare server answers at once)"
            );
        }
    }
}

/// One RSS reading of the soak.
pub struct SoakSample {
    pub at: Duration,
    pub requests: u64,
    pub failed: u64,
    pub memory: Memory,
}

pub fn print_soak_sample(s: &SoakSample) {
    println!(
        "   t={:>4.0} s  requests {:>9}  non-200/failed {:>6}  RSS {:>6.1} MiB  peak {:>6.1} MiB",
        s.at.as_secs_f64(),
        s.requests,
        s.failed,
        mib(s.memory.rss_kib),
        mib(s.memory.peak_kib)
    );
}

pub struct Soak {
    pub kind: BodyKind,
    pub rate: f64,
    pub max_entries: u64,
    pub samples: Vec<SoakSample>,
    pub outcome: Outcome,
    pub final_memory: Memory,
    pub clean_exit: bool,
}

/// RSS after the dedup cache filled: (first, min, max, last) in MiB, and the verdict.
struct Flatness {
    filled_at: Option<Duration>,
    first: f64,
    min: f64,
    max: f64,
    last: f64,
    flat: bool,
}

impl Soak {
    fn flatness(&self) -> Option<Flatness> {
        let per_request = self.kind.devices();
        let full: Vec<&SoakSample> =
            self.samples.iter().filter(|s| s.requests * per_request >= self.max_entries).collect();
        let rss: Vec<f64> = full.iter().map(|s| mib(s.memory.rss_kib)).collect();
        let (first, last) = (*rss.first()?, *rss.last()?);
        let min = rss.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rss.iter().copied().fold(0.0, f64::max);
        let flat = max - min <= (min * SOAK_FLAT_SHARE).max(SOAK_FLAT_MIN_MIB);
        Some(Flatness { filled_at: full.first().map(|s| s.at), first, min, max, last, flat })
    }

    pub fn to_json(&self) -> Value {
        let o = &self.outcome;
        let flat = self.flatness();
        json!({
            "scenario": self.kind.name(), "rate": self.rate, "max_entries": self.max_entries,
            "requests": o.ok + o.bad_status, "requests_per_s": o.rps(), "non_200": o.bad_status,
            "connection_errors": o.conn_errors, "first_error": o.first_error,
            "latency_ms": {"p50": o.quantile_ms(0.5), "p99": o.quantile_ms(0.99),
                           "p99_9": o.quantile_ms(0.999), "max": o.max_ms()},
            "samples": self.samples.iter().map(|s| json!({
                "t_s": s.at.as_secs_f64(), "requests": s.requests, "failed": s.failed,
                "rss_kib": s.memory.rss_kib, "peak_rss_kib": s.memory.peak_kib,
            })).collect::<Vec<_>>(),
            "after_cache_full": flat.map(|f| json!({
                "from_s": f.filled_at.map(|d| d.as_secs_f64()), "first_mib": f.first,
                "min_mib": f.min, "max_mib": f.max, "last_mib": f.last, "flat": f.flat,
            })),
            "peak_rss_kib": self.final_memory.peak_kib,
            "clean_exit": self.clean_exit,
        })
    }
}

pub fn print_soak_summary(soak: &Soak) {
    let o = &soak.outcome;
    println!();
    println!(
        "== soak: {} req/s target, {} req/s achieved, {} requests, {} non-200, {} broken connections",
        soak.rate,
        thousands(o.rps()),
        o.ok + o.bad_status,
        o.bad_status,
        o.conn_errors
    );
    println!(
        "   latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; peak RSS {:.1} MiB",
        o.quantile_ms(0.5),
        o.quantile_ms(0.99),
        o.quantile_ms(0.999),
        o.max_ms(),
        mib(soak.final_memory.peak_kib)
    );
    if let Some(e) = &o.first_error {
        println!("   first error: {e}");
    }
    match soak.flatness() {
        Some(f) => println!(
            "   after the dedup cache filled (max_entries {}, from t={:.0} s): RSS first {:.1}, min {:.1}, max {:.1}, last {:.1} MiB — {}",
            soak.max_entries,
            f.filled_at.map_or(0.0, |d| d.as_secs_f64()),
            f.first,
            f.min,
            f.max,
            f.last,
            if f.flat { "flat (met)" } else { "GROWING (missed)" }
        ),
        None => println!(
            "   the dedup cache (max_entries {}) never filled during the soak; lower --max-entries",
            soak.max_entries
        ),
    }
    if !soak.clean_exit {
        println!("   herald did not exit 0 within 3 s of SIGTERM");
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// `12345.6` → `12,346`.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
