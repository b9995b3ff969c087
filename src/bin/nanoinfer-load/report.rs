//! Counting the streams, and the report (a table or one JSON object).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fault::KillReport;
use crate::stream::{Api, End, Stream};
use crate::Args;

/// Counts of one API's streams (or all).
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: u64,
    pub completed: u64,
    pub rejected: BTreeMap<String, u64>,
    pub failed: BTreeMap<String, u64>,
    pub ok_without_final: u64,
    pub timed_out: u64,
    pub violations: u64,
    pub retry_after: u64,
    pub tokens: u64,
    pub ttft_ms: Vec<f64>,
}

impl Tally {
    pub fn add(&mut self, s: &Stream) {
        self.sent += 1;
        match &s.end {
            End::Completed => self.completed += 1,
            End::Rejected(code) => *self.rejected.entry(code.clone()).or_default() += 1,
            End::Failed(code) => *self.failed.entry(code.clone()).or_default() += 1,
            End::OkWithoutFinal => self.ok_without_final += 1,
            End::TimedOut => self.timed_out += 1,
        }
        self.violations += u64::from(s.violation.is_some());
        self.retry_after += u64::from(s.retry_after);
        self.tokens += u64::from(s.tokens);
        self.ttft_ms.extend(s.ttft.map(|t| t.as_secs_f64() * 1e3));
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// No stream broke the contract (rejections up front are allowed).
    pub fn ok(&self) -> bool {
        self.failed_total() == 0
            && self.ok_without_final == 0
            && self.timed_out == 0
            && self.violations == 0
    }

    pub fn json(&self) -> Value {
        let [p50, p99, max] = percentiles(&self.ttft_ms);
        json!({
            "sent": self.sent,
            "completed": self.completed,
            "rejected_up_front": self.rejected_total(),
            "rejected_by_code": self.rejected,
            "failed_after_output": self.failed_total(),
            "failed_by_code": self.failed,
            "ok_without_final": self.ok_without_final,
            "timed_out": self.timed_out,
            "order_violations": self.violations,
            "retry_after_seen": self.retry_after,
            "tokens": self.tokens,
            "ttft_ms": {"p50": p50, "p99": p99, "max": max},
        })
    }
}

/// p50, p99 and max (nearest rank); zeros when empty.
pub fn percentiles(values: &[f64]) -> [f64; 3] {
    if values.is_empty() {
        return [0.0; 3];
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

/// Every stream counted per API and in total, and the first few that did
/// not complete, with why.
#[derive(Debug, Default)]
pub struct Report {
    pub all: Tally,
    pub grpc: Tally,
    pub http: Tally,
    pub examples: Vec<String>,
}

impl Report {
    pub fn of(streams: &[Stream]) -> Self {
        let mut r = Self::default();
        for s in streams {
            r.all.add(s);
            match s.api {
                Api::Grpc => r.grpc.add(s),
                Api::Http => r.http.add(s),
            }
            let what = match &s.end {
                End::Completed => None,
                End::Rejected(code) => Some(format!("rejected up front: {code}")),
                End::Failed(code) => Some(format!("failed after {} tokens: {code}", s.tokens)),
                End::OkWithoutFinal => Some("ended OK without a final message".into()),
                End::TimedOut => Some(format!("timed out after {} tokens", s.tokens)),
            };
            let mut line = what.map(|w| format!("{}: {w}: {}", s.id, s.detail));
            if let Some(v) = &s.violation {
                line = Some(format!("{}: token order: {v}", s.id));
            }
            if let Some(line) = line.filter(|_| r.examples.len() < 10) {
                r.examples.push(line);
            }
        }
        r
    }

    /// The `--json` object: the totals at the top level, then per API, the
    /// coordinator's `counters` (their increase) and the fault.
    pub fn json(
        &self,
        wall: Duration,
        counters: Option<Value>,
        kill: Option<&KillReport>,
    ) -> Value {
        let all = &self.all;
        json!({
            "ok": all.ok(),
            "sent": all.sent,
            "completed": all.completed,
            "rejected_up_front": all.rejected_total(),
            "rejected_by_code": all.rejected,
            "failed_after_output": all.failed_total(),
            "failed_by_code": all.failed,
            "ok_without_final": all.ok_without_final,
            "timed_out": all.timed_out,
            "order_violations": all.violations,
            "retry_after_seen": all.retry_after,
            "tokens": all.tokens,
            "ttft_ms": all.json()["ttft_ms"],
            "wall_ms": wall.as_secs_f64() * 1e3,
            "grpc": self.grpc.json(),
            "http": self.http.json(),
            "metrics": counters,
            "kill": kill.map(|k| json!({
                "pid": k.pid,
                "signal": k.signal.map(|s| s.name()),
                "after_ms": k.after_ms,
                "sent_ms": k.sent_ms,
                "error": k.error,
                "tokens_before": k.tokens_before,
                "in_flight_before": k.in_flight,
                "first_ejection_ms": k.first_ejection_ms,
            })),
            "examples": self.examples,
        })
    }
}

/// The human report of `report` (its `--json` object).
pub fn print_table(args: &Args, r: &Report, report: &Value) {
    let (grpc, http, all) = (&r.grpc, &r.http, &r.all);
    println!(
        "nanoinfer-load: {} gRPC + {} HTTP streams at once, max_tokens {}, {}, temperature {}",
        args.grpc_streams,
        args.http_streams,
        args.max_tokens,
        if args.chat { "chat" } else { "raw prompt" },
        args.temperature
    );
    println!("{:<22}{:>10}{:>10}{:>10}", "", "gRPC", "HTTP", "total");
    let row = |name: &str, f: &dyn Fn(&Tally) -> String| {
        println!("{name:<22}{:>10}{:>10}{:>10}", f(grpc), f(http), f(all));
    };
    row("sent", &|t| t.sent.to_string());
    row("completed", &|t| t.completed.to_string());
    row("rejected up front", &|t| t.rejected_total().to_string());
    row("failed after output", &|t| t.failed_total().to_string());
    row("OK without final", &|t| t.ok_without_final.to_string());
    row("timed out", &|t| t.timed_out.to_string());
    row("token order broken", &|t| t.violations.to_string());
    row("tokens received", &|t| t.tokens.to_string());
    row("TTFT p50 ms", &|t| {
        format!("{:.0}", percentiles(&t.ttft_ms)[0])
    });
    row("TTFT p99 ms", &|t| {
        format!("{:.0}", percentiles(&t.ttft_ms)[1])
    });
    let codes = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (name, t) in [("gRPC", grpc), ("HTTP", http)] {
        if !t.rejected.is_empty() {
            println!(
                "{name} rejected up front by code: {} (Retry-After on {})",
                codes(&t.rejected),
                t.retry_after
            );
        }
        if !t.failed.is_empty() {
            println!("{name} failed after output by code: {}", codes(&t.failed));
        }
    }
    let n = |v: &Value| v.as_f64().map_or("?".into(), |v| format!("{v:.0}"));
    match &report["metrics"] {
        Value::Null => println!("coordinator counters: not scraped (give --metrics)"),
        m => {
            println!(
                "coordinator counters during the run: ejections +{}, readmissions +{}, retries +{}, resumes +{}",
                n(&m["worker_ejections"]),
                n(&m["worker_readmissions"]),
                n(&m["retries"]),
                n(&m["resumes"])
            );
            if !m["admission_queued"].is_null() {
                println!(
                    "admission queue: queued +{}, refused full +{}, timed out +{}",
                    n(&m["admission_queued"]),
                    n(&m["admission_rejected_full"]),
                    n(&m["admission_timeouts"])
                );
            }
        }
    }
    if let Some(k) = report["kill"].as_object() {
        let mut line = format!(
            "SIG{} to pid {} at +{:.0} ms",
            args.kill_signal.name(),
            args.kill_pid.unwrap_or(0),
            k["sent_ms"].as_f64().unwrap_or(f64::NAN)
        );
        if let Some(e) = k["error"].as_str() {
            line = format!(
                "SIG{} to pid {}: {e}",
                args.kill_signal.name(),
                args.kill_pid.unwrap_or(0)
            );
        } else {
            line += &format!(", after {} tokens", k["tokens_before"]);
            match k["first_ejection_ms"].as_f64() {
                Some(ms) => line += &format!("; first ejection {ms:.0} ms after it"),
                None if !report["metrics"].is_null() => line += "; no ejection seen",
                None => {}
            }
        }
        println!("{line}");
    }
    println!(
        "wall time {:.1} s",
        report["wall_ms"].as_f64().unwrap_or(0.0) / 1e3
    );
    for e in report["examples"].as_array().into_iter().flatten() {
        println!("  {}", e.as_str().unwrap_or_default());
    }
    println!(
        "{}",
        if all.ok() {
            "OK: no stream failed after output, ended without its final message, timed out or broke token order"
        } else {
            "FAILED: some streams failed after output, ended without their final message, timed out or broke token order"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&v), [50.0, 99.0, 100.0]);
        assert_eq!(percentiles(&[]), [0.0; 3]);
    }
}
