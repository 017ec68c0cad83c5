//! The NMS's domain errors and their one mapping to gRPC statuses.

use wayside_proto::error::fault_status;
use wayside_proto::types::{Epoch, Fault};

/// Why the NMS refused or could not finish a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NmsError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("wrong credential for volume {volume}")]
    Unauthenticated { volume: String },
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("volume {volume} exists already: {why}")]
    Exists { volume: String, why: String },
    #[error("volume moved to {to} (epoch {epoch})")]
    Moved { to: String, epoch: Epoch },
    #[error("this NMS does not own volume {volume} ({why})")]
    NotOwner { volume: String, why: String, owner_address: String, epoch: Epoch },
    #[error("{limit} exceeded: {value} of {max} {unit}")]
    Limit { limit: String, unit: String, value: u64, max: u64 },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Precondition(String),
    /// The PSS refuses the volume's write-back for a reason retrying alone will not fix
    /// (it is full, say): accepted writes stay in memory and are retried.
    #[error(
        "the PSS refuses this volume's write-back ({0}); accepted writes stay in memory and \
         are retried"
    )]
    WritebackRefused(String),
}

impl From<NmsError> for tonic::Status {
    fn from(e: NmsError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            NmsError::Invalid(_) => Status::invalid_argument(msg),
            NmsError::Unauthenticated { .. } => Status::unauthenticated(msg),
            NmsError::NotFound(_) => Status::not_found(msg),
            NmsError::Exists { .. } => Status::already_exists(msg),
            NmsError::Moved { to, epoch } => fault_status(Fault::Moved { to, epoch }, msg),
            NmsError::NotOwner { owner_address, epoch, .. } => fault_status(
                Fault::NotOwner { owner_node: String::new(), owner_address, epoch },
                msg,
            ),
            NmsError::Limit { limit, unit, value, max } => {
                fault_status(Fault::LimitExceeded { limit, unit, value, max }, msg)
            }
            NmsError::Unavailable(_) => Status::unavailable(msg),
            NmsError::Timeout(_) => Status::deadline_exceeded(msg),
            NmsError::Precondition(_) => Status::failed_precondition(msg),
            NmsError::WritebackRefused(_) => Status::resource_exhausted(msg),
        }
    }
}

impl From<wayside_proto::convert::ConvertError> for NmsError {
    fn from(e: wayside_proto::convert::ConvertError) -> Self {
        NmsError::Invalid(e.to_string())
    }
}

impl From<crate::store::StoreError> for NmsError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as S;
        match e {
            S::NotFound(v) => NmsError::NotFound(v),
            S::Unavailable(m) => NmsError::Unavailable(format!("PSS: {m}")),
            S::StaleEpoch { presented, current } => NmsError::Precondition(format!(
                "PSS refused a stale epoch (presented {presented}, current {current})"
            )),
            S::Refused(m) | S::Exists(m) => NmsError::Precondition(format!("PSS: {m}")),
        }
    }
}
