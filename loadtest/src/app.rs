//! The `run` command: loads the scenario, sets up the target, runs the workload,
//! judges it and writes the reports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tutti::transport::TransportKind;

use crate::scenario::{Kind, Scenario};
use crate::{outcome, procstat, progress, report, run, slo, stats, target};

/// `tutti-load run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The scenario (TOML; see loadtest/scenarios/).
    pub scenario: PathBuf,
    /// Start a fresh `tutti serve` on free loopback ports (temporary data
    /// directory, generated secrets) and stop it afterwards.
    #[arg(long, conflicts_with = "target")]
    pub spawn: bool,
    /// The server binary for --spawn [default: `tutti` next to this executable].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Where --spawn creates the server's temporary directory (data, certificates,
    /// log) [default: the system's temporary directory]. The server commits every
    /// message with an fsync, so the disk under this directory is part of what a
    /// run measures; see loadtest/README.md.
    #[arg(long, requires = "spawn")]
    pub spawn_dir: Option<PathBuf>,
    /// With --spawn: start a NATS server and this many `tutti serve --cluster`
    /// nodes, and spread the clients over them (docs/CLUSTER.md).
    #[arg(long, requires = "spawn")]
    pub cluster: Option<usize>,
    /// The NATS server binary for --cluster [default: .venv/bin/nats-server, as
    /// scripts/test.sh installs it, else `nats-server` on the PATH].
    #[arg(long, env = "TUTTI_NATS_SERVER")]
    pub nats_server: Option<PathBuf>,
    /// The UDP address of a running server.
    #[arg(long, required_unless_present_any = ["spawn", "nodes"])]
    pub target: Option<SocketAddr>,
    /// A running cluster: the HTTP side port of any of its nodes, whose
    /// `GET /cluster` lists the nodes (addresses and pins); clients are spread over
    /// them round-robin.
    #[arg(long, conflicts_with_all = ["spawn", "target"])]
    pub nodes: Option<SocketAddr>,
    /// The server certificate's SHA-256 pin (64 hex digits) for --target.
    #[arg(long)]
    pub pin: Option<String>,
    /// The server's HTTP side port (for /cert-hash and the server API).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// The server's JWT secret, to mint client tokens (--target).
    #[arg(long, env = "TUTTI_JWT_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// The server API key (notification bursts against --target).
    #[arg(long, env = "TUTTI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The server's process id, to read its CPU time and memory (--target on this host).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// quic or webtransport [default: the scenario's, else quic].
    #[arg(long)]
    pub transport: Option<TransportKind>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency percentile distribution (.hgrm) here.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Write an SVG latency-by-percentile chart here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
    /// UDP sockets (QUIC endpoints) the clients share, round-robin; 0 gives every
    /// client its own socket.
    #[arg(long, default_value_t = 8)]
    pub sockets: usize,
    /// With --spawn: run the server (every node, and NATS) on these CPUs only, e.g.
    /// `0` (a comma-separated list). For the pinned setup, run tutti-load itself
    /// under `taskset -c` on the other CPUs.
    #[arg(long, requires = "spawn", value_delimiter = ',')]
    pub server_cpus: Vec<usize>,
    /// With --spawn: a TOML file merged into each spawned server's configuration,
    /// its keys winning over the run's own (e.g. `[tls]` with a certificate of
    /// another kind, or `[store] commit_interval`). Paths in it are taken from the
    /// directory tutti-load runs in; absolute ones are safest.
    #[arg(long, requires = "spawn")]
    pub server_config: Option<PathBuf>,
    /// Worker threads of the generator [default: the number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Abort the run if it takes longer than this (e.g. 10m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    pub timeout: Duration,
    /// Another scenario to run against the same server while this one runs, from a
    /// second `tutti-load` process (its own CPU, its own report), e.g. reconnect
    /// storms during chat fan-out. Its reports go into this run's JSON report
    /// (`details.alongside`) and a line each into its table. Not with --cluster or
    /// --nodes.
    #[arg(long, conflicts_with_all = ["cluster", "nodes"])]
    pub alongside: Option<PathBuf>,
    /// When the --alongside scenario starts, after this run's start (e.g. 22s, to
    /// land in chat-fanout.toml's measured window).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s", requires = "alongside")]
    pub alongside_after: Duration,
    /// How many times the --alongside scenario runs, one after another.
    #[arg(long, default_value_t = 1, requires = "alongside")]
    pub alongside_runs: usize,
}

