//! Every Prometheus series herald exports, declared in one place.
//!
//! [`Metrics`] owns its own `PrometheusRecorder` and is passed to whoever records; it is never
//! installed as the process-global recorder, so several `App`s in one test process keep separate
//! numbers. Labels are low-cardinality only: app pattern (from config), provider, outcome, HTTP
//! status. Never a pushkey, user or room.

use std::time::Duration;

use std::sync::{Arc, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::providers::AppLabels;

pub const NOTIFICATIONS_RECEIVED: &str = "herald_notifications_received_total";
pub const DEVICES_RECEIVED: &str = "herald_devices_received_total";
pub const DEVICE_OUTCOMES: &str = "herald_device_outcomes_total";
pub const UPSTREAM_RESPONSES: &str = "herald_upstream_responses_total";
pub const UPSTREAM_DURATION: &str = "herald_upstream_duration_seconds";
pub const DEDUP_HITS: &str = "herald_dedup_hits_total";
pub const UPSTREAM_RETRIES: &str = "herald_upstream_retries_total";
pub const INFLIGHT_REQUESTS: &str = "herald_inflight_requests";
pub const NOTIFY_DURATION: &str = "herald_notify_duration_seconds";
pub const DEDUP_STORE_UP: &str = "herald_dedup_store_up";
pub const DEDUP_STORE_FALLBACKS: &str = "herald_dedup_store_fallbacks_total";

const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const METADATA: Metadata<'static> = Metadata::new("herald", Level::INFO, Some("herald"));

/// The gateway's metrics and the recorder that renders them.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    notifications: Counter,
    devices: Counter,
    dedup_hits: Counter,
    inflight: Gauge,
    /// `herald_notify_duration_seconds{status="200"}`, the common case.
    notify_ok: Histogram,
}

