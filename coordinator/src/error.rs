//! The coordinator's errors and their one mapping to gRPC status codes.
//!
//! | error | code |
//! |---|---|
//! | a field out of range | `INVALID_ARGUMENT` (the message names the field) |
//! | no live worker at all | `UNAVAILABLE` |
//! | the admission queue is full | `RESOURCE_EXHAUSTED`, before any output, with a retry hint |
//! | no worker had room within `--admission-timeout` | `RESOURCE_EXHAUSTED`, before any output, with a retry hint |
//! | no worker left to retry or resume on | `UNAVAILABLE` (says how many tokens were delivered) |
//! | the deadline passed | `DEADLINE_EXCEEDED` |
//! | the client stopped reading | `ABORTED` (when it reads again, it learns why the stream ended) |
//! | a worker's own answer | its code, kept so retry logic can read it |
//!
//! Every status leaves through [`CoordinatorError::into_status`], which puts
//! the request id in the message and in the `x-request-id` metadata, and on
//! an overload refusal the retry hint: `retry-after` (seconds, as HTTP's
//! header, which the HTTP API sets from it) and gRPC's
//! `grpc-retry-pushback-ms`.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The response metadata key carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The metadata key of the retry hint, in seconds.
pub const RETRY_AFTER_HEADER: &str = "retry-after";

/// Seconds an overloaded coordinator asks a client to wait before retrying.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The trailer naming the refused field of an INVALID_ARGUMENT (the HTTP
/// API's `param`).
pub use nanoinfer_proto::limits::INVALID_FIELD_HEADER;

/// Why an `Infer` call failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is out of range; the message names the field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// No live worker is registered (or every one is ejected).
    #[error("no live worker is registered")]
    NoWorkers,
    /// No known worker serves the requested model.
    #[error("model: no live worker serves model {0:?}")]
    ModelNotFound(String),
    /// A worker answered with an error status; its code is kept so clients
    /// (and retry logic) see what the worker said.
    #[error("worker {worker}: {status}")]
    Upstream {
        /// The worker's id.
        worker: String,
        /// What it answered.
        status: Status,
    },
    /// The worker's stream ended without a final message.
    #[error("worker {0} closed the stream before the final message")]
    Truncated(String),
    /// A worker running the request made no progress for the timeout.
    #[error("worker {worker} made no progress for {seconds} s on a request it was running")]
    FirstTokenTimeout {
        /// The worker's id.
        worker: String,
        /// The timeout.
        seconds: u64,
    },
    /// The admission queue is full.
    #[error("overloaded: {capacity} requests already wait for a worker; retry later")]
    QueueFull {
        /// The queue's bound (`--admission-queue`).
        capacity: usize,
    },
    /// No worker had room within the admission timeout.
    #[error(
        "overloaded: no worker had room within {seconds} s{}",
        busy_note(tried)
    )]
    QueueTimeout {
        /// `--admission-timeout`.
        seconds: u64,
        /// `worker: message` for each worker that answered "full".
        tried: Vec<String>,
    },
    /// Retries and resumes ran out (no worker left, or the attempt limit).
    #[error("no worker left to {} on after {delivered} tokens were delivered; tried {}",
        if *delivered == 0 { "run it" } else { "resume it" }, tried.join("; "))]
    OutOfWorkers {
        /// Tokens the client received.
        delivered: u32,
        /// `worker: what went wrong` for each attempt.
        tried: Vec<String>,
    },
    /// The request's deadline passed.
    #[error("deadline exceeded after {delivered} tokens were delivered")]
    DeadlineExceeded {
        /// Tokens the client received.
        delivered: u32,
    },
    /// The client made no read progress for the stalled-stream timeout.
    #[error("stalled: the client read nothing for {seconds} s; the stream was cancelled")]
    Stalled {
        /// The timeout.
        seconds: u64,
    },
}

fn busy_note(tried: &[String]) -> String {
    if tried.is_empty() {
        String::new()
    } else {
        format!("; {}", tried.join("; "))
    }
}

