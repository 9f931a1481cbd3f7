//! The server under test: one already running (`--target`), or a fresh `tutti serve`
//! started on free ports with a temporary data directory and known secrets
//! (`--spawn`), stopped (SIGTERM, then SIGKILL) when the run ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tutti::auth::{Auth, SecretSource};
use tutti::client::{ClientConfig, ClientEndpoint, Trust};
use tutti::transport::TransportKind;

/// Where and how to reach the server.
#[derive(Debug)]
pub struct Target {
    /// The UDP address (both transports).
    pub addr: SocketAddr,
    /// The HTTP side port, if known.
    pub http: Option<SocketAddr>,
    /// The certificate pin.
    pub pin: [u8; 32],
    /// Mints the clients' tokens.
    pub auth: Auth,
    /// The secret `auth` was made with, for a second `tutti-load` against the same
    /// server (`--alongside`).
    pub token_secret: Secret,
    /// The server API key, if known.
    pub api_key: Option<String>,
    /// The transport clients use.
    pub transport: TransportKind,
    /// The server's process id, when it runs on this host and is known.
    pub server_pid: Option<u32>,
    /// With `--cluster`: every node (UDP address, pin), clients spread over them
    /// round-robin; and the processes whose CPU counts as the server's (the
    /// nodes and the NATS server).
    cluster: Vec<(SocketAddr, [u8; 32])>,
    cluster_pids: Vec<u32>,
    next_node: AtomicUsize,
    /// Client connect and request timeout.
    pub client_timeout: Duration,
    /// UDP endpoints the clients share, round-robin (empty: one per client).
    endpoints: Vec<ClientEndpoint>,
    next_endpoint: AtomicUsize,
    spawned: Option<Spawned>,
}

#[derive(Debug)]
struct Spawned {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    /// With `--cluster`: the other nodes, then the NATS server.
    others: Vec<tokio::process::Child>,
}

/// A secret kept out of `Debug` output.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How to find an already running server.
#[derive(Debug, Clone)]
pub struct Existing {
    /// `--target`.
    pub addr: SocketAddr,
    /// `--pin`.
    pub pin: Option<String>,
    /// `--http`.
    pub http: Option<SocketAddr>,
    /// `--token-secret` / `TUTTI_JWT_SECRET`.
    pub secret: String,
    /// `--api-key` / `TUTTI_API_KEY`.
    pub api_key: Option<String>,
    /// `--server-pid`.
    pub pid: Option<u32>,
}

impl Target {
    /// Connects to an already running server.
    pub async fn existing(e: Existing, transport: TransportKind) -> anyhow::Result<Self> {
        let pin = match (&e.pin, e.http) {
            (Some(p), _) => tutti::client::parse_pin(p).map_err(anyhow::Error::msg)?,
            (None, Some(http)) => fetch_pin(http).await?,
            (None, None) => bail!("with --target, give --pin HEX or --http ADDR (for /cert-hash)"),
        };
        anyhow::ensure!(
            e.secret.len() >= 32,
            "the token secret must be at least 32 bytes"
        );
        Ok(Self {
            addr: e.addr,
            http: e.http,
            pin,
            auth: Auth::new(
                e.secret.as_bytes(),
                SecretSource::Configured,
                Duration::ZERO,
            ),
            token_secret: Secret(e.secret.clone()),
            api_key: e.api_key,
            transport,
            server_pid: e.pid,
            cluster: Vec::new(),
            cluster_pids: Vec::new(),
            next_node: AtomicUsize::new(0),
            client_timeout: Duration::from_secs(20),
            endpoints: Vec::new(),
            next_endpoint: AtomicUsize::new(0),
            spawned: None,
        })
    }

