//! `tutti-load impair`: a user-space network impairment between two TUN devices.
//!
//! Every IP packet read from TUN device A is written to TUN device B, and every
//! packet read from B to A, after a per-direction impairment: random loss, a
//! one-way delay with bounded jitter (uniform or normal), optional reordering (a
//! fraction of the packets held back for an extra delay so that later ones pass
//! them) and a cap on the packets held per direction. Decisions come from a
//! seeded generator, so a seed and a packet sequence give the same decisions.
//!
//! With the devices in two network namespaces (`loadtest/impair/netns.sh`), a
//! server in one and `tutti-load run` in the other, every packet between them
//! (UDP and TCP alike) crosses this forwarder. The scheduler below is pure (time
//! is a number of nanoseconds given by the caller) and unit-tested;
//! `forward` runs it on the devices; `tun` opens them.

mod forward;
mod tun;

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// The longest delay, jitter or extra reorder delay accepted (a guard against
/// typos such as `25s` for `25ms`).
const MAX_DELAY: Duration = Duration::from_secs(10);

/// `tutti-load impair` options. Impairment options take one value for both
/// directions or `A2B,B2A` (the first applies to packets read from `--tun-a`
/// and written to `--tun-b`).
#[derive(Debug, Args)]
pub(crate) struct ImpairArgs {
    /// TUN device A (opened, or created if missing, with IFF_TUN | IFF_NO_PI).
    #[arg(long)]
    pub(crate) tun_a: String,
    /// TUN device B.
    #[arg(long)]
    pub(crate) tun_b: String,
    /// Open device A inside this network namespace (a name under /run/netns or a
    /// path); default: the current namespace.
    #[arg(long)]
    pub(crate) netns_a: Option<String>,
    /// Open device B inside this network namespace.
    #[arg(long)]
    pub(crate) netns_b: Option<String>,
    /// Random loss in percent (0–100), e.g. `2` or `0.5,5`.
    #[arg(long, default_value = "0", value_parser = parse_pct)]
    pub(crate) loss: PerDir<f64>,
    /// One-way delay, e.g. `25ms` (RTT 50 ms) or `10ms,40ms`.
    #[arg(long, default_value = "0ms", value_parser = parse_dur)]
    pub(crate) delay: PerDir<Duration>,
    /// Jitter: the half-width of a uniform distribution, or the standard deviation
    /// of a normal one truncated at ±3σ; the delay never goes below zero.
    #[arg(long, default_value = "0ms", value_parser = parse_dur)]
    pub(crate) jitter: PerDir<Duration>,
    /// The jitter's distribution.
    #[arg(long, value_enum, default_value_t = JitterDist::Uniform)]
    pub(crate) jitter_dist: JitterDist,
    /// Percent of the packets held back by --reorder-delay more than the others
    /// (later packets pass them). Jitter alone never reorders.
    #[arg(long, default_value = "0", value_parser = parse_pct)]
    pub(crate) reorder: PerDir<f64>,
    /// The extra delay of a reordered packet.
    #[arg(long, default_value = "10ms", value_parser = parse_dur)]
    pub(crate) reorder_delay: PerDir<Duration>,
    /// The most packets held per direction; more are dropped (counted as
    /// `dropped_cap`).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) queue_cap: usize,
    /// The random seed (each direction derives its own stream from it).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Stop after this long (SIGTERM and SIGINT stop it earlier).
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
}

/// A setting per direction: A → B and B → A.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PerDir<T> {
    /// Packets read from device A, written to device B.
    pub(crate) a_to_b: T,
    /// Packets read from device B, written to device A.
    pub(crate) b_to_a: T,
}

/// How jitter is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum JitterDist {
    /// Uniform on [−jitter, +jitter].
    Uniform,
    /// Normal with σ = jitter, truncated to [−3σ, +3σ].
    Normal,
}

impl JitterDist {
    fn as_str(self) -> &'static str {
        match self {
            JitterDist::Uniform => "uniform",
            JitterDist::Normal => "normal",
        }
    }
}

