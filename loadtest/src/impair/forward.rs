//! The forwarder: reads packets from both devices, schedules them, writes the due
//! ones to the other device, on a single-threaded tokio runtime (one core at
//! most, to leave the rest to the server and the generator it sits between).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use super::{Counters, ImpairArgs, Scheduler, tun};

/// Packets read from one device per wakeup before the other gets its turn.
const READ_BATCH: usize = 256;
/// How much earlier than scheduled a packet may leave. The runtime's timer has
/// millisecond ticks: a deadline is rounded up to the next tick and the wait for
/// it to a whole millisecond, so a wakeup comes up to about 2 ms after the
/// deadline, 1 ms on average. Waking 1 ms early and releasing then what is due
/// within 1 ms centres the release times on the scheduled ones (the report has the error: `mean_timer_error_ms`,
/// `max_timer_late_ms`, `max_timer_early_ms`).
const EARLY_NS: u64 = 1_000_000;
/// The largest packet a TUN device hands over (its MTU is far below).
const MAX_PACKET: usize = 65_536;

/// One direction's write-side counters (the scheduler has the rest).
#[derive(Debug, Default, serde::Serialize)]
struct WriteCounters {
    /// Packets written to the other device.
    forwarded: u64,
    /// Packets the other device refused (it was down, or its queue full).
    write_errors: u64,
}

/// Opens the devices, runs until the deadline or a signal, and returns the report
/// (one JSON line).
pub(super) fn main(args: &ImpairArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.queue_cap > 0, "--queue-cap must be at least 1");
    anyhow::ensure!(
        args.duration > Duration::ZERO,
        "--duration must be positive"
    );
    anyhow::ensure!(
        args.tun_a != args.tun_b || args.netns_a != args.netns_b,
        "A and B are the same device"
    );
    let a = tun::open(&args.tun_a, args.netns_a.as_deref())
        .with_context(|| format!("opening {}", args.tun_a))?;
    let b = tun::open(&args.tun_b, args.netns_b.as_deref())
        .with_context(|| format!("opening {}", args.tun_b))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(forward(args, a, b))
}

/// The forwarding loop.
async fn forward(args: &ImpairArgs, a: File, b: File) -> anyhow::Result<String> {
    let a = register(a).context("registering device A")?;
    let b = register(b).context("registering device B")?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cfg = args.impairments();
    let mut ab: Scheduler<Vec<u8>> = Scheduler::new(cfg.a_to_b, args.seed, 0);
    let mut ba: Scheduler<Vec<u8>> = Scheduler::new(cfg.b_to_a, args.seed, 1);
    let (mut wab, mut wba) = (WriteCounters::default(), WriteCounters::default());
    let mut buf = vec![0u8; MAX_PACKET];
    let cpu0 = own_cpu_secs();
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + args.duration);
    let ns = |t: Instant| u64::try_from(t.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
    eprintln!(
        "impair: ready: {} <-> {} (seed {}, for {})",
        args.tun_a,
        args.tun_b,
        args.seed,
        humantime::format_duration(args.duration)
    );
    // Ends at the deadline at the latest: every turn waits for a packet, a due
    // release, a signal or the deadline.
    let stopped_by = loop {
        let next = [ab.next_release(), ba.next_release()]
            .into_iter()
            .flatten()
            .min();
        let wake = next.map_or(deadline, |t| {
            let t = Duration::from_nanos(t.saturating_sub(EARLY_NS));
            tokio::time::Instant::from_std(start + t).min(deadline)
        });
        // Early release only on the timer's wakeup, whose lateness it offsets; a
        // wakeup for a read releases what is due by now.
        let mut early = 0;
        tokio::select! {
            _ = term.recv() => break "sigterm",
            _ = int.recv() => break "sigint",
            r = a.readable() => {
                if let Err(e) = read_batch(&mut r?, &mut ab, &mut buf, || ns(Instant::now())) {
                    eprintln!("impair: reading {}: {e}", args.tun_a);
                    break "device_error";
                }
            }
            r = b.readable() => {
                if let Err(e) = read_batch(&mut r?, &mut ba, &mut buf, || ns(Instant::now())) {
                    eprintln!("impair: reading {}: {e}", args.tun_b);
                    break "device_error";
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    break "duration";
                }
                early = EARLY_NS;
            }
        }
        let now = ns(Instant::now());
        release(&mut ab, b.get_ref(), now, early, &mut wab);
        release(&mut ba, a.get_ref(), now, early, &mut wba);
    };
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, own_cpu_secs()) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let dir = |s: &Scheduler<Vec<u8>>, w: &WriteCounters, imp: &super::Impairment| {
        let c: &Counters = s.counters();
        serde_json::json!({
            "received": c.received,
            "forwarded": w.forwarded,
            "dropped_loss": c.dropped_loss,
            "dropped_cap": c.dropped_cap,
            "write_errors": w.write_errors,
            "queued_at_exit": s.queued(),
            "reordered": c.reordered,
            "released_out_of_order": c.released_out_of_order,
            "loss_pct_actual": pct(c.dropped_loss, c.received),
            "mean_delay_ms": ratio_ms(c.scheduled_delay_ns_sum, c.released + s.queued() as u64),
            "max_delay_ms": c.scheduled_delay_ns_max as f64 / 1e6,
            "mean_timer_error_ms": if c.released == 0 { 0.0 } else { c.timer_error_ns_sum as f64 / c.released as f64 / 1e6 },
            "max_timer_late_ms": c.timer_late_ns_max as f64 / 1e6,
            "max_timer_early_ms": c.timer_early_ns_max as f64 / 1e6,
            "max_queue": c.max_queue,
            "received_bytes": c.received_bytes,
            "released_bytes": c.released_bytes,
            "settings": {
                "loss_pct": imp.loss * 100.0,
                "delay_ms": imp.delay_ns as f64 / 1e6,
                "jitter_ms": imp.jitter_ns as f64 / 1e6,
                "reorder_pct": imp.reorder * 100.0,
                "reorder_delay_ms": imp.reorder_delay_ns as f64 / 1e6,
            },
        })
    };
    let report = serde_json::json!({
        "impair": {
            "tun_a": args.tun_a,
            "tun_b": args.tun_b,
            "seed": args.seed,
            "jitter_dist": args.jitter_dist.as_str(),
            "queue_cap": args.queue_cap,
        },
        "a_to_b": dir(&ab, &wab, &cfg.a_to_b),
        "b_to_a": dir(&ba, &wba, &cfg.b_to_a),
        "elapsed_secs": elapsed,
        "cpu_secs": cpu,
        "cpu_pct": cpu.map(|c| 100.0 * c / elapsed.max(1e-9)),
        "stopped_by": stopped_by,
    });
    Ok(report.to_string())
}

