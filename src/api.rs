//! The server API for backends, on the HTTP side port under `/api/v1`, authenticated
//! with the API key (`Authorization: Bearer KEY`). Same validation, limits and
//! error codes as the protocol; errors are JSON `{"code", "name", "message"}`.
//! docs/API.md has request and response examples.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::auth::ApiKey;
use crate::ids::{RoomId, UserId};
use crate::protocol::ErrorCode;
use crate::protocol::v1;
use crate::services::notify::NewNotification;
use crate::services::{ServiceError, ServiceResult, Services};

/// What the API handlers need.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The key backends must present.
    pub key: ApiKey,
    /// The services.
    pub services: Arc<Services>,
    /// Served at `/api/v1/stats`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The routes of `/api/v1`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/notifications", post(create_notification))
        .route("/api/v1/rooms/{room_id}/messages", post(post_message))
        .route(
            "/api/v1/rooms/{room_id}/participants",
            get(participants).post(add_participant),
        )
        .route("/api/v1/presence/{user_id}", get(presence))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/events", post(track_events))
        .route("/api/v1/analytics/series", get(analytics_series))
        .route("/api/v1/analytics/top", get(analytics_top))
        .route("/api/v1/analytics/users", get(analytics_users))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ))
        .with_state(state)
}

/// An error answer: the protocol's code and name, and an HTTP status.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// The protocol error code (docs/PROTOCOL.md).
    pub code: u32,
    /// Its name.
    pub name: String,
    /// For people.
    pub message: String,
}

struct Failure(StatusCode, ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::InvalidOperation | ErrorCode::UnknownEventType => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::LimitExceeded => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Self {
        Failure(
            status_of(e.code),
            ApiError {
                code: e.code as u32,
                name: e.code.name().into(),
                message: e.message,
            },
        )
    }
}

/// A JSON body whose rejection is the API's `BAD_REQUEST` error.
struct ApiJson<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = Failure;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Failure> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| ApiJson(v))
            .map_err(|e| Failure::from(ServiceError::bad_request(e.body_text())))
    }
}

/// Refuses requests without the API key (401, before any handler runs).
async fn require_key(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(k) if state.key.verify(k.trim()) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(ApiError {
                code: crate::protocol::CloseCode::Unauthorized as u32,
                name: "UNAUTHORIZED".into(),
                message: "missing or wrong API key".into(),
            }),
        )
            .into_response(),
    }
}

/// `POST /api/v1/notifications` body.
#[derive(Debug, Deserialize)]
pub struct NotificationRequest {
    /// Who gets it.
    pub user_id: String,
    /// The notification.
    #[serde(flatten)]
    pub notification: NewNotification,
}

/// A notification as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct NotificationJson {
    /// `"<user_id>:<offset>"`.
    pub notification_id: String,
    /// The user's offset.
    pub offset: u64,
    /// Kind.
    pub kind: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// JSON data (as a string).
    pub data: String,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// The longest `Idempotency-Key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The `Idempotency-Key` header: absent, or 1-128 visible ASCII characters.
fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ServiceError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ServiceError::bad_request(format!(
            "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))
    };
    let key = value.to_str().map_err(|_| bad())?;
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

/// Runs `work`, a request that changes state, on a task of its own and waits for
/// it. A backend that hangs up makes the HTTP server drop its handler; a request
/// already started still finishes then (committed, published, counted), as one
/// whose caller waited, and never half-way (stored but not yet pushed) until some
/// later request catches it up.
async fn to_the_end<T, F>(
    services: &Arc<Services>,
    work: impl FnOnce(Arc<Services>) -> F,
) -> ServiceResult<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = ServiceResult<T>> + Send + 'static,
{
    tokio::spawn(work(services.clone()))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "an API request's task failed");
            Err(ServiceError::internal("the request failed"))
        })
}

