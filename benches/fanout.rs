//! What recording latency histograms costs on the fan-out path.
//!
//! `cargo bench --bench fanout` runs two measurements:
//!
//! 1. **End to end**: a real node in this process (temporary data directory), one
//!    room with `MEMBERS` native QUIC clients; one member sends `MESSAGES` chat
//!    messages (`IN_FLIGHT` pipelined) and every member receives every message. The
//!    run is timed from the first send to the last delivery, with latency recording
//!    on and off, alternating, `ROUNDS` times each; the medians are compared.
//! 2. **Recording alone**: nanoseconds per `Latency::record` from 1 and 2 threads,
//!    next to one histogram behind one shared lock (the design the shards replace).
//!
//! `TUTTI_BENCH_ROUNDS`, `TUTTI_BENCH_MEMBERS` and `TUTTI_BENCH_MESSAGES` change the
//! sizes. Every wait is bounded; the bench fails rather than hangs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tutti::client::{Client, ClientConfig, Event, Trust};
use tutti::metrics::{Latency, set_latency_recording};
use tutti::protocol::v1::{self, StreamKind, push, request};
use tutti::transport::TransportKind;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let rounds = env("TUTTI_BENCH_ROUNDS", 5);
    let members = env("TUTTI_BENCH_MEMBERS", 50);
    let messages = env("TUTTI_BENCH_MESSAGES", 1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(end_to_end(rounds, members, messages))?;
    recording_alone();
    Ok(())
}

async fn end_to_end(rounds: usize, members: usize, messages: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = tutti::Config {
        dev: true,
        listen: "127.0.0.1:0".parse()?,
        http: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("data"),
        web_dir: dir.path().join("web"),
        ..Default::default()
    };
    config.tls.cert_dir = dir.path().join("certs");
    let server = tutti::start(config).await?;
    let connect = |user: String| {
        let token = server
            .auth()
            .mint(&user, Duration::from_secs(3600), &[])
            .expect("mint");
        let config = ClientConfig::new(
            server.quic_addr(),
            TransportKind::Quic,
            Trust::Pinned(vec![server.certs().pin()]),
            token,
        );
        async move { Client::connect(config).await }
    };
    let mut clients = Vec::with_capacity(members);
    for i in 0..members {
        clients.push(Arc::new(connect(format!("m{i}")).await?));
    }
    clients[0]
        .request(request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "bench".into(),
            name: "bench".into(),
            participants: (1..members).map(|i| format!("m{i}")).collect(),
        }))
        .await?;

    println!(
        "end to end: {members} members, {messages} messages x {members} deliveries per round, {rounds} rounds each"
    );
    let mut on = Vec::new();
    let mut off = Vec::new();
    // A warm-up round, not counted.
    run_round(&clients, messages / 4).await?;
    for round in 0..rounds * 2 {
        let recording = round % 2 == 1;
        set_latency_recording(recording);
        let rate = (messages * members) as f64 / run_round(&clients, messages).await?.as_secs_f64();
        println!(
            "  round {round:2} recording {:3}: {rate:>9.0} deliveries/s",
            if recording { "on" } else { "off" }
        );
        if recording { &mut on } else { &mut off }.push(rate);
    }
    set_latency_recording(true);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    println!(
        "  median: recording off {m_off:.0}/s, on {m_on:.0}/s, change {:+.1}%",
        (m_on - m_off) / m_off * 100.0
    );
    for c in &clients {
        c.close();
    }
    server.shutdown().await?;
    Ok(())
}

/// Sends `messages` from the first member; returns when every member has them all.
async fn run_round(clients: &[Arc<Client>], messages: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let receivers: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut got = 0;
                while got < messages {
                    match c.next_event().await {
                        Some(Event::Push(StreamKind::Chat, p))
                            if matches!(p.event, Some(push::Event::ChatMessage(_))) =>
                        {
                            got += 1
                        }
                        Some(_) => {}
                        None => anyhow::bail!("session ended"),
                    }
                }
                Ok(())
            })
        })
        .collect();
    let sender = clients[0].clone();
    let sends = tokio::spawn(async move {
        use futures_util::StreamExt;
        futures_util::stream::iter(0..messages)
            .map(|i| {
                let sender = sender.clone();
                async move {
                    sender
                        .request(request::Body::ChatSend(v1::ChatSendRequest {
                            room_id: "bench".into(),
                            text: format!("{i:0>100}"),
                            client_message_id: String::new(),
                        }))
                        .await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .for_each(|r| async move {
                r.expect("send");
            })
            .await;
    });
    tokio::time::timeout(Duration::from_secs(120), async {
        sends.await?;
        for r in receivers {
            r.await??;
        }
        anyhow::Ok(())
    })
    .await??;
    Ok(started.elapsed())
}

const IN_FLIGHT: usize = 32;

fn recording_alone() {
    const N: u64 = 2_000_000;
    println!("recording alone: {N} records per thread");
    for threads in [1, 2] {
        let sharded = Arc::new(Latency::default());
        let ns = per_record(threads, N, {
            let l = sharded.clone();
            move |i| l.record(Duration::from_micros(i % 10_000 + 1))
        });
        let global = Arc::new(Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
        ));
        let ns_global = per_record(threads, N, {
            let g = global.clone();
            move |i| {
                let _ = g.lock().expect("lock").record(i % 10_000 + 1);
            }
        });
        println!(
            "  {threads} thread(s): sharded {ns:.1} ns/record, one shared lock {ns_global:.1} ns/record"
        );
    }
}

fn per_record(threads: usize, n: u64, f: impl Fn(u64) + Send + Sync + Clone + 'static) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let f = f.clone();
            std::thread::spawn(move || {
                for i in 0..n {
                    f(i);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    started.elapsed().as_nanos() as f64 / n as f64
}