impl CoordinatorError {
    /// An invalid-argument error for `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// The status code table.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NoWorkers => Code::Unavailable,
            Self::ModelNotFound(_) => Code::NotFound,
            Self::Upstream { status, .. } => status.code(),
            Self::Truncated(_) | Self::FirstTokenTimeout { .. } => Code::Unavailable,
            Self::QueueFull { .. } | Self::QueueTimeout { .. } => Code::ResourceExhausted,
            Self::OutOfWorkers { .. } => Code::Unavailable,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::Stalled { .. } => Code::Aborted,
        }
    }

    /// The status a client sees: the code from the table, the request id in
    /// the message (when known) and in `x-request-id`.
    pub fn into_status(self, request_id: Option<&str>) -> Status {
        let code = self.code();
        // Worth retrying soon: a full queue, or no worker for the moment
        // (restarting workers, a model whose workers all left).
        let overloaded = matches!(
            self,
            Self::QueueFull { .. } | Self::QueueTimeout { .. } | Self::NoWorkers
        );
        let detail = match &self {
            // The worker's message already names the field; pass it on.
            Self::Upstream { status, .. } if code == Code::InvalidArgument => {
                status.message().to_string()
            }
            Self::Upstream { worker, status } => format!("worker {worker}: {}", status.message()),
            _ => self.to_string(),
        };
        let field = match &self {
            Self::InvalidArgument { field, .. } => Some(*field),
            // The worker names the field it refused in the status's metadata.
            Self::Upstream { status, .. } if code == Code::InvalidArgument => {
                nanoinfer_proto::limits::invalid_field(status)
            }
            _ => None,
        };
        let mut status = match request_id {
            None => Status::new(code, detail),
            Some(id) => {
                let mut status =
                    Status::new(code, format!("request {}: {detail}", id.escape_debug()));
                if let Ok(value) = MetadataValue::try_from(id) {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, value);
                }
                status
            }
        };
        if let Some(field) = field {
            status
                .metadata_mut()
                .insert(INVALID_FIELD_HEADER, MetadataValue::from_static(field));
        }
        // The worker's reason code (context_length_exceeded) goes on.
        if let Self::Upstream { status: worker, .. } = &self {
            if let Some(v) = worker
                .metadata()
                .get(nanoinfer_proto::limits::ERROR_CODE_HEADER)
            {
                status
                    .metadata_mut()
                    .insert(nanoinfer_proto::limits::ERROR_CODE_HEADER, v.clone());
            }
        }
        if overloaded {
            let m = status.metadata_mut();
            m.insert(RETRY_AFTER_HEADER, MetadataValue::from(RETRY_AFTER_SECONDS));
            m.insert(
                "grpc-retry-pushback-ms",
                MetadataValue::from(RETRY_AFTER_SECONDS * 1000),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_table() {
        let status = CoordinatorError::invalid("top_p", "x").into_status(None);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "top_p: x");
        assert_eq!(
            CoordinatorError::NoWorkers.into_status(None).code(),
            Code::Unavailable
        );
        let upstream = CoordinatorError::Upstream {
            worker: "w1".into(),
            status: Status::resource_exhausted("queue is full"),
        };
        let status = upstream.into_status(Some("r-1"));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("w1"), "{status:?}");
        assert!(status.message().contains("request r-1"), "{status:?}");
        assert_eq!(status.metadata().get(REQUEST_ID_HEADER).unwrap(), "r-1");
        let bad_prompt = CoordinatorError::Upstream {
            worker: "w1".into(),
            status: Status::invalid_argument("prompt: too long"),
        };
        let status = bad_prompt.into_status(Some("r"));
        assert_eq!(status.message(), "request r: prompt: too long");
        // The field comes from the worker's metadata, never from its text.
        assert!(status.metadata().get(INVALID_FIELD_HEADER).is_none());
        // The worker's reason code is passed on, with the field it names.
        let mut worker = Status::invalid_argument("messages: the context window is 8 tokens");
        worker.metadata_mut().insert(
            nanoinfer_proto::limits::ERROR_CODE_HEADER,
            MetadataValue::from_static("context_length_exceeded"),
        );
        worker
            .metadata_mut()
            .insert(INVALID_FIELD_HEADER, MetadataValue::from_static("messages"));
        let status = CoordinatorError::Upstream {
            worker: "w1".into(),
            status: worker,
        }
        .into_status(Some("r"));
        assert_eq!(
            status.metadata().get(INVALID_FIELD_HEADER).unwrap(),
            "messages"
        );
        assert_eq!(
            nanoinfer_proto::limits::error_code(&status),
            Some("context_length_exceeded")
        );
        let out = CoordinatorError::OutOfWorkers {
            delivered: 20,
            tried: vec!["w1: broken".into(), "w2: broken".into()],
        };
        assert_eq!(out.code(), Code::Unavailable);
        let message = out.into_status(Some("abc")).message().to_string();
        assert!(
            message.contains("abc") && message.contains("20 tokens"),
            "{message}"
        );
        let full = CoordinatorError::QueueTimeout {
            seconds: 120,
            tried: vec!["w1: queue is full".into(), "w2: queue is full".into()],
        };
        let status = full.into_status(None);
        assert_eq!(status.code(), Code::ResourceExhausted);
        let message = status.message().to_string();
        assert!(
            message.contains("w1") && message.contains("w2") && message.contains("120 s"),
            "{message}"
        );
        assert_eq!(status.metadata().get(RETRY_AFTER_HEADER).unwrap(), "1");
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1000"
        );
        let status = CoordinatorError::QueueFull { capacity: 8 }.into_status(Some("r"));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("8 requests"), "{status:?}");
        assert!(status.metadata().get(RETRY_AFTER_HEADER).is_some());
        let stalled = CoordinatorError::Stalled { seconds: 30 }.into_status(None);
        assert_eq!(stalled.code(), Code::Aborted);
        assert!(stalled.message().starts_with("stalled"), "{stalled:?}");
        assert_eq!(
            CoordinatorError::DeadlineExceeded { delivered: 3 }.code(),
            Code::DeadlineExceeded
        );
    }

    #[test]
    fn ids_are_escaped_and_only_valid_headers_are_sent() {
        let status = CoordinatorError::NoWorkers.into_status(Some("é"));
        assert!(status.message().starts_with("request é:"));
        let status = CoordinatorError::NoWorkers.into_status(Some("a\nb"));
        assert!(status.message().starts_with("request a\\nb:"), "{status:?}");
        assert!(status.metadata().get(REQUEST_ID_HEADER).is_none());
    }
}
