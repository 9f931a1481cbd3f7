//! Assembles a node: database, certificates, the UDP endpoint with its gateway, the
//! HTTP side port, and the orderly shutdown of all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tracing::Instrument;

use crate::auth::Auth;
use crate::clock::Clock;
use crate::config::Config;
use crate::gateway::{Gateway, GatewayConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::services::{ServiceDeps, Services, ServicesConfig};
use crate::store::{Store, Writer, WriterOptions};
use crate::tls::CertStore;
use crate::transport::ServerEndpoint;
use crate::transport::endpoint::EndpointSettings;

/// A running node. Dropping it without [`shutdown`](Self::shutdown) aborts it.
#[derive(Debug)]
pub struct RunningServer {
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    config: Config,
    auth: Auth,
    certs: Arc<CertStore>,
    store: Store,
    metrics: Arc<Metrics>,
    gateway: Arc<Gateway>,
    services: Arc<Services>,
    writer: Writer,
    /// The group-commit threads: the main database's, and in a cluster the
    /// analytics database's.
    writer_threads: Vec<std::thread::JoinHandle<()>>,
    /// In a cluster, analytics counts live here (they are not in the log).
    analytics_store: Option<Store>,
    endpoint: ServerEndpoint,
    ready: Arc<AtomicBool>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    stop_accepting: CancellationToken,
    stop_background: CancellationToken,
    /// The node's tasks (endpoint, certificate rotation, the services' background
    /// work), stopped by `stop_accepting` and `stop_background`.
    tasks: TaskTracker,
    /// The HTTP port stops before the services' background work, so that what it
    /// accepted is in their last flush.
    stop_http: CancellationToken,
    http_task: tokio::task::JoinHandle<()>,
}

/// Starts a node with `config`. Returns once both ports accept.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    start_with_clock(config, Clock::System).await
}

/// [`start`] with the wall clock the services read (tests pass a manual one).
pub async fn start_with_clock(config: Config, clock: Clock) -> anyhow::Result<RunningServer> {
    start_inner(config, clock, None).await
}

/// [`start`] on a database whose storage fails when `faults` is armed (storage
/// fault tests).
#[doc(hidden)]
pub async fn start_with_faults(
    config: Config,
    faults: crate::store::fault::FaultSwitch,
) -> anyhow::Result<RunningServer> {
    start_inner(config, Clock::System, Some(faults)).await
}