/// Creates a notification. With an `Idempotency-Key` header, a retry with the
/// same key for the same user gets the first answer (with `Idempotent-Replayed:
/// true`) and creates nothing.
async fn create_notification(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<NotificationRequest>,
) -> Response {
    let user = match UserId::parse(req.user_id.as_str()) {
        Ok(u) => u,
        Err(e) => return Failure::from(ServiceError::from(e)).into_response(),
    };
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(e) => return Failure::from(e).into_response(),
    };
    let created = to_the_end(&s.services, |services| async move {
        services
            .api_notify(&user, req.notification, key.as_deref())
            .await
    });
    match created.await {
        Ok((n, replayed)) => (
            StatusCode::CREATED,
            [(
                "idempotent-replayed",
                if replayed { "true" } else { "false" },
            )],
            Json(NotificationJson {
                notification_id: n.notification_id,
                offset: n.offset,
                kind: n.kind,
                title: n.title,
                body: n.body,
                data: n.data,
                created_at_ms: n.created_at_ms,
            }),
        )
            .into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `POST /api/v1/rooms/{room_id}/messages` body.
#[derive(Debug, Deserialize)]
pub struct MessageRequest {
    /// The text.
    pub text: String,
}

/// A chat message as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageJson {
    /// The room.
    pub room_id: String,
    /// Its offset in the room.
    pub offset: u64,
    /// `"<room_id>:<offset>"`.
    pub message_id: String,
    /// Empty for system messages.
    pub sender_id: String,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// Sent through this API.
    pub system: bool,
}

impl From<v1::ChatMessage> for MessageJson {
    fn from(m: v1::ChatMessage) -> Self {
        Self {
            room_id: m.room_id,
            offset: m.offset,
            message_id: m.message_id,
            sender_id: m.sender_id,
            text: m.text,
            sent_at_ms: m.sent_at_ms,
            system: m.system,
        }
    }
}