/// Registers a device for read readiness (writes never wait: see [`release`]).
fn register(f: File) -> std::io::Result<AsyncFd<File>> {
    // SAFETY: a `File` owns its descriptor, which stays open and the same until
    // the `File` (here, inside the `AsyncFd`) is dropped.
    unsafe { AsyncFd::register_with_interest(f, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// Reads up to [`READ_BATCH`] packets from a ready device into its scheduler.
/// Readiness is cleared when the device has no more; after a full batch it stays
/// set, so the next turn reads on (after the other device's turn).
fn read_batch(
    ready: &mut tokio::io::unix::AsyncFdReadyGuard<'_, File>,
    sched: &mut Scheduler<Vec<u8>>,
    buf: &mut [u8],
    now: impl Fn() -> u64,
) -> std::io::Result<()> {
    for _ in 0..READ_BATCH {
        match ready.try_io(|fd| {
            let mut f: &File = fd.get_ref();
            f.read(buf)
        }) {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                sched.offer(now(), buf[..n].to_vec());
            }
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => return Ok(()),
        }
    }
    Ok(())
}

/// Writes every packet due by `now + early` to `out` (bounded by what is held).
fn release(
    sched: &mut Scheduler<Vec<u8>>,
    out: &File,
    now: u64,
    early: u64,
    w: &mut WriteCounters,
) {
    let mut out = out;
    for _ in 0..sched.queued() {
        let Some(pkt) = sched.pop_due(now, early) else {
            return;
        };
        // A TUN write hands the whole packet to the stack or none of it; it fails
        // when the device is down or its receive path is full, and the packet is
        // lost, as a network would lose it.
        match out.write(&pkt) {
            Ok(n) if n == pkt.len() => w.forwarded += 1,
            _ => w.write_errors += 1,
        }
    }
}

/// `part` of `whole` in percent.
fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// `sum_ns / n` in milliseconds.
fn ratio_ms(sum_ns: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        sum_ns as f64 / n as f64 / 1e6
    }
}

/// This process's CPU seconds (user + system).
fn own_cpu_secs() -> Option<f64> {
    tutti_load::procstat::cpu_secs(std::process::id())
}