async fn start_inner(
    config: Config,
    clock: Clock,
    faults: Option<crate::store::fault::FaultSwitch>,
) -> anyhow::Result<RunningServer> {
    // ring is the only rustls provider in the build; make it the process default so
    // code that builds a rustls config without naming one finds it.
    let _ = rustls::crypto::ring::default_provider().install_default();

    config.check_dev_mode()?;
    // In a cluster the database is a view of the command log, rebuilt at each
    // start (docs/CLUSTER.md); it lives apart from a single node's database.
    let db_dir = if config.cluster.enabled() {
        let dir = config.data_dir.join("cluster-view");
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("clearing {}", dir.display())),
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        dir
    } else {
        config.data_dir.clone()
    };
    let store = match faults {
        None => Store::open(&db_dir),
        Some(switch) => Store::open_with_faults(&db_dir, switch),
    }
    .with_context(|| format!("opening the database in {}", db_dir.display()))?;
    // In a cluster, analytics counts are this node's own, not commands of the log:
    // they live in a database beside the view, which survives restarts (and so
    // does the node id kept there).
    let analytics_store = if config.cluster.enabled() {
        let dir = config.data_dir.join("analytics");
        Some(
            Store::open(&dir)
                .with_context(|| format!("opening the analytics database in {}", dir.display()))?,
        )
    } else {
        None
    };
    let node_id = config.node_id.clone().unwrap_or_else(|| {
        analytics_store
            .as_ref()
            .unwrap_or(&store)
            .node_id()
            .to_owned()
    });
    let auth = Auth::from_config(&config.auth, config.dev, &config.data_dir)
        .context("loading the token secret")?;
    if auth.is_development() {
        tracing::warn!(
            "development mode: POST /api/dev/token mints tokens for any name; never expose this node"
        );
    }
    let certs = Arc::new(CertStore::from_config(&config.tls).context("loading certificates")?);
    let metrics = Arc::new(Metrics::default());

    let endpoint = ServerEndpoint::bind(
        config.listen,
        &certs,
        EndpointSettings {
            tickets: Some(Arc::new(crate::tls::tickets::SharedTicketer::new(
                auth.ticket_secret(),
                crate::tls::tickets::DEFAULT_PERIOD,
                metrics.tls_resumed.clone(),
            ))),
            idle_timeout: config.timeouts.idle,
            keep_alive: config.timeouts.heartbeat,
            handshake_timeout: config.timeouts.handshake,
            stream_receive_window: config.limits.stream_receive_window,
            connection_receive_window: config.limits.connection_receive_window,
            send_window: config.limits.send_window,
            retry_above_handshakes: config.limits.retry_above_handshakes,
            // Room for a burst of 64 datagrams of the largest size accepted.
            datagram_buffer: 64 * config.limits.max_datagram_size,
            congestion_control: config.limits.congestion_control,
            ack_delay: config.timeouts.ack_delay,
        },
        metrics.clone(),
    )
    .with_context(|| format!("binding UDP {}", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let commits = metrics.clone();
    let writer_options = WriterOptions {
        interval: config.commit_interval,
        quick_repair: config.quick_repair,
    };
    let (writer, writer_thread) = Writer::spawn_with(
        store.clone(),
        Some(Arc::new(move |writes, took| {
            commits.committed(writes, took)
        })),
        writer_options,
    );
    let mut writer_threads = vec![writer_thread];
    let analytics_writer = analytics_store.as_ref().map(|s| {
        let (w, thread) = Writer::spawn_with(s.clone(), None, writer_options);
        writer_threads.push(thread);
        (s.clone(), w)
    });
    let tasks = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let cluster_conn = if config.cluster.enabled() {
        Some(crate::cluster::Connection::connect(&config.cluster, &node_id).await?)
    } else {
        None
    };
    let hub = match &cluster_conn {
        Some(c) => {
            let hub = Arc::new(Hub::new(c.broker.clone()));
            c.broker.attach(Arc::downgrade(&hub));
            hub
        }
        None => Arc::new(Hub::default()),
    };
    let deps = ServiceDeps {
        store: store.clone(),
        writer: writer.clone(),
        hub,
        metrics: metrics.clone(),
        rates: Arc::new(crate::services::rate::RateLimits::new(
            &config.limits.rate,
            clock.clone(),
        )),
        clock,
        shutdown: stop_background.clone(),
    };
    let analytics_deps = match analytics_writer {
        Some((store, writer)) => ServiceDeps {
            store,
            writer,
            ..deps.clone()
        },
        None => deps.clone(),
    };
    let (services, background) =
        Services::open_with_analytics(deps, analytics_deps, ServicesConfig::from(&config))
            .context("opening the services")?;
    let services = Arc::new(services);
    // The services' own work runs with the node's other tasks and stops with them.
    for work in background {
        let name = work.name;
        tasks.spawn(
            work.task
                .instrument(tracing::debug_span!("background", name)),
        );
    }
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("binding TCP {}", config.http))?;
    let http_addr = listener.local_addr()?;
    let cluster = match cluster_conn {
        None => None,
        Some(conn) => {
            let (certs, sessions) = (certs.clone(), metrics.clone());
            let me = crate::cluster::SelfInfo {
                quic: config.cluster.public_addr.unwrap_or(quic_addr),
                http: http_addr,
                cert_hash: Arc::new(move || certs.pin_hex()),
                sessions: Arc::new(move || {
                    (sessions.active(crate::transport::TransportKind::Quic)
                        + sessions.active(crate::transport::TransportKind::WebTransport))
                    .max(0) as u64
                }),
            };
            Some(
                crate::cluster::Cluster::join(
                    conn,
                    services.clone(),
                    me,
                    &tasks,
                    stop_background.clone(),
                )
                .await
                .context("joining the cluster")?,
            )
        }
    };
    let gateway = Gateway::new(
        GatewayConfig {
            limits: config.limits.clone(),
            timeouts: config.timeouts.clone(),
            node_id: node_id.clone(),
        },
        auth.clone(),
        metrics.clone(),
        services.clone(),
    );
    if let Some(c) = &cluster {
        gateway.set_directory(c.clone());
    }

    let ready = Arc::new(AtomicBool::new(false));

    {
        let endpoint = endpoint.clone();
        let gateway = gateway.clone();
        let handshakes = TaskTracker::new();
        let stop = stop_accepting.clone();
        tasks.spawn(async move {
            endpoint
                .run(handshakes, stop, move |accepted| gateway.accept(accepted))
                .await
        });
    }
    tasks.spawn(
        certs
            .clone()
            .rotation_task(config.tls.check_interval, stop_background.clone()),
    );

    let router = crate::http::router(crate::http::HttpState {
        auth: auth.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        store: store.clone(),
        writer: writer.probe(),
        ready: ready.clone(),
        webtransport_url: webtransport_url(quic_addr),
        quic_addr,
        node_id,
        web_dir: config.web_dir.clone(),
        api: crate::api::ApiState {
            key: crate::auth::ApiKey::from_config(config.api.key.as_deref(), &config.data_dir)
                .context("loading the API key")?,
            services: services.clone(),
            metrics: metrics.clone(),
        },
        cluster: cluster.clone(),
    });
    let stop_http = CancellationToken::new();
    let http_stop = stop_http.clone();
    let http_task = tokio::spawn(crate::http::serve(
        listener,
        router,
        crate::http::HttpLimits {
            max_connections: config.limits.http_max_connections,
            max_body_bytes: config.limits.http_max_body_bytes,
            header_read_timeout: config.timeouts.http_header_read,
            drain: config.timeouts.drain,
        },
        metrics.clone(),
        http_stop,
    ));

    ready.store(true, Ordering::Release);
    Ok(RunningServer {
        quic_addr,
        http_addr,
        config,
        auth,
        certs,
        store,
        metrics,
        gateway,
        services,
        writer,
        writer_threads,
        analytics_store,
        endpoint,
        ready,
        cluster,
        stop_accepting,
        stop_background,
        tasks,
        stop_http,
        http_task,
    })
}

