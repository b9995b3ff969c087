//! The fault: a signal to a process at a moment of the run, and what the
//! coordinator's metrics said around it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use tokio::sync::watch;

use crate::http::{scrape, HttpTarget, EJECTIONS, IN_FLIGHT};

/// A signal for `--kill-signal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KillSignal {
    #[value(name = "KILL")]
    Kill,
    #[value(name = "STOP")]
    Stop,
    #[value(name = "TERM")]
    Term,
}

impl KillSignal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "KILL",
            Self::Stop => "STOP",
            Self::Term => "TERM",
        }
    }

    pub fn signal(self) -> rustix::process::Signal {
        use rustix::process::Signal;
        match self {
            Self::Kill => Signal::KILL,
            Self::Stop => Signal::STOP,
            Self::Term => Signal::TERM,
        }
    }
}

/// Sends `signal` to `pid` (`kill(2)`).
pub fn send_signal(pid: i32, signal: rustix::process::Signal) -> Result<(), String> {
    let target = rustix::process::Pid::from_raw(pid).ok_or(format!("bad pid {pid}"))?;
    rustix::process::kill_process(target, signal).map_err(|e| format!("kill {pid}: {e}"))
}

/// What happened to the signal.
#[derive(Debug, Default)]
pub struct KillReport {
    pub pid: i32,
    pub signal: Option<KillSignal>,
    /// When it was due, after the streams were opened.
    pub after_ms: u64,
    /// When it was sent, after the streams were opened.
    pub sent_ms: Option<f64>,
    pub error: Option<String>,
    /// Tokens all streams had received when it was sent.
    pub tokens_before: u64,
    /// Requests in flight per worker (coordinator metrics) just before.
    pub in_flight: BTreeMap<String, f64>,
    /// First ejection counted after the signal, in ms after it.
    pub first_ejection_ms: Option<f64>,
}

/// Sends `signal` to `pid` `after` the run `started`, unless every stream
/// ended first (`done`). With `metrics`, notes each worker's requests in
/// flight just before, and polls every 100 ms, while streams run and for
/// about 2 s after, for the first ejection that follows the signal.
#[allow(clippy::too_many_arguments)]
pub async fn signal_during(
    pid: i32,
    signal: KillSignal,
    started: Instant,
    after: Duration,
    metrics: Option<&HttpTarget>,
    tokens: &AtomicU64,
    mut done: watch::Receiver<bool>,
) -> KillReport {
    let mut report = KillReport {
        pid,
        signal: Some(signal),
        after_ms: after.as_millis() as u64,
        ..Default::default()
    };
    tokio::select! {
        () = tokio::time::sleep_until((started + after).into()) => {}
        _ = done.wait_for(|d| *d) => {
            report.error = Some("not sent: every stream had ended".into());
            return report;
        }
    }
    let ejections = match metrics {
        Some(m) => scrape(m).await.ok().map(|now| {
            report.in_flight = now.by_worker(IN_FLIGHT);
            now.total(EJECTIONS)
        }),
        None => None,
    };
    report.tokens_before = tokens.load(Ordering::Relaxed);
    let signalled = Instant::now();
    report.sent_ms = Some((signalled - started).as_secs_f64() * 1e3);
    if let Err(e) = send_signal(pid, signal.signal()) {
        report.error = Some(e);
        return report;
    }
    let (Some(m), Some(ejections)) = (metrics, ejections) else {
        return report;
    };
    let mut polls_after_done = 0;
    while polls_after_done < 20 {
        if *done.borrow() {
            polls_after_done += 1;
        }
        if scrape(m)
            .await
            .is_ok_and(|now| now.total(EJECTIONS) > ejections)
        {
            report.first_ejection_ms = Some(signalled.elapsed().as_secs_f64() * 1e3);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report
}
