//! The worker's errors and their one mapping to gRPC status codes.
//!
//! | error | code |
//! |---|---|
//! | a field out of range | `INVALID_ARGUMENT` (the message starts with the field, and `x-nanoinfer-invalid-field` names it) |
//! | the prompt does not fit the context window | `INVALID_ARGUMENT` naming `prompt` or `messages`, with `x-nanoinfer-error-code: context_length_exceeded` |
//! | queue full, or no room in the KV cache | `RESOURCE_EXHAUSTED` |
//! | shutting down, or waited past `--queue-timeout` | `UNAVAILABLE` |
//! | the call's deadline passed | `DEADLINE_EXCEEDED` |
//! | the engine failed | `INTERNAL` |
//!
//! Every message ends with the request id, so a client's error can be
//! found in the worker's logs.

use tonic::{Code, Status};

use crate::engine::{EngineError, Failure};

/// Why a `Generate` call was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A request field is out of range; the message names the field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The prompt (with `max_tokens`, when the request holds it to that)
    /// does not fit the context window; the message names `prompt` or
    /// `messages`.
    #[error("{field}: {message}")]
    ContextLength {
        /// `prompt` or `messages`.
        field: &'static str,
        /// The window, and what the request asked for.
        message: String,
    },
    /// The request cannot be served by this model (e.g. messages to a
    /// model without a chat template).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The engine refused the request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine gave up on the request after accepting it.
    #[error(transparent)]
    Failed(#[from] Failure),
}

impl WorkerError {
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
            Self::InvalidArgument { .. } | Self::ContextLength { .. } => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Engine(EngineError::QueueFull(_)) => Code::ResourceExhausted,
            Self::Engine(EngineError::ShuttingDown) => Code::Unavailable,
            Self::Engine(EngineError::Context(_)) => Code::Internal,
            Self::Failed(Failure::Capacity(_)) => Code::ResourceExhausted,
            Self::Failed(Failure::Internal(_)) => Code::Internal,
            Self::Failed(Failure::DeadlineExceeded) => Code::DeadlineExceeded,
            // Busy, not broken: the coordinator holds the request in its
            // admission queue and tries again (this worker included).
            Self::Failed(Failure::QueueTimeout(_)) => Code::ResourceExhausted,
        }
    }

    /// The status sent to the caller of request `request_id`.
    pub fn status(&self, request_id: &str) -> Status {
        let message = if request_id.is_empty() {
            self.to_string()
        } else {
            format!("{self} (request_id {request_id})")
        };
        let mut status = Status::new(self.code(), message);
        if let Self::InvalidArgument { field, .. } | Self::ContextLength { field, .. } = self {
            status.metadata_mut().insert(
                nanoinfer_proto::limits::INVALID_FIELD_HEADER,
                tonic::metadata::MetadataValue::from_static(field),
            );
        }
        if let Self::ContextLength { .. } = self {
            status.metadata_mut().insert(
                nanoinfer_proto::limits::ERROR_CODE_HEADER,
                tonic::metadata::MetadataValue::from_static(
                    nanoinfer_proto::limits::CONTEXT_LENGTH_EXCEEDED,
                ),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn engine_failures_have_their_codes_and_name_the_request() {
        for (failure, code) in [
            (Failure::Capacity("no slot".into()), Code::ResourceExhausted),
            (Failure::Internal("boom".into()), Code::Internal),
            (Failure::DeadlineExceeded, Code::DeadlineExceeded),
            (
                Failure::QueueTimeout(Duration::from_secs(30)),
                Code::ResourceExhausted,
            ),
        ] {
            let status = WorkerError::from(failure).status("req-7");
            assert_eq!(status.code(), code);
            assert!(status.message().contains("req-7"), "{status:?}");
        }
        let status = WorkerError::invalid("resume_token_ids", "bad").status("r");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("resume_token_ids"));
        assert_eq!(
            nanoinfer_proto::limits::invalid_field(&status),
            Some("resume_token_ids")
        );
        assert_eq!(nanoinfer_proto::limits::error_code(&status), None);
        let status = WorkerError::ContextLength {
            field: "messages",
            message: "too long".into(),
        }
        .status("r");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("messages: too long"));
        assert_eq!(
            nanoinfer_proto::limits::invalid_field(&status),
            Some("messages")
        );
        assert_eq!(
            nanoinfer_proto::limits::error_code(&status),
            Some("context_length_exceeded")
        );
    }
}
