//! `herald demo`: the whole Matrix push flow in one process, narrated step by step, with no
//! setup and no credentials.
//!
//! ```text
//! alice, bob ──HTTP──▶ embedded homeserver ──POST /notify──▶ herald gateway
//!                       (push rules, pushers)                   │    │
//!                                          fake APNs (h2c) ◀────┘    └────▶ fake FCM + OAuth2
//! ```
//!
//! Everything listens on 127.0.0.1:0 in this process ([`stack`]): the fakes ([`fakes`]), the
//! real gateway and the real embedded homeserver. The demo never touches the network beyond
//! 127.0.0.1. The script then acts as two Matrix clients over HTTP: an invite, a message, a
//! mention, a muted room, a read receipt (badge update) and a to-device message.
//!
//! Every push the script expects is awaited at the fakes with a bound; a missing one ends the
//! demo with an error naming the step. Prints no keys or tokens, and pushkeys only shortened.

mod client;
mod fakes;
mod out;
mod stack;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use self::client::{Matrix, Session, esc};
use self::fakes::{ApnsPush, FakeApns, FakeFcm, FcmMessage};
use self::out::{Out, Style, short};
use self::stack::{Counters, GatewayMetrics, Stack};
use crate::homeserver::pushrules::{
    Action, CompiledRuleset, DisplayName, FlatEvent, RoomCtx, Ruleset,
};

/// Whether to colour the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorChoice {
    /// When stdout is a terminal and `NO_COLOR` is not set.
    Auto,
    Never,
}

impl ColorChoice {
    fn enabled(self) -> bool {
        use std::io::IsTerminal as _;
        self == ColorChoice::Auto
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    }
}

/// `herald demo` flags.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub color: ColorChoice,
}

const IOS_APP: &str = "im.herald.demo.ios";
const ANDROID_APP: &str = "im.herald.demo.android";
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// How long the demo waits for an expected push (or other asynchronous effect) before giving up.
const WAIT: Duration = Duration::from_secs(5);

/// Runs the demo: starts everything, plays the script, prints each step, and stops everything.
/// An error means an expected push (or answer) did not come.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = Out::new(options.color.enabled());
    let phones = vec![Phone::ios("iPhone"), Phone::android("Pixel"), Phone::ios("old iPad")];
    let stack = Stack::start(phones[2].provider_token.clone()).await?;

    out.banner("herald demo: Matrix push from send to phone, in one process (127.0.0.1 only)");
    println!();
    out.line(Style::Cyan, "fake APNs", &format!("{}  (HTTP/2 cleartext)", stack.apns.url()));
    out.line(Style::Cyan, "fake FCM", &format!("{}  (+ OAuth2 token endpoint)", stack.fcm.url()));
    out.line(Style::Cyan, "herald gateway", &format!("http://{}{NOTIFY_PATH}", stack.gateway_addr));
    out.line(
        Style::Cyan,
        "homeserver",
        &format!("http://{}  (SQLite in a temp dir)", stack.homeserver_addr),
    );

    let demo = Demo {
        out,
        matrix: Matrix::new(format!("http://{}", stack.homeserver_addr)),
        apns: &stack.apns,
        fcm: &stack.fcm,
        metrics: GatewayMetrics::new(&stack)?,
        notify_url: format!("http://{}{NOTIFY_PATH}", stack.gateway_addr),
        phones,
    };
    let result = demo.script(started).await;
    drop(demo);
    stack.stop().await;
    result
}

/// A phone with the app installed: the pushkey the app registers with the homeserver, and the
/// token the provider sees (the hex form of an APNs token; the same string for FCM).
struct Phone {
    name: &'static str,
    app_id: &'static str,
    pushkey: String,
    provider_token: String,
}