    /// Connects to a running cluster through `GET /cluster` on the HTTP side port
    /// `http` of any node: every live node's address and pin.
    pub async fn existing_cluster(
        http: SocketAddr,
        secret: String,
        api_key: Option<String>,
        transport: TransportKind,
    ) -> anyhow::Result<Self> {
        let (status, body) = crate::http::get(http, "/cluster").await?;
        anyhow::ensure!(status == 200, "GET /cluster: {status} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let mut nodes = Vec::new();
        for n in v["nodes"].as_array().context("no nodes in /cluster")? {
            if n["draining"] == true {
                continue;
            }
            let addr: SocketAddr = n["quic"].as_str().context("a node without quic")?.parse()?;
            let pin = tutti::client::parse_pin(n["cert_hash"].as_str().unwrap_or_default())
                .map_err(anyhow::Error::msg)?;
            nodes.push((addr, pin));
        }
        anyhow::ensure!(!nodes.is_empty(), "GET /cluster lists no live node");
        let mut t = Self::existing(
            Existing {
                addr: nodes[0].0,
                pin: Some(tutti::util::hex(&nodes[0].1)),
                http: Some(http),
                secret,
                api_key,
                pid: None,
            },
            transport,
        )
        .await?;
        t.cluster = nodes;
        Ok(t)
    }

    /// Starts `server_bin serve` on free loopback ports, with its data in a new
    /// temporary directory (under `parent` if given), and waits for its banner.
    pub async fn spawn(
        server_bin: PathBuf,
        parent: Option<&std::path::Path>,
        transport: TransportKind,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            server_bin.is_file(),
            "no server binary at {} (build it with `cargo build -p tutti`, or pass --server-bin)",
            server_bin.display()
        );
        let mut builder = tempfile::Builder::new();
        builder.prefix("tutti-load-");
        let dir = match parent {
            Some(p) => builder
                .tempdir_in(p)
                .with_context(|| format!("creating a directory in {}", p.display()))?,
            None => builder.tempdir()?,
        };
        let secret = tutti::util::random_hex(32);
        let api_key = tutti::util::random_hex(32);
        let mut cmd = serve_command(&server_bin, dir.path(), &secret, &api_key)?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", server_bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("server stdout")?;
        let banner = tokio::time::timeout(Duration::from_secs(60), read_banner(stdout)).await;
        let log = dir.path().join("server.log");
        let (addr, http, pin) = match banner {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let _ = child.kill().await;
                bail!("{e:#}; server log:\n{}", tail(&log));
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!("the server printed no banner in 60 s; log:\n{}", tail(&log));
            }
        };
        Ok(Self {
            addr,
            http: Some(http),
            pin,
            auth: Auth::new(secret.as_bytes(), SecretSource::Configured, Duration::ZERO),
            token_secret: Secret(secret.clone()),
            api_key: Some(api_key),
            transport,
            server_pid: pid,
            cluster: Vec::new(),
            cluster_pids: Vec::new(),
            next_node: AtomicUsize::new(0),
            client_timeout: Duration::from_secs(20),
            endpoints: Vec::new(),
            next_endpoint: AtomicUsize::new(0),
            spawned: Some(Spawned {
                child,
                dir,
                others: Vec::new(),
            }),
        })
    }

    /// A token for `user`, valid for a day.
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.auth.mint(user, Duration::from_secs(24 * 3600), &[])?)
    }

    /// The client configuration for `user`.
    pub fn client_config(&self, user: &str) -> anyhow::Result<ClientConfig> {
        // Spread over the nodes of a cluster, round-robin (one node otherwise).
        let node = self.next_node.fetch_add(1, Ordering::Relaxed);
        let mut c = self.client_config_on(user, node)?;
        if !self.endpoints.is_empty() {
            let i = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
            c.endpoint = Some(self.endpoints[i % self.endpoints.len()].clone());
        }
        Ok(c)
    }

    /// The UDP endpoints the clients share (empty: one per client).
    pub fn shared_endpoints(&self) -> Vec<ClientEndpoint> {
        self.endpoints.clone()
    }

    /// Makes the clients share `n` UDP endpoints (sockets), round-robin; 0 gives
    /// each client its own, as separate devices would have. Shared endpoints
    /// receive in batches and run one driver task each, so the generator spends
    /// its CPU on the clients' protocol work rather than on per-socket wakeups.
    pub fn share_endpoints(&mut self, n: usize) -> anyhow::Result<()> {
        let config = self.client_config("endpoint")?;
        self.endpoints = (0..n)
            .map(|_| ClientEndpoint::bind(&config))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("binding a client endpoint: {e}"))?;
        Ok(())
    }

    /// The server's own latency histograms (`GET /api/v1/stats`: group commit,
    /// fan-out, handshake, requests), recorded since the server started. `None`
    /// without the HTTP address and API key, or when the request fails.
    pub async fn server_stats(
        &self,
    ) -> Option<std::collections::BTreeMap<String, tutti::metrics::Percentiles>> {
        let (http, key) = (self.http?, self.api_key.as_deref()?);
        let fetch = async {
            let mut conn = crate::http::HttpConn::connect(http).await?;
            let (status, body) = conn
                .request("GET", "/api/v1/stats", None, Some(key))
                .await?;
            anyhow::ensure!(status == 200, "/api/v1/stats answered {status}");
            Ok(serde_json::from_str(&body)?)
        };
        match tokio::time::timeout(Duration::from_secs(10), fetch).await {
            Ok(Ok(stats)) => Some(stats),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the server's stats");
                None
            }
            Err(_) => {
                tracing::warn!("reading the server's stats timed out");
                None
            }
        }
    }

    /// The processes whose CPU time and memory are the server's: the node, or
    /// every node and the NATS server of a cluster.
    pub fn server_pids(&self) -> Vec<u32> {
        self.server_pid
            .into_iter()
            .chain(self.cluster_pids.iter().copied())
            .collect()
    }

    /// Starts a NATS server (`nats_bin -js`) and `nodes` `tutti serve --cluster`
    /// nodes on free loopback ports; clients are spread over the nodes.
    pub async fn spawn_cluster(
        server_bin: PathBuf,
        nats_bin: PathBuf,
        parent: Option<&std::path::Path>,
        transport: TransportKind,
        nodes: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(nodes >= 1, "--cluster needs at least one node");
        let mut builder = tempfile::Builder::new();
        builder.prefix("tutti-load-cluster-");
        let dir = match parent {
            Some(p) => builder.tempdir_in(p)?,
            None => builder.tempdir()?,
        };
        let mut nats = tokio::process::Command::new(&nats_bin);
        pin(&mut nats);
        let mut nats = nats
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(dir.path().join("nats"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", nats_bin.display()))?;
        let mut lines = BufReader::new(nats.stderr.take().context("nats stderr")?).lines();
        let mut port = None;
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                port = rest
                    .trim()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok());
            }
            if line.contains("Server is ready") {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = format!(
            "nats://127.0.0.1:{}",
            port.context("nats-server printed no port")?
        );
        let secret = tutti::util::random_hex(32);
        let api_key = tutti::util::random_hex(32);
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        let mut first_http = None;
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let node_dir = dir.path().join(&name);
            std::fs::create_dir_all(&node_dir)?;
            let mut child = serve_command(&server_bin, &node_dir, &secret, &api_key)?
                .args(["--node-id", &name, "--cluster", &url])
                .spawn()
                .with_context(|| format!("starting {}", server_bin.display()))?;
            let stdout = child.stdout.take().context("server stdout")?;
            let (addr, http, pin) =
                tokio::time::timeout(Duration::from_secs(60), read_banner(stdout))
                    .await
                    .map_err(|_| anyhow::anyhow!("node {name} printed no banner in 60 s"))??;
            first_http.get_or_insert(http);
            addrs.push((addr, pin));
            children.push(child);
        }
        let mut children = children.into_iter();
        let child = children.next().expect("at least one node");
        let mut others: Vec<tokio::process::Child> = children.collect();
        others.push(nats);
        let pid = child.id();
        let cluster_pids = others.iter().filter_map(|c| c.id()).collect();
        Ok(Self {
            addr: addrs[0].0,
            http: first_http,
            pin: addrs[0].1,
            auth: Auth::new(secret.as_bytes(), SecretSource::Configured, Duration::ZERO),
            token_secret: Secret(secret.clone()),
            api_key: Some(api_key),
            transport,
            server_pid: pid,
            cluster: addrs,
            cluster_pids,
            next_node: AtomicUsize::new(0),
            client_timeout: Duration::from_secs(20),
            endpoints: Vec::new(),
            next_endpoint: AtomicUsize::new(0),
            spawned: Some(Spawned { child, dir, others }),
        })
    }

    /// The nodes of a spawned cluster (UDP address, pin), in order.
    pub fn nodes(&self) -> Vec<(SocketAddr, [u8; 32])> {
        if self.cluster.is_empty() {
            vec![(self.addr, self.pin)]
        } else {
            self.cluster.clone()
        }
    }

    /// SIGKILLs node `i` of a spawned cluster (1 or more; node 0 is the one whose
    /// HTTP port the run uses). False when there is no such node.
    pub fn kill_node(&self, i: usize) -> bool {
        let Some(&pid) = (i >= 1 && i < self.cluster.len())
            .then(|| self.cluster_pids.get(i - 1))
            .flatten()
        else {
            return false;
        };
        // SAFETY: kill(2) on the pid of a child this run started and still holds.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 }
    }

    /// A client configuration for `user` on node `node` of [`nodes`](Self::nodes).
    pub fn client_config_on(&self, user: &str, node: usize) -> anyhow::Result<ClientConfig> {
        let nodes = self.nodes();
        let (addr, pin) = nodes[node % nodes.len()];
        let mut c = ClientConfig::new(
            addr,
            self.transport,
            Trust::Pinned(vec![pin]),
            self.token(user)?,
        );
        c.timeout = self.client_timeout;
        Ok(c)
    }

    /// Whether the server was started by this run.
    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    /// Stops a spawned server (gracefully, then by force); nothing for `--target`.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut s) = self.spawned.take() else {
            return Ok(());
        };
        if let Some(pid) = s.child.id() {
            // SAFETY: kill(2) on the pid of the child we started and still hold.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), s.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                tracing::warn!(%status, "the server exited uncleanly; log:\n{}", tail(&s.dir.path().join("server.log")));
            }
            _ => {
                tracing::warn!("the server did not stop in 30 s; killing it");
                let _ = s.child.kill().await;
            }
        }
        // The other nodes first, then the NATS server (the last of `others`).
        for mut other in s.others {
            if let Some(pid) = other.id() {
                // SAFETY: kill(2) on the pid of a child we started and still hold.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(30), other.wait())
                .await
                .is_err()
            {
                let _ = other.kill().await;
            }
        }
        drop(s.dir);
        Ok(())
    }
}

