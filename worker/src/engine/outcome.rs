//! What is recorded when a request leaves the engine: the request span's
//! final attributes, one log line, and the finish metrics — for a sequence
//! that ran ([`retired`]) and for a request that left the queue without
//! running ([`left_queue`]).

use super::sequence::Sequence;
use super::{Failure, Job};
use crate::metrics::{FinishLabel, WorkerMetrics};

/// Records the end of a sequence that ran. `client_left`: its receiver was
/// gone before everything was delivered.
pub(super) fn retired(metrics: &WorkerMetrics, seq: &Sequence, client_left: bool) {
    let g = seq.generation();
    let span = &g.span;
    let _entered = span.enter();
    let elapsed_ms = seq.admitted().elapsed().as_millis() as u64;
    let (proposed, kept) = seq.speculation();
    if proposed > 0 {
        metrics
            .spec_acceptance
            .observe(f64::from(kept) / f64::from(proposed));
    }
    let finish_reason = match (seq.failure(), seq.finish()) {
        (Some(failure), _) => {
            nanoinfer_telemetry::mark_span_error(span, &failure.to_string());
            span.record("gen_ai.usage.output_tokens", seq.generated());
            span.record("gen_ai.response.finish_reasons", failure.label());
            match failure {
                Failure::Internal(_) => tracing::error!(request_id = %g.request_id,
                    error = %failure, generated_tokens = seq.generated(), elapsed_ms,
                    "generation failed"),
                _ => tracing::warn!(request_id = %g.request_id,
                    error = %failure, generated_tokens = seq.generated(), elapsed_ms,
                    "generation failed"),
            }
            failure.label()
        }
        (None, Some(reason)) if !client_left => {
            span.record("gen_ai.usage.output_tokens", seq.generated());
            span.record("gen_ai.response.finish_reasons", reason.label());
            if let Some(decode_span) = seq.decode_span() {
                decode_span.record("generated_tokens", seq.generated());
            }
            if let Some(started) = seq.decode_started() {
                let decode = started.elapsed().as_secs_f64();
                metrics.decode_time.observe(decode);
                let new = seq.new_tokens();
                if new > 1 {
                    metrics
                        .time_per_output_token
                        .observe(decode / f64::from(new - 1));
                }
            }
            tracing::info!(request_id = %g.request_id, ?reason,
                prompt_tokens = seq.prompt_len(), resumed_tokens = g.resume.len(),
                generated_tokens = seq.generated(), elapsed_ms, "generation finished");
            reason.label()
        }
        // The response stream ends a request at its deadline itself (the
        // engine sees the client leave): count it as what it was.
        _ if seq.past_deadline(std::time::Instant::now()) => {
            let failure = Failure::DeadlineExceeded;
            nanoinfer_telemetry::mark_span_error(span, &failure.to_string());
            span.record("gen_ai.response.finish_reasons", failure.label());
            tracing::warn!(request_id = %g.request_id, error = %failure,
                generated_tokens = seq.generated(), elapsed_ms, "generation failed");
            failure.label()
        }
        _ => {
            span.record("gen_ai.response.finish_reasons", "client_left");
            tracing::info!(request_id = %g.request_id,
                generated_tokens = seq.generated(), "client left; generation stopped");
            "client_left"
        }
    };
    metrics
        .requests
        .get_or_create(&FinishLabel { finish_reason })
        .inc();
}

/// Records a request that left the queue without running: its client went
/// away (`failure` is `None`) or it failed there.
pub(super) fn left_queue(metrics: &WorkerMetrics, job: &Job, failure: Option<&Failure>) {
    let g = &job.generation;
    let span = &g.span;
    let _entered = span.enter();
    let waited_ms = job.submitted.elapsed().as_millis() as u64;
    metrics
        .queue_time
        .observe(job.submitted.elapsed().as_secs_f64());
    let finish_reason = match failure {
        Some(failure) => {
            nanoinfer_telemetry::mark_span_error(span, &failure.to_string());
            span.record("gen_ai.response.finish_reasons", failure.label());
            tracing::warn!(request_id = %g.request_id, error = %failure, waited_ms,
                "request left the queue");
            failure.label()
        }
        None => {
            span.record("gen_ai.response.finish_reasons", "client_left");
            tracing::info!(request_id = %g.request_id, waited_ms,
                "client left while queued");
            "client_left"
        }
    };
    metrics
        .requests
        .get_or_create(&FinishLabel { finish_reason })
        .inc();
}