impl Phone {
    /// A random 32-byte APNs device token, handed out base64 as iOS SDKs do.
    fn ios(name: &'static str) -> Phone {
        let raw: [u8; 32] = rand::random();
        Phone {
            name,
            app_id: IOS_APP,
            pushkey: base64::engine::general_purpose::STANDARD.encode(raw),
            provider_token: hex::encode(raw),
        }
    }

    /// A random FCM registration token (`<instance id>:APA91b<…>`).
    fn android(name: &'static str) -> Phone {
        let random = crate::homeserver::random_id;
        let token = format!("{}:APA91b{}", random(8), random(60));
        Phone { name, app_id: ANDROID_APP, pushkey: token.clone(), provider_token: token }
    }
}

/// What the script talks to.
struct Demo<'s> {
    out: Out,
    matrix: Matrix,
    apns: &'s FakeApns,
    fcm: &'s FakeFcm,
    metrics: GatewayMetrics,
    notify_url: String,
    phones: Vec<Phone>,
}

/// The two users.
struct Cast {
    alice: Session,
    bob: Session,
}

/// Where the fakes and the gateway's counters stood when a step began.
struct Mark {
    apns: usize,
    fcm: usize,
    counters: Counters,
}

impl Demo<'_> {
    async fn script(&self, started: Instant) -> anyhow::Result<()> {
        let cast = self.sign_up().await?;
        let lunch = self.invite(&cast).await?;
        self.message(&cast, &lunch, 3, "alice sends a message", "hello! lunch at noon?", false)
            .await?;
        let mention = self
            .message(&cast, &lunch, 4, "alice mentions bob", "Bob, are you coming?", true)
            .await?;
        let muted = self.muted_room(&cast, &mention).await?;
        self.read_receipt(&cast, &lunch, &mention, &muted).await?;
        self.to_device(&cast).await?;

        let apns = self.apns.pushes.since(0);
        let rejected = apns.iter().filter(|p| p.status != 200).count();
        println!();
        self.out.line(
            Style::Green,
            "done",
            &format!(
                "{} APNs pushes ({rejected} rejected), {} FCM messages ({} OAuth2 token), \
                 0 for the muted room, in {:.1} s",
                apns.len(),
                self.fcm.messages.count(),
                self.fcm.tokens_issued.load(std::sync::atomic::Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Step 1: alice and bob register; bob's three phones register pushers.
    async fn sign_up(&self) -> anyhow::Result<Cast> {
        let (m, out) = (&self.matrix, &self.out);
        out.section(1, "alice and bob sign up; bob's phones register pushers");
        let alice = m.register("alice").await?;
        self.set_name(&alice, "Alice").await?;
        let registered = |who: &Session, name: &str| {
            format!("POST /register → {}, display name \"{name}\"", who.user_id)
        };
        out.line(Style::Magenta, "alice", &registered(&alice, "Alice"));
        let bob = m.register("bob").await?;
        self.set_name(&bob, "Bob").await?;
        out.line(Style::Blue, "bob", &registered(&bob, "Bob"));
        for phone in &self.phones {
            let body = json!({
                "kind": "http", "app_id": phone.app_id, "pushkey": phone.pushkey,
                "app_display_name": "herald demo", "device_display_name": phone.name,
                "lang": "en", "data": { "url": self.notify_url },
            });
            m.post(&bob, "/pushers/set", body).await?;
            let what = format!(
                "{:<9} POST /pushers/set  app_id {:<23} pushkey {}",
                phone.name,
                phone.app_id,
                short(&phone.pushkey)
            );
            out.line(Style::Blue, "bob", &what);
        }
        out.note("each pusher's URL is the gateway's notify URL; the old iPad's app was deleted,");
        out.note("so APNs no longer knows its token");
        Ok(Cast { alice, bob })
    }

    /// Step 2: alice creates "Lunch" and invites bob: a push to every phone, one of them dead.
    /// Returns the room id.
    async fn invite(&self, cast: &Cast) -> anyhow::Result<String> {
        let (m, out, Cast { alice, bob }) = (&self.matrix, &self.out, cast);
        out.section(2, "alice creates \"Lunch\" and invites bob");
        let mark = self.mark().await?;
        let lunch = self.create_room(alice, json!({ "name": "Lunch" })).await?;
        let body = json!({ "user_id": bob.user_id });
        m.post(alice, &format!("/rooms/{}/invite", esc(&lunch)), body).await?;
        out.line(
            Style::Magenta,
            "alice",
            "POST /createRoom {\"name\": \"Lunch\"}, then /invite bob",
        );
        let invite = json!({
            "type": "m.room.member", "sender": alice.user_id, "room_id": lunch,
            "state_key": bob.user_id, "content": { "membership": "invite", "displayname": "Bob" },
        });
        self.explain(bob, "Bob", &invite, 1).await?;
        self.expect(&mark, "alice invites bob", 2, 1).await?;
        self.wait_for_pushers(bob, 2).await?;
        out.line(
            Style::Cyan,
            "homeserver",
            "drops the old iPad's pusher (the gateway rejected its pushkey); bob has 2 left",
        );
        m.post(bob, &format!("/rooms/{}/join", esc(&lunch)), json!({})).await?;
        out.line(Style::Blue, "bob", "POST /rooms/…/join  (\"Lunch\")");
        Ok(lunch)
    }

    /// Steps 3 and 4: alice sends `text` to "Lunch", mentioning bob (`m.mentions`) if
    /// `mention`; a push to each of bob's phones. Returns the event id.
    async fn message(
        &self,
        cast: &Cast,
        room: &str,
        n: usize,
        step: &str,
        text: &str,
        mention: bool,
    ) -> anyhow::Result<String> {
        let Cast { alice, bob } = cast;
        self.out.section(n, step);
        let mark = self.mark().await?;
        let mut content = json!({ "msgtype": "m.text", "body": text });
        let mut what = format!("PUT /rooms/…/send/m.room.message  \"{text}\"");
        if mention {
            content["m.mentions"] = json!({ "user_ids": [bob.user_id] });
            what.push_str(", m.mentions.user_ids [bob]");
        }
        let event_id = self.send(alice, room, &content, &what).await?;
        let event = json!({
            "type": "m.room.message", "sender": alice.user_id, "room_id": room,
            "event_id": event_id, "content": content,
        });
        self.explain(bob, "Bob", &event, 2).await?;
        self.expect(&mark, step, 1, 1).await?;
        Ok(event_id)
    }

    /// Step 5: bob mutes a room of his own and alice posts there: nothing is queued. Returns the
    /// muted event's id.
    async fn muted_room(&self, cast: &Cast, mention: &str) -> anyhow::Result<String> {
        let (m, out, Cast { alice, bob }) = (&self.matrix, &self.out, cast);
        out.section(5, "bob mutes \"Random\"; alice posts there");
        let random =
            self.create_room(bob, json!({ "name": "Random", "invite": [alice.user_id] })).await?;
        m.post(alice, &format!("/rooms/{}/join", esc(&random)), json!({})).await?;
        out.line(Style::Blue, "bob", "creates \"Random\" and invites alice; alice joins");
        let rule = format!("/pushrules/global/room/{}", esc(&random));
        m.put(bob, &rule, json!({ "actions": [] })).await?;
        out.line(Style::Blue, "bob", "PUT /pushrules/global/room/<Random>  {\"actions\": []}");
        let text = "anyone seen my keys?";
        let content = json!({ "msgtype": "m.text", "body": text });
        let what = format!("PUT /rooms/…/send/m.room.message  \"{text}\"");
        let muted = self.send(alice, &random, &content, &what).await?;
        let event = json!({
            "type": "m.room.message", "sender": alice.user_id, "room_id": random,
            "event_id": muted, "content": content,
        });
        self.explain(bob, "Bob", &event, 2).await?;
        // The homeserver decides in the transaction that stores the event, so its verdict is
        // already in bob's notifications (the mention is, as a check that the list is read).
        let listed = m.get(bob, "/notifications").await?;
        let listed = |id: &str| {
            listed["notifications"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["event"]["event_id"] == id))
        };
        if !listed(mention) {
            bail!("bob's GET /notifications does not list alice's mention");
        }
        if listed(&muted) {
            bail!("the muted room's message was queued as a notification for bob");
        }
        out.line(Style::Cyan, "homeserver", "queues nothing for bob: no push for the muted room");
        Ok(muted)
    }

    /// Step 6: bob reads "Lunch": a badge-only update to each phone, and still nothing from the
    /// muted room.
    async fn read_receipt(
        &self,
        cast: &Cast,
        lunch: &str,
        mention: &str,
        muted: &str,
    ) -> anyhow::Result<()> {
        let out = &self.out;
        out.section(6, "bob reads \"Lunch\" on his laptop");
        let mark = self.mark().await?;
        let receipt = format!("/rooms/{}/receipt/m.read/{}", esc(lunch), esc(mention));
        self.matrix.post(&cast.bob, &receipt, json!({})).await?;
        out.line(Style::Blue, "bob", "POST /rooms/…/receipt/m.read/<the mention>");
        let (apns, fcm) = self.expect(&mark, "bob reads \"Lunch\"", 1, 1).await?;
        if apns.iter().any(|p| p.payload["aps"].get("alert").is_some())
            || fcm.iter().any(|f| f.message["data"].get("event_id").is_some())
        {
            bail!("expected badge-only updates after the read receipt, got an event push");
        }
        let pushed =
            self.apns.pushes.since(0).iter().any(|p| p.payload.to_string().contains(muted))
                || self.fcm.messages.since(0).iter().any(|f| f.message.to_string().contains(muted));
        if pushed {
            bail!("the muted room's message reached a phone");
        }
        out.note("each pusher sends in order, so this badge update coming next also shows that");
        out.note("the muted message was never pushed");
        Ok(())
    }

    /// Step 7: alice sends bob's device a to-device message; bob's `/sync` has it, no push is sent.
    async fn to_device(&self, cast: &Cast) -> anyhow::Result<()> {
        const KIND: &str = "im.herald.demo.ping";
        let (m, out, Cast { alice, bob }) = (&self.matrix, &self.out, cast);
        out.section(7, "alice sends bob's device a to-device message");
        let before = (self.apns.pushes.count(), self.fcm.messages.count());
        let ping = json!({ "text": "ping from alice" });
        let body = json!({ "messages": { &bob.user_id: { &bob.device_id: ping } } });
        let txn = crate::homeserver::random_id(9);
        m.put(alice, &format!("/sendToDevice/{KIND}/{txn}"), body).await?;
        let what = format!("PUT /sendToDevice/{KIND}/…  to {} {}", bob.user_id, bob.device_id);
        out.line(Style::Magenta, "alice", &what);

        let sync = m.get(bob, "/sync?timeout=0").await?;
        let received = sync["to_device"]["events"]
            .as_array()
            .and_then(|events| events.iter().find(|e| e["type"] == KIND && e["content"] == ping))
            .context("bob's /sync did not return the to-device message")?;
        let sender = received["sender"].as_str().unwrap_or("?");
        let what = format!("GET /sync → to_device: {KIND} from {sender} {}", received["content"]);
        out.line(Style::Blue, "bob", &what);
        let next_batch = sync["next_batch"].as_str().context("/sync: no `next_batch`")?;
        let again = m.get(bob, &format!("/sync?timeout=0&since={}", esc(next_batch))).await?;
        let left = again["to_device"]["events"].as_array().map_or(0, Vec::len);
        let what =
            format!("GET /sync?since=<next_batch> → {left} to-device (acknowledged, deleted)");
        out.line(Style::Blue, "bob", &what);
        if (self.apns.pushes.count(), self.fcm.messages.count()) != before {
            bail!("a to-device message caused a push");
        }
        out.note("to-device messages travel over /sync, not push: no push was sent");
        Ok(())
    }

    async fn set_name(&self, who: &Session, name: &str) -> anyhow::Result<()> {
        let path = format!("/profile/{}/displayname", esc(&who.user_id));
        self.matrix.put(who, &path, json!({ "displayname": name })).await.map(drop)
    }

    /// `POST /createRoom` (a private chat) with `body`'s fields; returns the room id.
    async fn create_room(&self, who: &Session, mut body: Value) -> anyhow::Result<String> {
        body["preset"] = json!("private_chat");
        let reply = self.matrix.post(who, "/createRoom", body).await?;
        reply["room_id"].as_str().map(str::to_owned).context("createRoom: no `room_id`")
    }

    /// Sends an `m.room.message` and prints `what` as the sender's line.
    async fn send(
        &self,
        who: &Session,
        room: &str,
        content: &Value,
        what: &str,
    ) -> anyhow::Result<String> {
        let event_id = self.matrix.send(who, room, "m.room.message", content.clone()).await?;
        let name = localpart(who);
        self.out.line(if name == "alice" { Style::Magenta } else { Style::Blue }, name, what);
        Ok(event_id)
    }

    /// Waits until `who` has exactly `n` pushers.
    async fn wait_for_pushers(&self, who: &Session, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let pushers = self.matrix.get(who, "/pushers").await?;
            let count = pushers["pushers"].as_array().map_or(0, Vec::len);
            if count == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "expected {n} pushers after the gateway's rejection, the homeserver has {count}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Prints which of `who`'s push rules decides `event`: the rules the homeserver reports, run
    /// through the engine the homeserver runs (without power levels, which only `@room` needs).
    async fn explain(
        &self,
        who: &Session,
        display_name: &str,
        event: &Value,
        member_count: u64,
    ) -> anyhow::Result<()> {
        let rules: Ruleset =
            serde_json::from_value(self.matrix.get(who, "/pushrules/global/").await?)
                .context("GET /pushrules/global/: not a rule set")?;
        let compiled = CompiledRuleset::compile(&rules, &who.user_id);
        let name = DisplayName::new(display_name);
        let room = RoomCtx {
            member_count: Some(member_count),
            display_name: Some(&name),
            power_levels: None,
        };
        let user = localpart(who);
        let text = match compiled.evaluate(&FlatEvent::new(event), &room) {
            None => format!("{user} ← no rule matches: no notification"),
            Some(m) if m.actions.is_empty() => {
                let id = if m.rule_id.starts_with('.') {
                    m.rule_id.to_owned()
                } else {
                    short(m.rule_id)
                };
                format!("{user} ← {} rule {id}: no actions, no notification", m.kind.as_str())
            }
            Some(m) => format!("{user} ← {} ({})", m.rule_id, describe(m.actions)),
        };
        self.out.line(Style::Yellow, "push rules", &text);
        Ok(())
    }

    async fn mark(&self) -> anyhow::Result<Mark> {
        Ok(Mark {
            apns: self.apns.pushes.count(),
            fcm: self.fcm.messages.count(),
            counters: self.metrics.settled().await?,
        })
    }

    /// Waits for `apns` more APNs pushes and `fcm` more FCM messages than at `mark`, then prints
    /// what reached the gateway, what it sent, and what each phone shows.
    async fn expect(
        &self,
        mark: &Mark,
        step: &str,
        apns: usize,
        fcm: usize,
    ) -> anyhow::Result<(Vec<ApnsPush>, Vec<FcmMessage>)> {
        let (apns_arrived, fcm_arrived) = tokio::join!(
            self.apns.pushes.wait_for(mark.apns + apns, WAIT),
            self.fcm.messages.wait_for(mark.fcm + fcm, WAIT),
        );
        let apns_got = self.apns.pushes.since(mark.apns);
        let fcm_got = self.fcm.messages.since(mark.fcm);
        if !apns_arrived || !fcm_arrived {
            bail!(
                "{step}: expected {apns} APNs push(es) and {fcm} FCM message(s) within {} s, \
                 {} and {} arrived",
                WAIT.as_secs(),
                apns_got.len(),
                fcm_got.len()
            );
        }
        let (was, now) = (mark.counters, self.metrics.settled().await?);
        let notifies = now.notifications - was.notifications;
        let devices = now.devices - was.devices;
        let each = if notifies == devices {
            "1 device each".to_owned()
        } else {
            format!("{devices} devices")
        };
        let status =
            if now.answered_ok - was.answered_ok == notifies { "200" } else { "not all 200" };
        let out = &self.out;
        out.line(
            Style::Cyan,
            "homeserver → gateway",
            &format!("{notifies} × POST {NOTIFY_PATH}, {each} → {status}"),
        );
        for push in &apns_got {
            let (style, answer) = match push.status {
                200 => (Style::Green, "200".to_owned()),
                410 => (Style::Red, "410 Unregistered".to_owned()),
                other => (Style::Red, other.to_string()),
            };
            let sent = out::apns_summary(&push.payload, push.priority.as_deref());
            let name = self.phone(&push.token).map_or("?", |p| p.name);
            let line = format!("{name:<9} {sent} → {}", out.paint(style, &answer));
            out.line(Style::Cyan, "gateway → APNs", &line);
        }
        for message in &fcm_got {
            let name = self.fcm_phone(message).map_or("?", |p| p.name);
            let sent = out::fcm_summary(&message.message);
            let line = format!("{name:<9} {sent} → {}", out.paint(Style::Green, "200"));
            out.line(Style::Cyan, "gateway → FCM", &line);
        }
        if now.rejected > was.rejected {
            let dead: Vec<String> = apns_got
                .iter()
                .filter(|p| p.status == 410)
                .filter_map(|p| self.phone(&p.token))
                .map(|p| format!("\"{}\"", short(&p.pushkey)))
                .collect();
            let line = format!("{{\"rejected\": [{}]}}", dead.join(", "));
            out.line(Style::Red, "gateway → homeserver", &line);
        }
        for push in apns_got.iter().filter(|p| p.status == 200) {
            let name = self.phone(&push.token).map_or("?", |p| p.name);
            out.line(Style::Green, &format!("on the {name}"), &out::apns_phone(&push.payload));
        }
        for message in &fcm_got {
            let name = self.fcm_phone(message).map_or("?", |p| p.name);
            out.line(Style::Green, &format!("on the {name}"), &out::fcm_phone(&message.message));
        }
        Ok((apns_got, fcm_got))
    }

    fn phone(&self, provider_token: &str) -> Option<&Phone> {
        self.phones.iter().find(|p| p.provider_token == provider_token)
    }

    fn fcm_phone(&self, message: &FcmMessage) -> Option<&Phone> {
        self.phone(message.message["token"].as_str()?)
    }
}

/// `alice` for `@alice:demo.local`.
fn localpart(who: &Session) -> &str {
    who.user_id.trim_start_matches('@').split(':').next().unwrap_or("?")
}

/// `notify, sound=default, highlight`.
fn describe(actions: &[Action]) -> String {
    let parts: Vec<String> = actions
        .iter()
        .map(|a| match a {
            Action::Notify => "notify".to_owned(),
            Action::SetTweak { name, value: None | Some(Value::Bool(true)) } => name.clone(),
            Action::SetTweak { name, value: Some(Value::String(s)) } => format!("{name}={s}"),
            Action::SetTweak { name, value: Some(v) } => format!("{name}={v}"),
            Action::Unknown(v) => v.to_string(),
        })
        .collect();
    parts.join(", ")
}
