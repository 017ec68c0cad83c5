//! Typed faults in gRPC statuses.
//!
//! A fault travels as an encoded `pb::ErrorDetail` in the status `details`, so a client
//! follows a redirect or a leader hint by matching a [`Fault`], never by parsing text.

use crate::pb;
use crate::types::Fault;
use prost::Message;
use tonic::{Code, Status};

/// The gRPC code each fault travels with.
pub fn code_of(fault: &Fault) -> Code {
    match fault {
        Fault::Moved { .. } | Fault::NotLeader { .. } => Code::Unavailable,
        Fault::NotOwner { .. } | Fault::StaleEpoch { .. } => Code::FailedPrecondition,
        Fault::LimitExceeded { .. } => Code::ResourceExhausted,
    }
}

/// A status carrying `fault`, with a message for people.
pub fn fault_status(fault: Fault, message: impl Into<String>) -> Status {
    let code = code_of(&fault);
    let detail = pb::ErrorDetail::from(fault).encode_to_vec();
    Status::with_details(code, message, detail.into())
}

/// The fault a status carries, if any (a malformed detail counts as none).
pub fn fault_of(status: &Status) -> Option<Fault> {
    let details = status.details();
    if details.is_empty() {
        return None;
    }
    pb::ErrorDetail::decode(details).ok().and_then(|d| Fault::try_from(d).ok())
}

/// The fault in a stream reply's error, if any.
pub fn stream_error(status: &Status) -> pb::StreamError {
    pb::StreamError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        detail: fault_of(status).map(Into::into),
    }
}

/// Turns a stream reply's error back into a status.
pub fn status_of_stream_error(e: pb::StreamError) -> Status {
    let code = Code::from_i32(e.code);
    match e.detail {
        Some(d) => Status::with_details(code, e.message, d.encode_to_vec().into()),
        None => Status::new(code, e.message),
    }
}