/// One app's hot series, each registered on first use and then recorded through its handle
/// (no registry lookup or label allocation per push): outcomes, `200` answers, attempt latency.
#[derive(Default)]
pub struct AppHandles {
    delivered: OnceLock<Counter>,
    rejected: OnceLock<Counter>,
    failed: OnceLock<Counter>,
    upstream_200: OnceLock<Counter>,
    upstream_duration: OnceLock<Histogram>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("the bucket list is a non-empty constant")
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, SharedString::const_str(help));
        };
        describe(NOTIFICATIONS_RECEIVED, None, "Notify requests accepted for processing.");
        describe(DEVICES_RECEIVED, None, "Devices in accepted notify requests.");
        describe(DEVICE_OUTCOMES, None, "Final outcome per device: delivered, rejected or failed.");
        describe(UPSTREAM_RESPONSES, None, "Upstream answers by HTTP status (or error).");
        describe(DEDUP_HITS, None, "Devices answered from the dedup cache without a send.");
        describe(UPSTREAM_RETRIES, None, "Upstream attempts repeated after a transient failure.");
        describe(
            DEDUP_STORE_FALLBACKS,
            None,
            "Sends deduplicated only locally because the shared dedup store (Redis) was down.",
        );
        recorder.describe_histogram(
            UPSTREAM_DURATION.into(),
            Some(Unit::Seconds),
            SharedString::const_str("Latency of one upstream attempt."),
        );
        recorder.describe_histogram(
            NOTIFY_DURATION.into(),
            Some(Unit::Seconds),
            SharedString::const_str("Time to answer a notify request, by HTTP status."),
        );
        recorder.describe_gauge(
            DEDUP_STORE_UP.into(),
            None,
            SharedString::const_str("1 while the shared dedup store (Redis) answers, else 0."),
        );
        recorder.describe_gauge(
            INFLIGHT_REQUESTS.into(),
            None,
            SharedString::const_str("Notify requests being processed."),
        );
        let notifications =
            recorder.register_counter(&Key::from_static_name(NOTIFICATIONS_RECEIVED), &METADATA);
        let devices =
            recorder.register_counter(&Key::from_static_name(DEVICES_RECEIVED), &METADATA);
        let dedup_hits = recorder.register_counter(&Key::from_static_name(DEDUP_HITS), &METADATA);
        let inflight =
            recorder.register_gauge(&Key::from_static_name(INFLIGHT_REQUESTS), &METADATA);
        let notify_ok = recorder.register_histogram(
            &Key::from_parts(NOTIFY_DURATION, vec![Label::from_static_parts("status", "200")]),
            &METADATA,
        );
        Metrics { recorder, handle, notifications, devices, dedup_hits, inflight, notify_ok }
    }

    /// The labels of one app; its hot series are registered when first recorded.
    pub fn app_labels(&self, app: &str, provider: &'static str) -> AppLabels {
        AppLabels { app: app.into(), provider, handles: Arc::default() }
    }

    fn counter(&self, name: &'static str, app: &AppLabels, extra: Option<Label>) -> Counter {
        let labels: Vec<_> = app_labels(app).chain(extra).collect();
        self.recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    /// The Prometheus text exposition of every series.
    /// Folds recorded histogram samples into their summaries. Samples pile up in memory until
    /// this runs, so it must run periodically even when nobody scrapes `/metrics`.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn render(&self) -> String {
        self.upkeep();
        self.handle.render()
    }

    pub fn notification_received(&self, devices: usize) {
        self.notifications.increment(1);
        self.devices.increment(devices as u64);
    }

    pub fn dedup_hit(&self) {
        self.dedup_hits.increment(1);
    }

    /// `herald_dedup_store_up` (only with `dedup.backend: redis`).
    pub fn dedup_store_up(&self) -> Gauge {
        self.recorder.register_gauge(&Key::from_static_name(DEDUP_STORE_UP), &METADATA)
    }

    /// `herald_dedup_store_fallbacks_total` (only with `dedup.backend: redis`).
    pub fn dedup_store_fallbacks(&self) -> Counter {
        self.recorder.register_counter(&Key::from_static_name(DEDUP_STORE_FALLBACKS), &METADATA)
    }

    pub fn inflight(&self) -> &Gauge {
        &self.inflight
    }

    /// A device's final outcome: `delivered`, `rejected` or `failed`.
    pub fn device_outcome(&self, app: &AppLabels, outcome: &'static str) {
        let label = || Some(Label::from_static_parts("outcome", outcome));
        let slot = match outcome {
            "delivered" => &app.handles.delivered,
            "rejected" => &app.handles.rejected,
            "failed" => &app.handles.failed,
            _ => return self.counter(DEVICE_OUTCOMES, app, label()).increment(1),
        };
        slot.get_or_init(|| self.counter(DEVICE_OUTCOMES, app, label())).increment(1);
    }

    /// One upstream attempt's answer (`200`, `410`, … or `error`/`timeout`) and its latency.
    pub fn upstream(&self, app: &AppLabels, status: &str, elapsed: Duration) {
        app.handles
            .upstream_duration
            .get_or_init(|| {
                let labels: Vec<_> = app_labels(app).collect();
                self.recorder
                    .register_histogram(&Key::from_parts(UPSTREAM_DURATION, labels), &METADATA)
            })
            .record(elapsed.as_secs_f64());
        let label = || Some(Label::new("status", status.to_owned()));
        if status == "200" {
            let counter = app
                .handles
                .upstream_200
                .get_or_init(|| self.counter(UPSTREAM_RESPONSES, app, label()));
            return counter.increment(1);
        }
        self.counter(UPSTREAM_RESPONSES, app, label()).increment(1);
    }

    /// Another attempt is about to be made for one device.
    pub fn retry(&self, app: &AppLabels) {
        self.counter(UPSTREAM_RETRIES, app, None).increment(1);
    }

    /// A notify request answered with `status` after `elapsed`.
    pub fn notify_answered(&self, status: u16, elapsed: Duration) {
        if status == 200 {
            return self.notify_ok.record(elapsed.as_secs_f64());
        }
        let labels = vec![Label::new("status", status.to_string())];
        self.recorder
            .register_histogram(&Key::from_parts(NOTIFY_DURATION, labels), &METADATA)
            .record(elapsed.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn app_labels(app: &AppLabels) -> impl Iterator<Item = Label> {
    [Label::new("app", app.app.to_string()), Label::from_static_parts("provider", app.provider)]
        .into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        let app = m.app_labels("im.example.ios", "apns");
        m.notification_received(2);
        m.device_outcome(&app, "delivered");
        m.upstream(&app, "200", Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("herald_notifications_received_total 1"), "{text}");
        assert!(text.contains("herald_devices_received_total 2"), "{text}");
        assert!(text.contains(r#"herald_device_outcomes_total{app="im.example.ios",provider="apns",outcome="delivered"} 1"#), "{text}");
        assert!(text.contains(r#"herald_upstream_duration_seconds_bucket{app="im.example.ios",provider="apns",le="0.005"} 1"#), "{text}");
    }

    #[test]
    fn two_instances_do_not_share_numbers() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.notification_received(1);
        assert!(b.render().contains("herald_notifications_received_total 0"));
    }
}
