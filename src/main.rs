//! The `tutti` command: `serve`, `token`, `cert`, `track`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tutti::config::{Config, Overrides};

// mimalloc instead of the system allocator: QUIC allocates per packet and per frame,
// and glibc's malloc cost the server about 12% of its CPU at 10,000 deliveries/s
// (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tutti",
    version,
    about = "A real-time server over QUIC and WebTransport"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (embedded storage, development certificates unless configured).
    Serve(ServeArgs),
    /// Mint a token signed with this server's secret (the first of auth.keys, else
    /// auth.jwt_secret; with --dev and neither, the development secret).
    Token(TokenArgs),
    /// Print the SHA-256 pin of the current certificate.
    Cert(CommonArgs),
    /// Track analytics events as a native client (raw QUIC or WebTransport).
    Track(TrackArgs),
}

#[derive(Args)]
struct TrackArgs {
    /// The server's UDP address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    quic: std::net::SocketAddr,
    /// The certificate's SHA-256 pin, hex (as `tutti cert` or GET /cert-hash give it).
    #[arg(long)]
    pin: String,
    /// A token (as `tutti token` gives it).
    #[arg(long, env = "TUTTI_TOKEN")]
    token: String,
    /// The event type (repeatable: one event per type).
    #[arg(long = "type", required = true)]
    types: Vec<String>,
    /// Occurrences of each event.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// A dimension `key=value` added to each event (repeatable).
    #[arg(long = "dimension")]
    dimensions: Vec<String>,
    /// Connect over WebTransport instead of raw QUIC.
    #[arg(long)]
    webtransport: bool,
}

#[derive(Args)]
struct CommonArgs {
    /// A TOML configuration file.
    #[arg(long, env = "TUTTI_CONFIG")]
    config: Option<PathBuf>,
    /// Where the database and the development secret live [default: ./data].
    #[arg(long, env = "TUTTI_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where generated certificates are kept [default: ./certs].
    #[arg(long, env = "TUTTI_CERT_DIR")]
    cert_dir: Option<PathBuf>,
    /// A PEM certificate chain (with --key) instead of the generated one.
    #[arg(long, env = "TUTTI_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, env = "TUTTI_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Development mode: without a configured secret, use (or create) the one in the
    /// data directory; `serve` also offers POST /api/dev/token. Loopback addresses only.
    #[arg(long, env = "TUTTI_DEV")]
    dev: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// UDP address for WebTransport and raw QUIC [default: 127.0.0.1:4433].
    #[arg(long, env = "TUTTI_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// TCP address of the HTTP side port [default: 127.0.0.1:8080].
    #[arg(long, env = "TUTTI_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// The built web client served at / [default: ./web/dist].
    #[arg(long, env = "TUTTI_WEB_DIR")]
    web_dir: Option<PathBuf>,
    /// This node's id [default: generated once and kept in the database].
    #[arg(long, env = "TUTTI_NODE_ID")]
    node_id: Option<String>,
    /// Join the cluster on these NATS servers (nats://host:port, comma-separated)
    /// [default: a single node].
    #[arg(long = "cluster", env = "TUTTI_CLUSTER_URL")]
    cluster_url: Option<String>,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The user id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// How long the token is valid, e.g. 1h, 30m (at most auth.max_lifetime).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// A role to grant, e.g. metrics (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
}

fn load(common: &CommonArgs, mut overrides: Overrides) -> anyhow::Result<Config> {
    overrides.data_dir = common.data_dir.clone();
    overrides.cert_dir = common.cert_dir.clone();
    overrides.cert = common.cert.clone();
    overrides.key = common.key.clone();
    overrides.dev = common.dev;
    // Secrets come from the file or the environment, never from a flag (flags show in `ps`).
    overrides.jwt_secret = std::env::var("TUTTI_JWT_SECRET").ok();
    overrides.api_key = std::env::var("TUTTI_API_KEY").ok();
    Ok(Config::load(common.config.as_deref(), overrides)?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("TUTTI_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let config = load(
                &args.common,
                Overrides {
                    listen: args.listen,
                    http: args.http,
                    web_dir: args.web_dir.clone(),
                    node_id: args.node_id.clone(),
                    cluster_url: args.cluster_url.clone(),
                    ..Default::default()
                },
            )?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads())
                .enable_all()
                .build()?
                .block_on(tutti::server::serve_until_signal(config))
        }
        Command::Token(args) => {
            let config = load(&args.common, Overrides::default())?;
            let auth = tutti::auth::Auth::from_config(&config.auth, config.dev, &config.data_dir)
                .context("loading the token secret")?;
            anyhow::ensure!(
                args.ttl <= config.auth.max_lifetime,
                "--ttl {} is over auth.max_lifetime ({}): the server would refuse the token",
                humantime::format_duration(args.ttl),
                humantime::format_duration(config.auth.max_lifetime)
            );
            println!("{}", auth.mint(&args.user, args.ttl, &args.roles)?);
            Ok(())
        }
        Command::Track(args) => tokio::runtime::Runtime::new()?.block_on(track(args)),
        Command::Cert(common) => {
            let config = load(&common, Overrides::default())?;
            let certs = tutti::tls::CertStore::from_config(&config.tls)?;
            println!("{}", certs.pin_hex());
            Ok(())
        }
    }
}

async fn track(args: TrackArgs) -> anyhow::Result<()> {
    use tutti::client::{Client, ClientConfig, Trust, parse_pin};
    use tutti::protocol::v1::AnalyticsEvent;
    use tutti::transport::TransportKind;

    let pin = parse_pin(&args.pin).map_err(anyhow::Error::msg)?;
    let mut dimensions = std::collections::HashMap::new();
    for d in &args.dimensions {
        let (k, v) = d
            .split_once('=')
            .with_context(|| format!("--dimension {d}: expected key=value"))?;
        dimensions.insert(k.to_owned(), v.to_owned());
    }
    let transport = if args.webtransport {
        TransportKind::WebTransport
    } else {
        TransportKind::Quic
    };
    let config = ClientConfig::new(args.quic, transport, Trust::Pinned(vec![pin]), args.token);
    let client = Client::connect(config).await?;
    let events = args
        .types
        .iter()
        .map(|t| AnalyticsEvent {
            r#type: t.clone(),
            dimensions: dimensions.clone(),
            count: args.count,
        })
        .collect();
    let accepted = client.track(events).await?;
    client.close();
    println!("{accepted}");
    Ok(())
}