/// The WebTransport URL of a UDP address.
pub fn webtransport_url(addr: SocketAddr) -> String {
    format!("https://{addr}{}", crate::protocol::WEBTRANSPORT_PATH)
}

impl RunningServer {
    /// The UDP address of both transports.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The HTTP side port.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The WebTransport URL.
    pub fn webtransport_url(&self) -> String {
        webtransport_url(self.quic_addr)
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Token verification and minting.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The certificate store (pin, rotation).
    pub fn certs(&self) -> &Arc<CertStore> {
        &self.certs
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The services.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// The group-commit writer: [`Writer::hold`] pauses commits (maintenance, fault
    /// tests), [`Writer::in_flight`] counts writes waiting for their commit.
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.gateway.active()
    }

    /// Graceful shutdown: stop accepting, tell every session `GOING_AWAY`, wait up to
    /// `timeouts.drain` for them to close, close the endpoint, stop the HTTP port and
    /// close the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.ready.store(false, Ordering::Release);
        if let Some(c) = &self.cluster {
            // The others stop sending sessions here, and this node's sessions are
            // told where to go (with a spread-out delay) as they are closed.
            c.set_draining();
            c.wait_published().await;
        }
        self.stop_accepting.cancel();
        let drained = self.gateway.drain(self.config.timeouts.drain).await;
        if !drained {
            tracing::warn!(
                left = self.gateway.active(),
                "drain timed out; closing the remaining sessions"
            );
        }
        self.endpoint.close(self.config.timeouts.close_linger).await;
        self.stop_http.cancel();
        let _ = self.http_task.await;
        // The services' background work finishes (the last analytics flush) and
        // stops, with the node's other tasks.
        self.stop_background.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // Every write handle goes with the services; the writer thread then commits
        // what is queued and stops. The last database handle goes after it.
        let Self {
            store,
            gateway,
            services,
            writer,
            writer_threads,
            analytics_store,
            ..
        } = self;
        drop(writer);
        drop(gateway);
        drop(services);
        for thread in writer_threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        drop(store);
        drop(analytics_store);
        Ok(())
    }
}

/// Runs a node until SIGINT or SIGTERM, printing where everything is, then shuts it
/// down gracefully. This is `tutti serve`.
pub async fn serve_until_signal(config: Config) -> anyhow::Result<()> {
    let server = start(config).await?;
    let c = server.config();
    let http = server.http_addr();
    let certs = match server.certs().dir() {
        Some(dir) => format!(
            "{} (generated, sha-256 pin {})",
            dir.display(),
            server.certs().pin_hex()
        ),
        None => format!(
            "{} (sha-256 pin {})",
            c.tls
                .cert
                .as_deref()
                .unwrap_or(std::path::Path::new("?"))
                .display(),
            server.certs().pin_hex()
        ),
    };
    // Printing must not fail the server when nobody reads stdout any more.
    let mut banner = format!(
        "tutti {} serving node {}\n",
        env!("CARGO_PKG_VERSION"),
        server.store().node_id()
    );
    banner += &format!("  page:         http://{http}/\n");
    banner += &format!("  webtransport: {}\n", server.webtransport_url());
    banner += &format!("  raw quic:     {} (ALPN tutti/1)\n", server.quic_addr());
    banner += &format!("  metrics:      http://{http}/metrics\n");
    banner += &format!("  server api:   http://{http}/api/v1 (docs/API.md)\n");
    banner += &format!("  data:         {}\n", c.data_dir.display());
    banner += &format!("  certificates: {certs}\n");
    if server.auth().is_development() {
        banner += "  mode:         development (--dev: loopback only; POST /api/dev/token mints role-less tokens; role tokens: `tutti token --dev --user NAME --role ROLE`)\n";
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
