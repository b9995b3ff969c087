//! The coordinator's errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

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
    /// No live worker is registered.
    #[error("no live worker is registered")]
    NoWorkers,
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
            Self::Upstream { status, .. } => status.code(),
            Self::Truncated(_) => Code::Unavailable,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        match &e {
            // The worker's message already names the field; pass it unchanged.
            CoordinatorError::Upstream { status, .. } if status.code() == Code::InvalidArgument => {
                Status::new(Code::InvalidArgument, status.message().to_string())
            }
            CoordinatorError::Upstream { worker, status } => Status::new(
                status.code(),
                format!("worker {worker}: {}", status.message()),
            ),
            _ => Status::new(e.code(), e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_table() {
        assert_eq!(
            Status::from(CoordinatorError::invalid("top_p", "x")).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(CoordinatorError::NoWorkers).code(),
            Code::Unavailable
        );
        let upstream = CoordinatorError::Upstream {
            worker: "w1".into(),
            status: Status::resource_exhausted("queue is full"),
        };
        let status = Status::from(upstream);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("w1"));
        let bad_prompt = CoordinatorError::Upstream {
            worker: "w1".into(),
            status: Status::invalid_argument("prompt: too long"),
        };
        assert_eq!(Status::from(bad_prompt).message(), "prompt: too long");
    }
}