async fn post_message(
    State(s): State<ApiState>,
    Path(room_id): Path<String>,
    ApiJson(req): ApiJson<MessageRequest>,
) -> Response {
    let room = match RoomId::parse(room_id) {
        Ok(r) => r,
        Err(e) => return Failure::from(ServiceError::from(e)).into_response(),
    };
    let posted = to_the_end(&s.services, |services| async move {
        services.api_post(&room, req.text).await
    });
    match posted.await {
        Ok(m) => (StatusCode::CREATED, Json(MessageJson::from(m))).into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `GET /api/v1/rooms/{room_id}/participants` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ParticipantsJson {
    /// The room.
    pub room_id: String,
    /// Its participants.
    pub participants: Vec<String>,
}

async fn participants(State(s): State<ApiState>, Path(room_id): Path<String>) -> Response {
    let room = match RoomId::parse(room_id.as_str()) {
        Ok(r) => r,
        Err(e) => return Failure::from(ServiceError::from(e)).into_response(),
    };
    match s.services.chat.participants(&room).await {
        Ok(p) => Json(ParticipantsJson {
            room_id,
            participants: p,
        })
        .into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `POST /api/v1/rooms/{room_id}/participants` body.
#[derive(Debug, Deserialize)]
pub struct AddParticipantRequest {
    /// Who joins.
    pub user_id: String,
    /// Also make them a room admin.
    #[serde(default)]
    pub admin: bool,
}

/// Adds a participant directly, without an invitation: the API key makes the
/// caller a trusted backend, which has its users' consent by its own means.
/// Answers the room's participants.
async fn add_participant(
    State(s): State<ApiState>,
    Path(room_id): Path<String>,
    ApiJson(req): ApiJson<AddParticipantRequest>,
) -> Response {
    let (room, user) = match (RoomId::parse(room_id), UserId::parse(req.user_id)) {
        (Ok(r), Ok(u)) => (r, u),
        (Err(e), _) | (_, Err(e)) => return Failure::from(ServiceError::from(e)).into_response(),
    };
    let added = to_the_end(&s.services, |services| async move {
        services.api_add_member(&room, &user, req.admin).await
    });
    match added.await {
        Ok(r) => Json(ParticipantsJson {
            room_id: r.room_id,
            participants: r.participants,
        })
        .into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `GET /api/v1/presence/{user_id}` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceJson {
    /// The user.
    pub user_id: String,
    /// `online`, `away`, `do_not_disturb` or `offline`.
    pub status: String,
    /// When the last device left (0: online now or never seen).
    pub last_seen_ms: u64,
}

async fn presence(State(s): State<ApiState>, Path(user_id): Path<String>) -> Response {
    let user = match UserId::parse(user_id.as_str()) {
        Ok(u) => u,
        Err(e) => return Failure::from(ServiceError::from(e)).into_response(),
    };
    match s.services.presence.presence_of(user.as_str()).await {
        Ok(p) => {
            let status = match v1::PresenceStatus::try_from(p.status) {
                Ok(v1::PresenceStatus::Online) => "online",
                Ok(v1::PresenceStatus::Away) => "away",
                Ok(v1::PresenceStatus::DoNotDisturb) => "do_not_disturb",
                _ => "offline",
            };
            Json(PresenceJson {
                user_id,
                status: status.into(),
                last_seen_ms: p.last_seen_ms,
            })
            .into_response()
        }
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `GET /api/v1/stats`: p50/p90/p99/p99.9/max of every latency histogram, in ms.
async fn stats(State(s): State<ApiState>) -> Response {
    Json(s.metrics.stats()).into_response()
}

/// `POST /api/v1/events` body.
#[derive(Debug, Deserialize)]
pub struct EventsRequest {
    /// The events (each may name its `user`).
    pub events: Vec<crate::services::analytics::NewEvent>,
}

/// `POST /api/v1/events` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventsResponse {
    /// Occurrences counted.
    pub accepted: u64,
}

async fn track_events(State(s): State<ApiState>, ApiJson(req): ApiJson<EventsRequest>) -> Response {
    match s.services.analytics.track(None, None, &req.events) {
        Ok(accepted) => Json(EventsResponse { accepted }).into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `GET /api/v1/analytics/series` query.
#[derive(Debug, Deserialize)]
pub struct SeriesQuery {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `key=value`, optional.
    #[serde(default)]
    pub dimension: String,
    /// How far back, e.g. `15m`.
    #[serde(with = "crate::clock::duration_str")]
    pub duration: std::time::Duration,
    /// Point width, e.g. `1m` (default: the bucket width).
    #[serde(default, with = "crate::clock::duration_str::option")]
    pub resolution: Option<std::time::Duration>,
}

/// A query's duration in milliseconds; one past 2^64-1 ms is 2^64-1 ms (longer than
/// any history), never a truncated number.
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn analytics_series(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<SeriesQuery>,
) -> Response {
    let resolution = q.resolution.map_or(0, millis);
    match s
        .services
        .analytics
        .series(&q.kind, &q.dimension, millis(q.duration), resolution)
        .await
    {
        Ok(series) => Json(series).into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `GET /api/v1/analytics/top` and `/users` query.
#[derive(Debug, Deserialize)]
pub struct WindowQuery {
    /// How far back, e.g. `1h`.
    #[serde(with = "crate::clock::duration_str")]
    pub window: std::time::Duration,
    /// At most this many types (top only; default 10, at most 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// An event type and its count.
#[derive(Debug, Serialize, Deserialize)]
pub struct TypeCount {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Occurrences in the window.
    pub count: u64,
}

async fn analytics_top(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<WindowQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(10).clamp(1, 100);
    match s.services.analytics.top(millis(q.window), limit).await {
        Ok(types) => Json(
            types
                .into_iter()
                .map(|(kind, count)| TypeCount { kind, count })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}

/// `GET /api/v1/analytics/users` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct UsersJson {
    /// Estimated distinct users (HyperLogLog, about 3% standard error).
    pub estimate: u64,
    /// The window covered, ms.
    pub window_ms: u64,
}

async fn analytics_users(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<WindowQuery>,
) -> Response {
    match s.services.analytics.distinct_users(millis(q.window)).await {
        Ok((estimate, window_ms)) => Json(UsersJson {
            estimate,
            window_ms,
        })
        .into_response(),
        Err(e) => Failure::from(e).into_response(),
    }
}
