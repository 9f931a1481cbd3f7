//! The live progress line: connections, send and delivery rates, errors, phase.
//! A spinner redrawn in place on a terminal; plain lines every few seconds when
//! stderr is not a terminal (CI logs).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tutti::util::Unpoisoned;

use crate::stats::live;

/// The running reporter.
#[derive(Debug)]
pub struct Progress {
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Progress {
    /// Stops it and clears the line.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
    }
}

/// Starts the progress reporter (nothing is shown when `quiet`).
pub fn start(quiet: bool) -> Progress {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        if quiet {
            return;
        }
        let tty = std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .expect("valid template"),
            );
            b
        });
        let every = if tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        let l = live();
        let started = Instant::now();
        let (mut last_sends, mut last_deliveries, mut last_at) = (0, 0, Instant::now());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if flag.load(Ordering::SeqCst) {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return;
            }
            let now = Instant::now();
            if now - last_at < every {
                continue;
            }
            let dt = (now - last_at).as_secs_f64().max(1e-9);
            let (sends, deliveries) = (l.sends.get(), l.deliveries.get());
            let msg = format!(
                "{} | conns {}/{} | {:.0} sends/s | {:.0} deliveries/s | errors {}",
                l.phase.locked(),
                l.connected.get(),
                l.attempted.get(),
                (sends - last_sends) as f64 / dt,
                (deliveries - last_deliveries) as f64 / dt,
                l.errors.get(),
            );
            (last_sends, last_deliveries, last_at) = (sends, deliveries, now);
            match &bar {
                Some(b) => {
                    b.set_message(msg);
                    b.tick();
                }
                None => eprintln!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64()),
            }
        }
    });
    Progress { stop, task }
}