/// One value, or two separated by a comma (A → B, B → A).
fn per_dir<T: Copy>(s: &str, one: impl Fn(&str) -> Result<T, String>) -> Result<PerDir<T>, String> {
    match s.split_once(',') {
        Some((x, y)) => Ok(PerDir {
            a_to_b: one(x.trim())?,
            b_to_a: one(y.trim())?,
        }),
        None => {
            let v = one(s.trim())?;
            Ok(PerDir {
                a_to_b: v,
                b_to_a: v,
            })
        }
    }
}

/// A percentage (0–100) per direction.
fn parse_pct(s: &str) -> Result<PerDir<f64>, String> {
    per_dir(s, |x| {
        let v: f64 = x.parse().map_err(|_| format!("not a number: {x:?}"))?;
        if (0.0..=100.0).contains(&v) {
            Ok(v)
        } else {
            Err(format!("{v} is not a percentage between 0 and 100"))
        }
    })
}

/// A duration (`25ms`, `0`) per direction, at most [`MAX_DELAY`].
fn parse_dur(s: &str) -> Result<PerDir<Duration>, String> {
    per_dir(s, |x| {
        let d = if x == "0" {
            Duration::ZERO
        } else {
            humantime::parse_duration(x).map_err(|e| format!("{x:?}: {e}"))?
        };
        if d <= MAX_DELAY {
            Ok(d)
        } else {
            Err(format!("{x} is longer than {}s", MAX_DELAY.as_secs()))
        }
    })
}

impl ImpairArgs {
    /// The scheduler settings of each direction.
    fn impairments(&self) -> PerDir<Impairment> {
        let dir = |a_to_b: bool| {
            let f = |p: &PerDir<f64>| if a_to_b { p.a_to_b } else { p.b_to_a };
            let d = |p: &PerDir<Duration>| {
                let v = if a_to_b { p.a_to_b } else { p.b_to_a };
                u64::try_from(v.as_nanos()).unwrap_or(u64::MAX)
            };
            Impairment {
                loss: f(&self.loss) / 100.0,
                delay_ns: d(&self.delay),
                jitter_ns: d(&self.jitter),
                jitter_dist: self.jitter_dist,
                reorder: f(&self.reorder) / 100.0,
                reorder_delay_ns: d(&self.reorder_delay),
                queue_cap: self.queue_cap,
            }
        };
        PerDir {
            a_to_b: dir(true),
            b_to_a: dir(false),
        }
    }
}

/// Runs the forwarder until `--duration`, SIGTERM or SIGINT, then prints one JSON
/// line of counters on stdout. Exit status 0, or 2 when it could not run.
pub(crate) fn main(args: ImpairArgs) -> ExitCode {
    match forward::main(&args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// One direction's impairment, as the scheduler uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Impairment {
    /// Probability (0–1) that a packet is dropped.
    pub(crate) loss: f64,
    /// The one-way delay.
    pub(crate) delay_ns: u64,
    /// The jitter (see [`JitterDist`]).
    pub(crate) jitter_ns: u64,
    /// How jitter is drawn.
    pub(crate) jitter_dist: JitterDist,
    /// Probability (0–1) that a packet gets `reorder_delay_ns` more.
    pub(crate) reorder: f64,
    /// The extra delay of a reordered packet.
    pub(crate) reorder_delay_ns: u64,
    /// The most packets held at once.
    pub(crate) queue_cap: usize,
}

/// What happened to an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Dropped by random loss.
    Lost,
    /// Dropped: `queue_cap` packets were already held.
    Full,
    /// Held until `release_ns`.
    Queued {
        /// When the packet is due.
        release_ns: u64,
        /// Whether it got the extra reorder delay.
        reordered: bool,
    },
}