/// CPUs the spawned server processes are pinned to (empty: not pinned).
static SERVER_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

/// Pins the servers this run spawns (nodes and NATS) to `cpus` (empty: no pinning).
pub fn pin_servers_to(cpus: &[usize]) {
    let _ = SERVER_CPUS.set(cpus.to_vec());
}

/// Settings merged into every spawned server's configuration (`--server-config`).
static SERVER_CONFIG: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();

/// Reads `path` (TOML) to be merged into the configuration of every server this run
/// spawns; its keys win over the run's own.
pub fn merge_into_server_config(path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the server configuration {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("parsing the server configuration {}", path.display()))?;
    let _ = SERVER_CONFIG.set(table);
    Ok(())
}

/// Merges `extra` into `base`: tables key by key, any other value replaced.
fn merge_tables(base: &mut toml::Table, extra: &toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge_tables(b, e),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The configuration a spawned server starts with: what every scenario needs,
/// then `--server-config`.
fn spawned_server_config() -> String {
    // The scenarios put users into rooms directly (no invitations to accept),
    // and every simulated client comes from this one address, which the
    // server's default `limits.max_connections_per_address` would refuse past 1,024.
    let mut config: toml::Table = toml::from_str(
        "[rooms]\njoin_policy = \"open\"\n[limits]\nmax_connections_per_address = 1000000\n",
    )
    .expect("the built-in configuration is TOML");
    if let Some(extra) = SERVER_CONFIG.get() {
        merge_tables(&mut config, extra);
    }
    toml::to_string(&config).expect("a TOML table serialises")
}

/// Sets the CPU affinity of the child `cmd` will start to the configured server CPUs.
fn pin(cmd: &mut tokio::process::Command) {
    let Some(cpus) = SERVER_CPUS.get().filter(|c| !c.is_empty()).cloned() else {
        return;
    };
    // SAFETY: between fork and exec the closure only builds a CPU set on the stack
    // and calls sched_setaffinity, both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &cpus {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `server_bin serve` on free loopback ports with its data, certificates, log
/// (`server.log`) and configuration in `dir`, the given secrets, and no `TUTTI_*`
/// setting inherited from this environment that would change where it listens.
fn serve_command(
    server_bin: &std::path::Path,
    dir: &std::path::Path,
    secret: &str,
    api_key: &str,
) -> anyhow::Result<tokio::process::Command> {
    let config = dir.join("tutti.toml");
    std::fs::write(&config, spawned_server_config())?;
    let stderr = std::fs::File::create(dir.join("server.log"))?;
    let mut cmd = tokio::process::Command::new(server_bin);
    pin(&mut cmd);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--cert-dir")
        .arg(dir.join("certs"))
        .arg("--web-dir")
        .arg(dir.join("web"));
    for v in [
        "TUTTI_CONFIG",
        "TUTTI_LISTEN",
        "TUTTI_HTTP",
        "TUTTI_CERT",
        "TUTTI_KEY",
        "TUTTI_NODE_ID",
        "TUTTI_CLUSTER_URL",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("TUTTI_JWT_SECRET", secret)
        .env("TUTTI_API_KEY", api_key)
        .env(
            "TUTTI_LOG",
            std::env::var("TUTTI_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    Ok(cmd)
}

/// The last lines of a log file.
fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Reads `tutti serve`'s banner: (UDP address, HTTP address, pin). Keeps draining
/// stdout afterwards so the server never blocks on a full pipe.
async fn read_banner(
    stdout: tokio::process::ChildStdout,
) -> anyhow::Result<(SocketAddr, SocketAddr, [u8; 32])> {
    let mut lines = BufReader::new(stdout).lines();
    let (mut quic, mut http, mut pin) = (None, None, None);
    while let Some(line) = lines.next_line().await? {
        let (q, h, p) = parse_banner_line(&line);
        quic = quic.or(q);
        http = http.or(h);
        pin = pin.or(p);
        if let (Some(q), Some(h), Some(p)) = (quic, http, pin) {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok((q, h, p));
        }
    }
    bail!("the server exited before printing its addresses")
}

/// One banner line's facts: the raw QUIC address, the HTTP address, the pin.
pub fn parse_banner_line(line: &str) -> (Option<SocketAddr>, Option<SocketAddr>, Option<[u8; 32]>) {
    let l = line.trim();
    if let Some(rest) = l.strip_prefix("raw quic:") {
        return (
            rest.split_whitespace().next().and_then(|a| a.parse().ok()),
            None,
            None,
        );
    }
    if let Some(rest) = l.strip_prefix("page:") {
        let addr = rest
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/');
        return (None, addr.parse().ok(), None);
    }
    if l.starts_with("certificates:")
        && let Some(i) = l.find("pin ")
    {
        let hex: String = l[i + 4..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        return (None, None, tutti::client::parse_pin(&hex).ok());
    }
    (None, None, None)
}

/// The newest pin from `GET /cert-hash`.
async fn fetch_pin(http: SocketAddr) -> anyhow::Result<[u8; 32]> {
    let (status, body) = crate::http::get(http, "/cert-hash").await?;
    anyhow::ensure!(status == 200, "GET /cert-hash: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let hex = v["hashes"][0]["value"]
        .as_str()
        .context("no hash in /cert-hash")?;
    tutti::client::parse_pin(hex).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_lines_give_addresses_and_pin() {
        let pin = "ab".repeat(32);
        assert_eq!(
            parse_banner_line("  raw quic:     127.0.0.1:4433 (ALPN tutti/1)").0,
            Some("127.0.0.1:4433".parse().unwrap())
        );
        assert_eq!(
            parse_banner_line("  page:         http://127.0.0.1:8080/").1,
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_banner_line(&format!(
                "  certificates: /tmp/c (generated, sha-256 pin {pin})"
            ))
            .2,
            Some([0xab; 32])
        );
        assert_eq!(parse_banner_line("  data: x"), (None, None, None));
    }

    #[test]
    fn server_config_merges_table_by_table_and_wins() {
        let mut base: toml::Table =
            toml::from_str("[rooms]\njoin_policy = \"open\"\n[limits]\nmax_connections_per_address = 1000000\nmax_connections = 5\n")
                .unwrap();
        let extra: toml::Table = toml::from_str(
            "[limits]\nmax_connections = 7\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n",
        )
        .unwrap();
        merge_tables(&mut base, &extra);
        assert_eq!(base["rooms"]["join_policy"].as_str(), Some("open"));
        assert_eq!(
            base["limits"]["max_connections_per_address"].as_integer(),
            Some(1_000_000)
        );
        assert_eq!(base["limits"]["max_connections"].as_integer(), Some(7));
        assert_eq!(base["tls"]["cert"].as_str(), Some("/c.pem"));
        // Without --server-config, the built-in settings alone.
        let plain: toml::Table = toml::from_str(&spawned_server_config()).unwrap();
        assert_eq!(plain["rooms"]["join_policy"].as_str(), Some("open"));
        assert!(plain.get("tls").is_none());
    }
}
