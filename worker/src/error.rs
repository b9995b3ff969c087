//! The worker's errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

use crate::engine::EngineError;

/// Why a `Generate` call was refused.
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
    /// The engine refused the request.
    #[error(transparent)]
    Engine(#[from] EngineError),
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
    fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::Engine(EngineError::QueueFull(_)) => Code::ResourceExhausted,
            Self::Engine(EngineError::ShuttingDown) => Code::Unavailable,
            Self::Engine(EngineError::Context(_)) => Code::Internal,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