/// One direction's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Counters {
    /// Packets offered.
    pub(crate) received: u64,
    /// Bytes offered.
    pub(crate) received_bytes: u64,
    /// Packets released (handed on for writing).
    pub(crate) released: u64,
    /// Bytes released.
    pub(crate) released_bytes: u64,
    /// Packets dropped by random loss.
    pub(crate) dropped_loss: u64,
    /// Packets dropped because the queue was full.
    pub(crate) dropped_cap: u64,
    /// Packets given the extra reorder delay.
    pub(crate) reordered: u64,
    /// Packets released after a packet that arrived later than them.
    pub(crate) released_out_of_order: u64,
    /// The most packets held at once.
    pub(crate) max_queue: u64,
    /// Σ (release time − arrival time) in ns, as scheduled.
    pub(crate) scheduled_delay_ns_sum: u64,
    /// The longest scheduled delay in ns.
    pub(crate) scheduled_delay_ns_max: u64,
    /// Σ (actual release − scheduled release) in ns: the timer's error, negative
    /// when packets leave early.
    pub(crate) timer_error_ns_sum: i64,
    /// The latest release after the scheduled time, in ns.
    pub(crate) timer_late_ns_max: u64,
    /// The earliest release before the scheduled time, in ns.
    pub(crate) timer_early_ns_max: u64,
}

/// A held packet, ordered by (release time, arrival sequence).
#[derive(Debug)]
struct Held<P> {
    release_ns: u64,
    arrival_ns: u64,
    seq: u64,
    pkt: P,
}

impl<P> PartialEq for Held<P> {
    fn eq(&self, other: &Self) -> bool {
        (self.release_ns, self.seq) == (other.release_ns, other.seq)
    }
}

impl<P> Eq for Held<P> {}

impl<P> PartialOrd for Held<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<P> Ord for Held<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.release_ns, self.seq).cmp(&(other.release_ns, other.seq))
    }
}

/// One direction's impairment scheduler: packets in, each with a release time
/// (or dropped); due packets out in release order.
///
/// Packets that are not reordered leave in arrival order: a packet's release time
/// is at least that of the previous in-order packet, so jitter delays packets but
/// never reorders them (as a FIFO queue would). Each packet takes the same number
/// of random draws whatever happens to it, so the decisions for the n-th packet
/// depend only on the seed and n.
#[derive(Debug)]
pub(crate) struct Scheduler<P> {
    cfg: Impairment,
    rng: Rng,
    heap: BinaryHeap<Reverse<Held<P>>>,
    next_seq: u64,
    /// The release time of the last in-order packet.
    fifo_release_ns: u64,
    /// The highest sequence released so far.
    max_released_seq: Option<u64>,
    counters: Counters,
}

impl<P: AsRef<[u8]>> Scheduler<P> {
    /// A scheduler with its own random stream derived from `seed` and `stream`
    /// (one stream per direction).
    pub(crate) fn new(cfg: Impairment, seed: u64, stream: u64) -> Self {
        Self {
            cfg,
            rng: Rng::new(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            heap: BinaryHeap::new(),
            next_seq: 0,
            fifo_release_ns: 0,
            max_released_seq: None,
            counters: Counters::default(),
        }
    }

    /// Offers a packet that arrived at `now_ns`.
    pub(crate) fn offer(&mut self, now_ns: u64, pkt: P) -> Verdict {
        let len = pkt.as_ref().len() as u64;
        self.counters.received += 1;
        self.counters.received_bytes += len;
        let u_loss = self.rng.next_f64();
        let jitter = self.jitter_ns();
        let u_reorder = self.rng.next_f64();
        if u_loss < self.cfg.loss {
            self.counters.dropped_loss += 1;
            return Verdict::Lost;
        }
        if self.heap.len() >= self.cfg.queue_cap {
            self.counters.dropped_cap += 1;
            return Verdict::Full;
        }
        let base =
            (i128::from(now_ns) + i128::from(self.cfg.delay_ns) + jitter).max(i128::from(now_ns));
        let base = u64::try_from(base).unwrap_or(u64::MAX);
        let reordered = u_reorder < self.cfg.reorder;
        let release_ns = if reordered {
            self.counters.reordered += 1;
            base.saturating_add(self.cfg.reorder_delay_ns)
        } else {
            let r = base.max(self.fifo_release_ns);
            self.fifo_release_ns = r;
            r
        };
        let delay = release_ns - now_ns;
        self.counters.scheduled_delay_ns_sum += delay;
        self.counters.scheduled_delay_ns_max = self.counters.scheduled_delay_ns_max.max(delay);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Reverse(Held {
            release_ns,
            arrival_ns: now_ns,
            seq,
            pkt,
        }));
        self.counters.max_queue = self.counters.max_queue.max(self.heap.len() as u64);
        Verdict::Queued {
            release_ns,
            reordered,
        }
    }