/// Runs the scenario; `Ok(pass)`.
pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let scenario = Scenario::load(&args.scenario)?;
    let transport = match (args.transport, &scenario.transport) {
        (Some(t), _) => t,
        (None, Some(t)) => t.parse().map_err(anyhow::Error::msg)?,
        (None, None) => TransportKind::Quic,
    };
    target::pin_servers_to(&args.server_cpus);
    if let Some(path) = &args.server_config {
        target::merge_into_server_config(path)?;
    }
    let mut target = if args.spawn {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("the executable has no directory")?
                .join("tutti"),
        };
        match args.cluster {
            Some(n) => {
                let nats = args.nats_server.clone().unwrap_or_else(|| {
                    let venv = PathBuf::from(".venv/bin/nats-server");
                    if venv.is_file() {
                        venv
                    } else {
                        PathBuf::from("nats-server")
                    }
                });
                target::Target::spawn_cluster(bin, nats, args.spawn_dir.as_deref(), transport, n)
                    .await?
            }
            None => target::Target::spawn(bin, args.spawn_dir.as_deref(), transport).await?,
        }
    } else if let Some(http) = args.nodes {
        target::Target::existing_cluster(
            http,
            args.token_secret
                .clone()
                .context("--token-secret or TUTTI_JWT_SECRET is needed to mint tokens")?,
            args.api_key.clone(),
            transport,
        )
        .await?
    } else {
        target::Target::existing(
            target::Existing {
                addr: args.target.context("--target, --nodes or --spawn")?,
                pin: args.pin.clone(),
                http: args.http,
                secret: args
                    .token_secret
                    .clone()
                    .context("--token-secret or TUTTI_JWT_SECRET is needed to mint tokens")?,
                api_key: args.api_key.clone(),
                pid: args.server_pid,
            },
            transport,
        )
        .await?
    };
    target.share_endpoints(args.sockets)?;
    let run_id = format!("l{}", &tutti::util::random_hex(3));
    let ctx = run::Ctx {
        target,
        scenario,
        run_id,
    };
    let info_base = (
        ctx.scenario.name.clone(),
        ctx.scenario.kind,
        rfc(),
        ctx.scenario.params(),
    );
    let server_pid = ctx.target.server_pid;
    let server_pids = ctx.target.server_pids();
    let me = std::process::id();
    let server_cpu0 = procstat::cpu_secs_of(&server_pids);
    let gen_cpu0 = procstat::cpu_secs(me);
    let started = Instant::now();
    stats::live().errors.reset();
    stats::live().sends.reset();
    stats::live().deliveries.reset();
    let alongside = match &args.alongside {
        Some(path) => Some(crate::alongside::Alongside::start(
            path.clone(),
            &ctx.target,
            args.alongside_after,
            args.alongside_runs,
            args.timeout,
        )?),
        None => None,
    };
    let progress = progress::start(args.quiet);
    let result = tokio::time::timeout(args.timeout, async {
        match ctx.scenario.kind {
            Kind::ChatFanout => run::chat::run(&ctx).await,
            Kind::Knee => run::knee::run(&ctx).await,
            Kind::Idle => run::idle::run(&ctx).await,
            Kind::NotifyBurst => run::notify::run(&ctx).await,
            Kind::PresenceChurn => run::presence::run(&ctx).await,
            Kind::Collab => run::collab::run(&ctx).await,
            Kind::Mixed => run::mixed::run(&ctx).await,
            Kind::Failover => run::failover::run(&ctx).await,
        }
    })
    .await;
    progress.stop().await;
    // The alongside runs still need the server: wait for them before stopping it.
    let alongside = match alongside {
        Some(a) => Some(a.finish(args.timeout).await),
        None => None,
    };
    let server_cpu = match (server_cpu0, procstat::cpu_secs_of(&server_pids)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let server_rss = server_pids
        .iter()
        .map(|p| procstat::rss_bytes(*p))
        .sum::<Option<u64>>()
        .filter(|_| !server_pids.is_empty());
    let server_latency = ctx.target.server_stats().await;
    let gen_cpu = match (gen_cpu0, procstat::cpu_secs(me)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let wall = started.elapsed().as_secs_f64();
    let spec = ctx.scenario.slo.clone();
    let transport_name = ctx.target.transport.to_string();
    let run::Ctx { target, .. } = ctx;
    if let Err(e) = target.stop().await {
        tracing::warn!(error = %e, "stopping the server");
    }
    let mut outcome = match result {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the run did not finish within --timeout {:?}", args.timeout),
    };
    if let Some(reports) = &alongside {
        outcome
            .extra
            .insert("alongside".into(), serde_json::Value::from(reports.clone()));
    }

    let (name, kind, date, params) = info_base;
    let generator_bound = outcome.late.scheduled > 0
        && slo::percent(outcome.late.late, outcome.late.scheduled) > spec.late_sends_pct;
    let info = report::RunInfo {
        scenario: name,
        kind: kind.as_str(),
        transport: transport_name,
        date,
        params,
        server: (server_pid, server_cpu, server_rss),
        server_latency,
        generator_cpu_secs: gen_cpu,
        wall_secs: wall,
        generator_bound,
    };
    let verdicts = slo::evaluate(&spec, &measured(kind, &outcome));
    print!("{}", report::table(&info, &outcome, &verdicts));
    if let Some(reports) = &alongside {
        print!("{}", crate::alongside::summary(reports));
    }
    if let Some(path) = &args.json {
        let v = report::to_json(&info, &outcome, &verdicts);
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.hgrm {
        std::fs::write(path, report::hgrm(&outcome.latency))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} — {} over {} — latency by percentile ({} samples)",
            info.scenario,
            info.kind,
            info.transport,
            outcome.latency.len()
        );
        std::fs::write(
            path,
            report::svg(&outcome.latency, &title, spec.latency_p99_ms),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if generator_bound {
        eprintln!(
            "warning: the generator fell behind its schedule ({} of {} sends more than {} ms late): \
             the numbers may measure the generator, not the server",
            outcome.late.late, outcome.late.scheduled, spec.late_send_ms
        );
    }
    Ok(verdicts.iter().all(|v| v.pass))
}

/// What the SLOs are judged on, by kind.
fn measured(kind: Kind, o: &outcome::Outcome) -> slo::Measured {
    let p99 = (!o.latency.is_empty()).then(|| o.latency.value_at_quantile(0.99) as f64 / 1000.0);
    let delivery = o.messages.map(|m| (m.expected, m.delivered));
    let collab = o
        .collab
        .as_ref()
        .map(|c| (c.ops_submitted, c.ops_rejected, c.divergent_documents));
    let mut m = slo::Measured {
        attempted: o.attempted,
        established: o.established,
        dropped: o.dropped,
        delivery,
        p99_ms: p99,
        collab,
        knee: None,
    };
    match kind {
        Kind::Idle => {
            m.delivery = None;
            m.p99_ms = None;
        }
        Kind::Collab => {
            // The latency of a collaboration run is the operations' acknowledgement.
            m.p99_ms = o
                .collab_latency
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0);
        }
        Kind::Failover => {
            // A message delivered twice or out of order is a failure of the
            // failover, not a delivery.
            m.delivery = o.messages.map(|x| {
                (
                    x.expected,
                    x.delivered.saturating_sub(x.duplicated + x.out_of_order),
                )
            });
        }
        Kind::Knee => {
            // Steps are judged one by one; the run passes when one step passed.
            let found = o
                .knee
                .as_ref()
                .is_some_and(|k| k.steps.iter().any(|s| s.pass));
            if !found {
                m.delivery = Some((1, 0));
            }
        }
        _ => {}
    }
    m
}

fn rfc() -> String {
    report::rfc3339_now()
}
