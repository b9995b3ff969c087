//! The worker side of a request: building `Generate` calls (with the
//! deadline and, on a resume, the token ids already delivered), and the one
//! rule that decides what a worker failure means.

use std::time::Duration;

use nanoinfer_proto::worker::{self as wpb, GenerateRequest};
use tonic::{Code, Request, Status};

use crate::validate::InferParams;

/// What to do after a worker failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Try another worker (before the first token: retry; after: resume).
    pub retry: bool,
    /// Take the worker out of routing until a probe finds it healthy: its
    /// connection broke, not just this request.
    pub eject: bool,
}

/// How a worker failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// It answered (or the transport reported) this status.
    Status(Status),
    /// The stream ended without a final message.
    Truncated,
    /// Nothing arrived within the first-token timeout.
    FirstTokenTimeout,
}

/// Whether `status` came from the connection rather than from the worker's
/// own code: tonic attaches the transport error (hyper, h2, io) as its
/// source, and reports a reset or malformed stream as UNKNOWN.
fn is_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some() || status.code() == Code::Unknown
}

/// The retry/ejection rule.
///
/// - The request's own fault (INVALID_ARGUMENT and the like) or its deadline
///   ends it: another worker would say the same.
/// - Anything else the worker or the connection said is the worker's
///   problem: move the request (RESOURCE_EXHAUSTED: it is full; UNAVAILABLE:
///   shutting down, or the request waited too long in its queue; INTERNAL:
///   its engine failed; a transport error: it is gone).
/// - Only a broken connection, a cut stream or silence ejects the worker; a
///   full or draining worker is healthy and answers its probes anyway.
pub fn judge(failure: &Failure) -> Verdict {
    match failure {
        Failure::Truncated | Failure::FirstTokenTimeout => Verdict {
            retry: true,
            eject: true,
        },
        Failure::Status(status) => {
            let final_for_request = matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::DeadlineExceeded
                    | Code::OutOfRange
                    | Code::FailedPrecondition
                    | Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::Unimplemented
            );
            Verdict {
                retry: !final_for_request,
                eject: !final_for_request && is_transport(status),
            }
        }
    }
}

/// The `Generate` call for `params`, resuming after `delivered` token ids,
/// with `remaining` of the request's time as its `grpc-timeout`.
pub fn generate_request(
    params: &InferParams,
    delivered: &[i32],
    remaining: Duration,
) -> Request<GenerateRequest> {
    // Controls left off are not sent (their absence means off).
    fn set<T: PartialEq>(value: T, off: T) -> Option<T> {
        (value != off).then_some(value)
    }
    let c = params.controls;
    let off = nanoinfer_proto::limits::SamplingControls::default();
    let mut request = Request::new(GenerateRequest {
        request_id: params.request_id.clone(),
        prompt: params.prompt.clone(),
        max_tokens: params.max_tokens,
        temperature: params.temperature,
        top_p: params.top_p,
        seed: params.seed,
        stop: params.stop.clone(),
        resume_token_ids: delivered.to_vec(),
        messages: params.messages.iter().map(wpb::ChatMessage::from).collect(),
        top_k: set(c.top_k, off.top_k),
        min_p: set(c.min_p, off.min_p),
        repetition_penalty: set(c.repetition_penalty, off.repetition_penalty),
        presence_penalty: set(c.presence_penalty, off.presence_penalty),
        frequency_penalty: set(c.frequency_penalty, off.frequency_penalty),
        logprobs: c.logprobs,
        top_logprobs: c.top_logprobs,
        logit_bias: params
            .logit_bias
            .iter()
            .map(|&(id, bias)| (id as i32, bias))
            .collect(),
        json_schema: params.json_schema.clone(),
        strict_max_tokens: params.strict_max_tokens,
        tools: params.tools.clone(),
        grammar: params.grammar.clone(),
    });
    request.set_timeout(remaining);
    request
}

/// The metric label of a worker finish reason.
pub fn finish_label(reason: i32) -> &'static str {
    match wpb::FinishReason::try_from(reason).unwrap_or(wpb::FinishReason::Unspecified) {
        wpb::FinishReason::Unspecified => "unspecified",
        wpb::FinishReason::Length => "length",
        wpb::FinishReason::StopSequence => "stop_sequence",
        wpb::FinishReason::Eos => "eos",
        wpb::FinishReason::ContextLength => "context_length",
        wpb::FinishReason::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(code: Code) -> Verdict {
        judge(&Failure::Status(Status::new(code, "x")))
    }

    #[test]
    fn the_requests_own_faults_end_it() {
        for code in [Code::InvalidArgument, Code::DeadlineExceeded] {
            assert_eq!(
                verdict(code),
                Verdict {
                    retry: false,
                    eject: false
                },
                "{code:?}"
            );
        }
    }

    #[test]
    fn worker_faults_move_it_and_only_broken_links_eject() {
        for code in [Code::ResourceExhausted, Code::Unavailable, Code::Internal] {
            assert_eq!(
                verdict(code),
                Verdict {
                    retry: true,
                    eject: false
                },
                "{code:?}"
            );
        }
        assert_eq!(
            verdict(Code::Unknown),
            Verdict {
                retry: true,
                eject: true
            }
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let transport = Status::from_error(Box::new(io));
        assert!(judge(&Failure::Status(transport)).eject);
        assert!(judge(&Failure::Truncated).eject);
        assert!(judge(&Failure::FirstTokenTimeout).eject);
    }

    #[test]
    fn a_resume_carries_the_delivered_ids_and_the_deadline() {
        let params = InferParams {
            request_id: "r".into(),
            prompt: "p".into(),
            messages: vec![],
            max_tokens: 10,
            temperature: 0.0,
            top_p: 1.0,
            seed: 3,
            stop: vec![],
            controls: nanoinfer_proto::limits::SamplingControls {
                top_k: 40,
                ..Default::default()
            },
            n: 1,
            model: None,
            logit_bias: vec![(9, -100.0)],
            json_schema: r#"{"type":"object"}"#.into(),
            strict_max_tokens: true,
            tools: r#"[{"type":"function"}]"#.into(),
            grammar: String::new(),
        };
        let req = generate_request(&params, &[5, 6], Duration::from_millis(1500));
        assert_eq!(req.get_ref().logit_bias.get(&9), Some(&-100.0));
        assert_eq!(req.get_ref().json_schema, r#"{"type":"object"}"#);
        assert!(req.get_ref().strict_max_tokens);
        assert_eq!(req.get_ref().tools, r#"[{"type":"function"}]"#);
        assert_eq!(req.get_ref().top_k, Some(40));
        assert_eq!(req.get_ref().min_p, None, "controls left off are not sent");
        assert_eq!(req.get_ref().resume_token_ids, vec![5, 6]);
        assert_eq!(
            req.get_ref().max_tokens,
            10,
            "max_tokens counts resumed tokens"
        );
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            nanoinfer_proto::deadline::parse(timeout),
            Some(Duration::from_millis(1500))
        );
    }
}
