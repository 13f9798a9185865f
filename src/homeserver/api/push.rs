//! Push routes: pushers (`GET /pushers`, `POST /pushers/set`), `GET /notifications`, and the
//! push-rules API (`/pushrules/…`). Rule editing itself is `pushrules::edit` (pure); this
//! module loads the user's stored rules, applies the edit, and saves them, which also bumps
//! `m.push_rules` in `/sync`.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::{ApiResult, MatrixError};
use super::{Auth, JsonObject, Path, query_param};
use crate::homeserver::pusher::{Pusher, PusherChange, PusherError, PusherSet};
use crate::homeserver::pushrules::edit::{self, EditError, NewRule};
use crate::homeserver::pushrules::{Action, PushRule, RuleKind, Ruleset};
use crate::homeserver::{Homeserver, now_ms, store};

impl From<PusherError> for MatrixError {
    fn from(err: PusherError) -> Self {
        MatrixError::new(err.status(), err.errcode(), err.to_string())
    }
}

impl From<EditError> for MatrixError {
    fn from(err: EditError) -> Self {
        let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::BAD_REQUEST);
        MatrixError::new(status, err.errcode(), err.to_string())
    }
}

/// Each pusher is a task and a POST per notification: a user gets a bounded number.
pub const MAX_PUSHERS_PER_USER: usize = 20;

pub async fn get_pushers(State(hs): State<Homeserver>, auth: Auth) -> ApiResult<Json<Value>> {
    let rows = hs.db(move |_, conn| Ok(store::pushers_of(conn, &auth.user_id)?)).await?;
    let pushers: Vec<Value> = rows.into_iter().map(|r| r.json).collect();
    Ok(Json(json!({ "pushers": pushers })))
}