    /// The earliest release time held, if any.
    pub(crate) fn next_release(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(h)| h.release_ns)
    }

    /// The next packet due by `now_ns + early_ns`, if any. A timer that fires up
    /// to a tick late is centred on the scheduled times by waking and releasing
    /// half a tick early.
    pub(crate) fn pop_due(&mut self, now_ns: u64, early_ns: u64) -> Option<P> {
        if self.next_release()? > now_ns.saturating_add(early_ns) {
            return None;
        }
        let Reverse(h) = self.heap.pop()?;
        let c = &mut self.counters;
        c.released += 1;
        c.released_bytes += h.pkt.as_ref().len() as u64;
        if now_ns >= h.release_ns {
            let late = now_ns - h.release_ns;
            c.timer_error_ns_sum = c.timer_error_ns_sum.saturating_add_unsigned(late);
            c.timer_late_ns_max = c.timer_late_ns_max.max(late);
        } else {
            let early = h.release_ns - now_ns;
            c.timer_error_ns_sum = c.timer_error_ns_sum.saturating_sub_unsigned(early);
            c.timer_early_ns_max = c.timer_early_ns_max.max(early);
        }
        debug_assert!(h.arrival_ns <= h.release_ns);
        match self.max_released_seq {
            Some(m) if h.seq < m => c.released_out_of_order += 1,
            _ => self.max_released_seq = Some(h.seq),
        }
        Some(h.pkt)
    }

    /// Packets still held.
    pub(crate) fn queued(&self) -> usize {
        self.heap.len()
    }

    /// The counters so far.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A jitter sample in ns (always two draws).
    fn jitter_ns(&mut self) -> i128 {
        let u1 = self.rng.next_f64();
        let u2 = self.rng.next_f64();
        let j = self.cfg.jitter_ns as f64;
        let x = match self.cfg.jitter_dist {
            JitterDist::Uniform => (2.0 * u1 - 1.0) * j,
            JitterDist::Normal => {
                // Box–Muller; 1 − u1 is in (0, 1], so the logarithm is finite.
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                z.clamp(-3.0, 3.0) * j
            }
        };
        x.round() as i128
    }
}

