//! The HTTP side port: health, readiness, Prometheus metrics, the certificate pin,
//! the development token endpoint, and the static web client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::services::ServeDir;

use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tls::CertStore;

/// Lifetime of tokens minted by the development endpoint.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Token minting (development mode only: `Auth::is_development`).
    pub auth: Auth,
    /// The certificate whose pin is published.
    pub certs: Arc<CertStore>,
    /// Rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Checked by `/readyz`.
    pub store: Store,
    /// Checked by `/readyz`: a node whose writer has stopped cannot commit.
    pub writer: crate::store::WriterProbe,
    /// Set once the QUIC endpoint accepts; cleared when draining.
    pub ready: Arc<AtomicBool>,
    /// The WebTransport URL clients should use.
    pub webtransport_url: String,
    /// The raw QUIC address.
    pub quic_addr: SocketAddr,
    /// This node's id.
    pub node_id: String,
    /// The built web client.
    pub web_dir: PathBuf,
    /// The server API.
    pub api: crate::api::ApiState,
    /// The cluster this node belongs to, if any: `/cluster`, and `/readyz`
    /// requires its connection.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The router of the side port.
pub fn router(state: HttpState) -> Router {
    let web = ServeDir::new(&state.web_dir).fallback(get(no_web_client).with_state(state.clone()));
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/cert-hash", get(cert_hash))
        .route("/api/info", get(info))
        .route("/cluster", get(cluster_nodes))
        // Unknown API paths are 404 whatever the method (not the static files' 405).
        .route(
            "/api/{*rest}",
            any(|| async { (StatusCode::NOT_FOUND, "no such endpoint\n") }),
        );
    // The endpoint does not exist at all with a configured (production) secret.
    if state.auth.is_development() {
        router = router.route("/api/dev/token", post(dev_token));
    }
    let api = crate::api::router(state.api.clone());
    // The dashboard and the connection diagnostic; their scripts and styles come
    // from the web directory.
    let dashboard = tower_http::services::ServeFile::new(state.web_dir.join("dashboard.html"));
    let debug = tower_http::services::ServeFile::new(state.web_dir.join("debug.html"));
    router
        .route_service("/dashboard", dashboard)
        .route_service("/debug", debug)
        .fallback_service(web)
        .with_state(state)
        .merge(api)
}

/// What one client may hold of the side port.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// The largest request body (larger: 413), on every route.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long requests in progress may take to finish once shutdown starts.
    pub drain: Duration,
}

/// Counts an HTTP connection in `Metrics::http_open` while it is open.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.http_open.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.http_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` until `stop` fires, within `limits`. Then it
/// accepts no more connections, lets requests in progress finish for at most
/// `limits.drain`, and drops the connections still open (a client that never
/// completes its request cannot hold shutdown up).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    // `RequestBodyLimitLayer` refuses a body over the limit whoever reads it (413
    // from its Content-Length, or an error while streaming); `DefaultBodyLimit`
    // sets the same bound for axum's extractors, whose own default is 2 MB.
    let router = router
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        let open = OpenConnection::new(metrics.clone());
        connections.spawn(async move {
            // Dropped in reverse: the place is free before the count of open
            // connections falls, so whoever sees that count fall can use it.
            let _open = open;
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            // axum::serve has no header timeout; hyper's own connection builder
            // does, once it has a timer.
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.cancelled() => {}
            }
            // Finishes the request in progress, then closes; an idle connection
            // closes at once.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        tracing::debug!(
            left = connections.len(),
            "HTTP connections still open after the drain; closing them"
        );
    }
    connections.shutdown().await;
}

/// `GET /cluster`: the live nodes (public, no secrets): where a client may
/// connect and how loaded each node is. A single node lists itself.
async fn cluster_nodes(State(s): State<HttpState>) -> Response {
    let nodes = match &s.cluster {
        Some(c) => c.nodes(),
        None => vec![crate::cluster::NodeInfo {
            id: s.node_id.clone(),
            quic: s.quic_addr.to_string(),
            webtransport_url: s.webtransport_url.clone(),
            cert_hash: s.certs.pin_hex(),
            http: String::new(),
            sessions: (s.metrics.active(crate::transport::TransportKind::Quic)
                + s.metrics
                    .active(crate::transport::TransportKind::WebTransport))
            .max(0) as u64,
            draining: false,
            updated_ms: crate::util::unix_millis(),
        }],
    };
    (
        [(axum::http::header::CACHE_CONTROL, "public, max-age=1")],
        Json(serde_json::json!({ "node_id": s.node_id, "nodes": nodes })),
    )
        .into_response()
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let cluster_ready = s.cluster.as_ref().is_none_or(|c| c.is_ready());
    if s.ready.load(Ordering::Acquire)
        && cluster_ready
        && s.store.is_healthy()
        && s.writer.is_running()
    {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// One certificate pin, in the shape of WebTransport's `serverCertificateHashes`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertHash {
    /// Always `sha-256`.
    pub algorithm: String,
    /// Lowercase hex of the SHA-256 of the certificate's DER.
    pub value: String,
}

/// The body of `GET /cert-hash`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertHashes {
    /// The pins to accept, newest first.
    pub hashes: Vec<CertHash>,
}

async fn cert_hash(State(s): State<HttpState>) -> Response {
    let body = CertHashes {
        hashes: vec![CertHash {
            algorithm: "sha-256".into(),
            value: s.certs.pin_hex(),
        }],
    };
    // Pins change on rotation: clients must not cache them.
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// The body of `GET /api/info`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Info {
    /// The WebTransport URL.
    pub webtransport: String,
    /// The raw QUIC address (ALPN `tutti/1`).
    pub quic: String,
    /// This node's id.
    pub node_id: String,
    /// Whether `POST /api/dev/token` exists.
    pub dev_mode: bool,
}

async fn info(State(s): State<HttpState>) -> Json<Info> {
    Json(Info {
        webtransport: s.webtransport_url.clone(),
        quic: s.quic_addr.to_string(),
        node_id: s.node_id.clone(),
        dev_mode: s.auth.is_development(),
    })
}

#[derive(Debug, Deserialize)]
struct DevTokenRequest {
    user: String,
    /// Refused when not empty: anyone who reaches the endpoint could otherwise
    /// grant themselves `metrics`. Role tokens come from `tutti token --role`.
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Debug, Serialize)]
struct DevTokenResponse {
    token: String,
}

/// `POST /api/dev/token {"user": NAME}`: a token without roles. A request for
/// roles is refused with 403 `PERMISSION_DENIED`; a bad name with 400 `BAD_REQUEST`.
async fn dev_token(State(s): State<HttpState>, Json(req): Json<DevTokenRequest>) -> Response {
    use crate::protocol::ErrorCode;
    let refuse = |status: StatusCode, code: ErrorCode, message: String| {
        (
            status,
            Json(crate::api::ApiError {
                code: code as u32,
                name: code.name().into(),
                message,
            }),
        )
            .into_response()
    };
    if !req.roles.is_empty() {
        return refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::PermissionDenied,
            "development tokens carry no roles: mint one with `tutti token --role ROLE`".into(),
        );
    }
    let ttl = DEV_TOKEN_TTL.min(s.auth.policy().max_lifetime);
    match s.auth.mint(req.user.trim(), ttl, &[]) {
        Ok(token) => Json(DevTokenResponse { token }).into_response(),
        Err(e) => refuse(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
    }
}

async fn no_web_client(State(s): State<HttpState>) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "The web client is not built in {}. Build it with: npm --prefix web ci && npm --prefix web run build\n",
            s.web_dir.display()
        ),
    )
        .into_response()
}
