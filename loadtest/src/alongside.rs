//! `--alongside`: a second scenario run against the same server while the main one
//! runs, from a child `tutti-load` process, so that each generator has its own CPU
//! time and its own report. Reconnect storms during chat fan-out show what
//! established sessions see while thousands of clients reconnect
//! (loadtest/baselines/storm-chat.sh).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::target::Target;

/// What a child run needs to reach the server.
#[derive(Debug)]
struct Reach {
    args: Vec<String>,
    secret: crate::target::Secret,
    api_key: Option<String>,
}

/// Runs started alongside the main scenario.
#[derive(Debug)]
pub struct Alongside {
    task: tokio::task::JoinHandle<Vec<Value>>,
}

impl Alongside {
    /// Starts `scenario` against `target` after `after`, `runs` times one after
    /// another, each within `timeout`. A target on a cluster is not supported.
    pub fn start(
        scenario: PathBuf,
        target: &Target,
        after: Duration,
        runs: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            target.server_pids().len() <= 1,
            "--alongside runs against one server, not a cluster"
        );
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut args = vec![
            "run".to_owned(),
            scenario.display().to_string(),
            "--target".to_owned(),
            target.addr.to_string(),
            "--pin".to_owned(),
            tutti::util::hex(&target.pin),
            "--transport".to_owned(),
            target.transport.to_string(),
            "--timeout".to_owned(),
            format!("{}s", timeout.as_secs().max(1)),
            "--quiet".to_owned(),
        ];
        if let Some(http) = target.http {
            args.extend(["--http".to_owned(), http.to_string()]);
        }
        if let Some(pid) = target.server_pid {
            args.extend(["--server-pid".to_owned(), pid.to_string()]);
        }
        let reach = Reach {
            args,
            secret: target.token_secret.clone(),
            api_key: target.api_key.clone(),
        };
        let task = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let mut reports = Vec::with_capacity(runs);
            for i in 0..runs {
                let report = match run_once(&exe, &reach, timeout).await {
                    Ok(r) => r,
                    Err(e) => json!({ "error": format!("{e:#}") }),
                };
                tracing::debug!(run = i + 1, "alongside run done");
                reports.push(report);
            }
            reports
        });
        Ok(Self { task })
    }

    /// Waits for the runs, up to `limit`; runs not finished by then are stopped
    /// and reported as such.
    pub async fn finish(self, limit: Duration) -> Vec<Value> {
        let abort = self.task.abort_handle();
        match tokio::time::timeout(limit, self.task).await {
            Ok(Ok(reports)) => reports,
            Ok(Err(e)) => vec![json!({ "error": format!("the alongside task failed: {e}") })],
            Err(_) => {
                abort.abort();
                vec![json!({ "error": "the alongside runs did not finish in time" })]
            }
        }
    }
}

/// One child run: its JSON report (whether or not it passed its SLOs).
async fn run_once(exe: &Path, reach: &Reach, timeout: Duration) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("report.json");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(&reach.args)
        .arg("--json")
        .arg(&json)
        .env("TUTTI_JWT_SECRET", &reach.secret.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    match &reach.api_key {
        Some(k) => cmd.env("TUTTI_API_KEY", k),
        None => cmd.env_remove("TUTTI_API_KEY"),
    };
    let mut child = cmd.spawn().context("starting the alongside run")?;
    // Its own --timeout ends it first; this is the backstop.
    let status = tokio::time::timeout(timeout + Duration::from_secs(30), child.wait())
        .await
        .context("the alongside run did not end")??;
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("the alongside run ({status}) wrote no report"))?;
    Ok(serde_json::from_str(&text)?)
}

/// One line per alongside report, for the table: its scenario, verdict and rates.
pub fn summary(reports: &[Value]) -> String {
    let mut out = String::new();
    for (i, r) in reports.iter().enumerate() {
        let line = match r.get("error").and_then(Value::as_str) {
            Some(e) => format!("error: {e}"),
            None => {
                let mut parts = vec![format!(
                    "{} {}",
                    r["scenario"].as_str().unwrap_or("?"),
                    if r["pass"] == true { "PASS" } else { "FAIL" }
                )];
                let c = &r["connections"];
                if let Some(rate) = c["connects_per_sec"].as_f64() {
                    parts.push(format!(
                        "{} of {} connected at {rate:.0}/s",
                        c["established"], c["attempted"]
                    ));
                }
                for (key, name) in [
                    ("reconnect_resumed_per_sec", "resumed"),
                    ("reconnect_full_per_sec", "full"),
                ] {
                    if let Some(rate) = r["details"][key].as_f64() {
                        parts.push(format!("{name} reconnects {rate:.0}/s"));
                    }
                }
                if r["latency_ms"]["count"].as_u64().unwrap_or(0) > 0 {
                    parts.push(format!("p99 {} ms", r["latency_ms"]["p99"]));
                }
                parts.join(", ")
            }
        };
        out.push_str(&format!("  alongside run {}: {line}\n", i + 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_each_run_and_its_rates() {
        let reports = vec![
            json!({
                "scenario": "reconnect", "pass": true,
                "connections": {"attempted": 50, "established": 50, "connects_per_sec": 812.4},
                "details": {"reconnect_resumed_per_sec": 950.0, "reconnect_full_per_sec": 700.2},
                "latency_ms": {"count": 0},
            }),
            json!({ "error": "the alongside run (exit status: 2) wrote no report" }),
        ];
        assert_eq!(
            summary(&reports),
            "  alongside run 1: reconnect PASS, 50 of 50 connected at 812/s, resumed \
             reconnects 950/s, full reconnects 700/s\n  alongside run 2: error: the \
             alongside run (exit status: 2) wrote no report\n"
        );
    }
}