/// xoshiro256++ seeded through SplitMix64: small, fast and reproducible.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn cfg() -> Impairment {
        Impairment {
            loss: 0.0,
            delay_ns: 0,
            jitter_ns: 0,
            jitter_dist: JitterDist::Uniform,
            reorder: 0.0,
            reorder_delay_ns: 0,
            queue_cap: 1_000_000,
        }
    }

    /// Offers `n` packets (payload = sequence number), one every `gap_ns`, popping
    /// at each arrival what is due; then everything. Returns the released payloads
    /// with their release times.
    fn run(s: &mut Scheduler<Vec<u8>>, n: u32, gap_ns: u64) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let mut now = 0;
        for i in 0..n {
            now = u64::from(i) * gap_ns;
            while let Some(p) = s.pop_due(now, 0) {
                out.push((u32::from_le_bytes(p[..4].try_into().unwrap()), now));
            }
            s.offer(now, i.to_le_bytes().to_vec());
        }
        for _ in 0..n {
            let Some(t) = s.next_release() else { break };
            now = now.max(t);
            while let Some(p) = s.pop_due(now, 0) {
                out.push((u32::from_le_bytes(p[..4].try_into().unwrap()), now));
            }
        }
        assert_eq!(s.queued(), 0);
        out
    }

    #[test]
    fn loss_fraction_is_near_the_setting_and_reproducible() {
        for (pct, seed) in [(0.5, 1), (2.0, 7), (5.0, 42)] {
            let c = Impairment {
                loss: pct / 100.0,
                ..cfg()
            };
            let mut s: Scheduler<Vec<u8>> = Scheduler::new(c, seed, 0);
            let n = 200_000u32;
            let out = run(&mut s, n, 1_000);
            let lost = s.counters().dropped_loss;
            assert_eq!(lost + out.len() as u64, u64::from(n));
            let frac = lost as f64 / f64::from(n);
            // Binomial σ at 200,000 draws is < 0.05 percentage points at 5%.
            assert!(
                (frac * 100.0 - pct).abs() < pct * 0.1,
                "{pct}%: lost {frac}"
            );
            let mut again: Scheduler<Vec<u8>> = Scheduler::new(c, seed, 0);
            assert_eq!(run(&mut again, n, 1_000), out, "same seed, same decisions");
            let mut other: Scheduler<Vec<u8>> = Scheduler::new(c, seed + 1, 0);
            assert_ne!(run(&mut other, n, 1_000), out, "another seed differs");
        }
        let mut none: Scheduler<Vec<u8>> = Scheduler::new(cfg(), 3, 0);
        assert_eq!(run(&mut none, 10_000, 1_000).len(), 10_000);
    }

    #[test]
    fn delay_with_jitter_stays_in_bounds_and_in_order() {
        for dist in [JitterDist::Uniform, JitterDist::Normal] {
            let (delay, jitter) = (25 * MS, 5 * MS);
            let c = Impairment {
                delay_ns: delay,
                jitter_ns: jitter,
                jitter_dist: dist,
                ..cfg()
            };
            let mut s: Scheduler<Vec<u8>> = Scheduler::new(c, 9, 1);
            let gap = 2 * MS;
            let out = run(&mut s, 5_000, gap);
            assert_eq!(out.len(), 5_000);
            let bound = if dist == JitterDist::Normal {
                3 * jitter
            } else {
                jitter
            };
            let mut sum = 0u64;
            for (i, &(seq, at)) in out.iter().enumerate() {
                assert_eq!(seq as usize, i, "released in arrival order");
                let d = at - u64::from(seq) * gap;
                assert!(d >= delay - bound && d <= delay + bound, "{dist:?}: {d}");
                sum += d;
            }
            let mean = sum / 5_000;
            // The in-order clamp raises some delays, so the mean sits a little
            // above the nominal delay.
            assert!(
                mean >= delay && mean < delay + jitter,
                "{dist:?}: mean {mean}"
            );
            assert_eq!(s.counters().released_out_of_order, 0);
            assert!(s.counters().scheduled_delay_ns_max <= delay + bound);
        }
    }

    #[test]
    fn zero_delay_releases_at_arrival_and_jitter_never_goes_negative() {
        let c = Impairment {
            jitter_ns: 10 * MS,
            ..cfg()
        };
        let mut s: Scheduler<Vec<u8>> = Scheduler::new(c, 5, 0);
        for i in 0..1_000u64 {
            match s.offer(i * MS, vec![0; 4]) {
                Verdict::Queued { release_ns, .. } => assert!(release_ns >= i * MS),
                v => panic!("{v:?}"),
            }
        }
        let mut plain: Scheduler<Vec<u8>> = Scheduler::new(cfg(), 5, 0);
        assert_eq!(
            plain.offer(123, vec![1]),
            Verdict::Queued {
                release_ns: 123,
                reordered: false
            }
        );
        assert_eq!(plain.pop_due(123, 0), Some(vec![1]));
    }

    #[test]
    fn reordered_packets_are_passed_by_later_ones() {
        let c = Impairment {
            delay_ns: 10 * MS,
            reorder: 0.05,
            reorder_delay_ns: 5 * MS,
            ..cfg()
        };
        let mut s: Scheduler<Vec<u8>> = Scheduler::new(c, 11, 0);
        // One packet per ms: a packet held 5 ms longer is passed by the next few.
        let out = run(&mut s, 20_000, MS);
        assert_eq!(out.len(), 20_000);
        let marked = s.counters().reordered;
        let frac = marked as f64 / 20_000.0;
        assert!((0.04..0.06).contains(&frac), "{frac}");
        // Every marked packet leaves after at least one later packet.
        let mut overtaken = 0;
        let mut max_seq = None;
        for &(seq, _) in &out {
            match max_seq {
                Some(m) if seq < m => overtaken += 1,
                _ => max_seq = Some(seq),
            }
        }
        assert_eq!(overtaken, s.counters().released_out_of_order);
        assert!(overtaken >= marked * 9 / 10, "{overtaken} of {marked}");
        assert!(overtaken <= marked);
        // The others (delay below 10 + 5 ms) keep their order among themselves.
        let in_order: Vec<u32> = out
            .iter()
            .filter(|&&(seq, at)| at - u64::from(seq) * MS < 15 * MS)
            .map(|&(seq, _)| seq)
            .collect();
        assert_eq!(in_order.len() as u64, 20_000 - marked);
        assert!(in_order.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let c = Impairment {
            delay_ns: 100 * MS,
            queue_cap: 10,
            ..cfg()
        };
        let mut s: Scheduler<Vec<u8>> = Scheduler::new(c, 1, 0);
        let verdicts: Vec<Verdict> = (0..15).map(|i| s.offer(i, vec![0; 100])).collect();
        assert!(
            verdicts[..10]
                .iter()
                .all(|v| matches!(v, Verdict::Queued { .. }))
        );
        assert!(verdicts[10..].iter().all(|v| *v == Verdict::Full));
        assert_eq!(s.counters().dropped_cap, 5);
        assert_eq!(s.counters().max_queue, 10);
        assert_eq!(s.pop_due(100 * MS - 1, 0), None, "nothing is due early");
        assert_eq!(s.pop_due(99 * MS, MS / 2), None);
        assert!(
            s.pop_due(99 * MS + MS / 2, MS / 2).is_some(),
            "half a ms early"
        );
        assert_eq!(s.counters().timer_early_ns_max, MS / 2);
        assert_eq!(s.counters().timer_error_ns_sum, -((MS / 2) as i64));
        assert!(s.pop_due(101 * MS, 0).is_some());
        // The second packet arrived at 1 ns and was due at 100 ms + 1 ns.
        assert_eq!(s.counters().timer_late_ns_max, MS - 1);
        assert_eq!(s.counters().timer_error_ns_sum, (MS / 2 - 1) as i64);
        assert_eq!(s.counters().released_bytes, 200);
        assert_eq!(s.counters().received_bytes, 1_500);
    }

    #[test]
    fn per_direction_values_parse() {
        assert_eq!(
            parse_pct("2").unwrap(),
            PerDir {
                a_to_b: 2.0,
                b_to_a: 2.0
            }
        );
        assert_eq!(
            parse_pct("0.5, 5").unwrap(),
            PerDir {
                a_to_b: 0.5,
                b_to_a: 5.0
            }
        );
        assert!(parse_pct("101").is_err());
        assert!(parse_pct("-1").is_err());
        assert!(parse_pct("x").is_err());
        let d = parse_dur("10ms,40ms").unwrap();
        assert_eq!(d.a_to_b, Duration::from_millis(10));
        assert_eq!(d.b_to_a, Duration::from_millis(40));
        assert_eq!(parse_dur("0").unwrap().a_to_b, Duration::ZERO);
        assert!(parse_dur("25").is_err(), "a unit is needed");
        assert!(parse_dur("11s").is_err());
    }
}