/// `POST /pushers/set`: creates, updates (same app id and pushkey) or deletes (`kind: null`).
pub async fn set_pusher(
    State(hs): State<Homeserver>,
    auth: Auth,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let change = PusherSet::parse(&Value::Object(body), hs.config().allow_insecure_pushers)?;
    hs.db(move |hs, conn| {
        match change {
            PusherChange::Delete { app_id, pushkey } => {
                if let Some(id) = store::delete_pusher(conn, &auth.user_id, &app_id, &pushkey)? {
                    hs.queues().stop(id);
                }
            }
            PusherChange::Set { pusher, append } => {
                let existing = store::pushers_of(conn, &auth.user_id)?;
                let replaces = existing
                    .iter()
                    .any(|p| p.app_id == pusher.app_id && p.pushkey == pusher.pushkey);
                if !replaces && existing.len() >= MAX_PUSHERS_PER_USER {
                    return Err(MatrixError::new(
                        StatusCode::BAD_REQUEST,
                        "M_LIMIT_EXCEEDED",
                        format!("a user can have at most {MAX_PUSHERS_PER_USER} pushers"),
                    ));
                }
                let json = serde_json::to_value(&pusher)
                    .map_err(|e| MatrixError::bad_json(e.to_string()))?;
                let tx = conn.transaction()?;
                let (id, removed) = store::upsert_pusher(
                    &tx,
                    &auth.user_id,
                    &pusher.app_id,
                    &pusher.pushkey,
                    &json,
                    append,
                    now_ms(),
                )?;
                tx.commit()?;
                for old in removed {
                    hs.queues().stop(old);
                }
                hs.queues().start(hs, id);
            }
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

/// `GET /notifications?from=&limit=&only=highlight`, newest first.
pub async fn notifications(
    State(hs): State<Homeserver>,
    auth: Auth,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = query.as_deref();
    let before = match query_param(query, "from").filter(|f| !f.is_empty()) {
        None => i64::MAX,
        Some(from) => from.parse().map_err(|_| {
            MatrixError::invalid_param(format!("`from` token {from:?} is not one this server gave"))
        })?,
    };
    let limit = match query_param(query, "limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| MatrixError::invalid_param("`limit` must be a positive integer"))?
            .clamp(1, 1000),
    };
    let only_highlight = query_param(query, "only").as_deref() == Some("highlight");
    let user = auth.user_id.clone();
    let rows = hs
        .db(move |_, conn| {
            Ok(store::notifications(conn, &user, before, limit + 1, only_highlight)?)
        })
        .await?;
    let more = rows.len() > limit;
    let rows = &rows[..rows.len().min(limit)];
    let next_token = if more { rows.last().map(|r| r.event_stream.to_string()) } else { None };
    let pushers = hs.db(move |_, conn| Ok(store::pushers_of(conn, &auth.user_id)?)).await?;
    let profile_tag = pushers
        .iter()
        .find_map(|p| serde_json::from_value::<Pusher>(p.json.clone()).ok()?.profile_tag);
    let notifications: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut n = json!({
                "actions": r.actions, "event": r.event, "read": r.read, "room_id": r.room_id, "ts": r.ts,
            });
            if let Some(tag) = &profile_tag {
                n["profile_tag"] = json!(tag);
            }
            n
        })
        .collect();
    let mut body = json!({ "notifications": notifications });
    if let Some(token) = next_token {
        body["next_token"] = json!(token);
    }
    Ok(Json(body))
}

pub async fn all_rules(State(hs): State<Homeserver>, auth: Auth) -> ApiResult<Json<Value>> {
    let rules = hs.db(move |hs, conn| hs.merged_rules(conn, &auth.user_id)).await?;
    Ok(Json(json!({ "global": rules })))
}

pub async fn global_rules(State(hs): State<Homeserver>, auth: Auth) -> ApiResult<Json<Value>> {
    let rules = hs.db(move |hs, conn| hs.merged_rules(conn, &auth.user_id)).await?;
    Ok(Json(json!(rules)))
}

/// Loads the caller's stored rules, applies `f`, and saves them when it succeeds.
async fn edit_rules<T: Send + 'static>(
    hs: &Homeserver,
    user_id: String,
    f: impl FnOnce(&mut Ruleset, &str) -> Result<T, EditError> + Send + 'static,
) -> ApiResult<T> {
    hs.db(move |hs, conn| {
        let mut rules = hs.user_rules(conn, &user_id)?;
        let out = f(&mut rules, &user_id)?;
        hs.save_user_rules(conn, &user_id, &rules)?;
        Ok(out)
    })
    .await
}

fn kind_of(kind: &str) -> ApiResult<RuleKind> {
    Ok(edit::parse_kind(kind)?)
}

/// One rule as the caller sees it (a server default with the caller's changes applied).
async fn load_rule(hs: &Homeserver, auth: Auth, kind: &str, rule: String) -> ApiResult<PushRule> {
    let kind = kind_of(kind)?;
    hs.db(move |hs, conn| {
        let rules = hs.user_rules(conn, &auth.user_id)?;
        Ok(edit::get_rule(&rules, &auth.user_id, kind, &rule)?)
    })
    .await
}

pub async fn get_rule(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let found = load_rule(&hs, auth, &kind, rule).await?;
    Ok(Json(json!(found)))
}

pub async fn put_rule(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let kind = kind_of(&kind)?;
    let new = NewRule::from_json(kind, &rule, &Value::Object(body))?;
    let before = query_param(query.as_deref(), "before");
    let after = query_param(query.as_deref(), "after");
    edit_rules(&hs, auth.user_id, move |rules, _| {
        edit::put_rule(rules, kind, &rule, new, before.as_deref(), after.as_deref())
    })
    .await?;
    Ok(Json(json!({})))
}

pub async fn delete_rule(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = kind_of(&kind)?;
    edit_rules(&hs, auth.user_id, move |rules, _| edit::delete_rule(rules, kind, &rule)).await?;
    Ok(Json(json!({})))
}

pub async fn get_enabled(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let found = load_rule(&hs, auth, &kind, rule).await?;
    Ok(Json(json!({ "enabled": found.enabled })))
}

pub async fn put_enabled(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let kind = kind_of(&kind)?;
    let enabled = edit::enabled_from_body(&Value::Object(body))?;
    edit_rules(&hs, auth.user_id, move |rules, user| {
        edit::set_enabled(rules, user, kind, &rule, enabled)
    })
    .await?;
    Ok(Json(json!({})))
}

pub async fn get_actions(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let found = load_rule(&hs, auth, &kind, rule).await?;
    let actions: Vec<Value> = found.actions.iter().map(Action::to_json).collect();
    Ok(Json(json!({ "actions": actions })))
}

pub async fn put_actions(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((kind, rule)): Path<(String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let kind = kind_of(&kind)?;
    let actions = edit::actions_from_body(&Value::Object(body))?;
    edit_rules(&hs, auth.user_id, move |rules, user| {
        edit::set_actions(rules, user, kind, &rule, actions)
    })
    .await?;
    Ok(Json(json!({})))
}
