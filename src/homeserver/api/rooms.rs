//! Room routes: create, join, invite, leave, send, state, members, receipts and read markers.
//! Thin: each handler checks the request's shape and calls `homeserver::rooms`.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::{ApiResult, MatrixError};
use super::{Auth, JsonObject, Path, required_str};
use crate::homeserver::{Homeserver, rooms, store};

pub async fn create_room(
    State(hs): State<Homeserver>,
    auth: Auth,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let room_id = hs.db(move |hs, conn| rooms::create_room(hs, conn, &auth.user_id, &body)).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

pub async fn join(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(room): Path<String>,
) -> ApiResult<Json<Value>> {
    if !room.starts_with('!') {
        return Err(MatrixError::not_found("room aliases are not supported: join by room id"));
    }
    let room_id = room.clone();
    hs.db(move |hs, conn| rooms::join(hs, conn, &auth.user_id, &room)).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

pub async fn invite(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(room): Path<String>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let target = required_str(&body, "user_id")?.to_owned();
    hs.db(move |hs, conn| rooms::invite(hs, conn, &auth.user_id, &room, &target)).await?;
    Ok(Json(json!({})))
}

pub async fn leave(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(room): Path<String>,
) -> ApiResult<Json<Value>> {
    hs.db(move |hs, conn| rooms::leave(hs, conn, &auth.user_id, &room)).await?;
    Ok(Json(json!({})))
}

pub async fn send(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((room, kind, txn)): Path<(String, String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let event_id = hs
        .db(move |hs, conn| {
            rooms::send(
                hs,
                conn,
                (&auth.user_id, &auth.device_id),
                &room,
                &kind,
                &txn,
                Value::Object(body),
            )
        })
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn full_state(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(room): Path<String>,
) -> ApiResult<Json<Value>> {
    let state = hs
        .db(move |_, conn| {
            rooms::require_joined(conn, &room, &auth.user_id)?;
            Ok(store::room_state(conn, &room)?)
        })
        .await?;
    Ok(Json(Value::Array(state)))
}

pub async fn get_state(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((room, kind, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let event = hs
        .db(move |_, conn| {
            rooms::require_joined(conn, &room, &auth.user_id)?;
            store::state_event(conn, &room, &kind, &key)?
                .ok_or_else(|| MatrixError::not_found(format!("no {kind} state with key {key:?}")))
        })
        .await?;
    Ok(Json(event["content"].clone()))
}

pub async fn get_state_empty_key(
    hs: State<Homeserver>,
    auth: Auth,
    Path((room, kind)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    get_state(hs, auth, Path((room, kind, String::new()))).await
}

pub async fn put_state(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((room, kind, key)): Path<(String, String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let event_id = hs
        .db(move |hs, conn| {
            rooms::set_state(hs, conn, &auth.user_id, &room, &kind, &key, Value::Object(body))
        })
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn put_state_empty_key(
    hs: State<Homeserver>,
    auth: Auth,
    Path((room, kind)): Path<(String, String)>,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    put_state(hs, auth, Path((room, kind, String::new())), body).await
}

pub async fn joined_members(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(room): Path<String>,
) -> ApiResult<Json<Value>> {
    let members = hs
        .db(move |_, conn| {
            rooms::require_joined(conn, &room, &auth.user_id)?;
            Ok(store::joined_members(conn, &room)?)
        })
        .await?;
    let joined: serde_json::Map<String, Value> =
        members.into_iter().map(|(user, name)| (user, json!({ "display_name": name }))).collect();
    Ok(Json(json!({ "joined": joined })))
}

pub async fn receipt(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((room, kind, event)): Path<(String, String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    match body.get("thread_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(thread)) if thread == "main" => {}
        // A receipt inside a thread says nothing about the main timeline, and this server
        // keeps no per-thread counts: accepted, and it moves nothing.
        Some(Value::String(_)) => return Ok(Json(json!({}))),
        Some(_) => return Err(MatrixError::bad_json("`thread_id` must be a string")),
    }
    hs.db(move |hs, conn| rooms::receipt(hs, conn, &auth.user_id, &room, &kind, &event)).await?;
    Ok(Json(json!({})))
}

/// `POST /rooms/{roomId}/read_markers`: `m.read` and `m.read.private` act as receipts.
pub async fn read_markers(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(room): Path<String>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    let mut receipts = Vec::new();
    for kind in ["m.fully_read", "m.read", "m.read.private"] {
        match body.get(kind) {
            None | Some(Value::Null) => {}
            Some(Value::String(event)) => receipts.push((kind, event.clone())),
            Some(_) => return Err(MatrixError::bad_json(format!("`{kind}` must be an event id"))),
        }
    }
    hs.db(move |hs, conn| {
        for (kind, event) in receipts {
            rooms::receipt(hs, conn, &auth.user_id, &room, kind, &event)?;
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}
