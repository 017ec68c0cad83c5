//! The one place where wire messages become domain types and back.
//!
//! Every `TryFrom<pb::X>` here validates: a missing required field, a malformed name or
//! an impossible size is a [`ConvertError`] naming the field, which servers turn into
//! `INVALID_ARGUMENT` (see the `From<ConvertError> for tonic::Status` impl).

use crate::pb;
use crate::types::{
    BlockChange, BlockSize, Credential, CredentialHash, DeleteOp, Endpoint, Epoch, Fault, ReadOp,
    RequestId, TypeError, VolumeName, WriteOp,
};

/// A wire message that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("invalid `{field}`: {source}")]
    Invalid {
        field: &'static str,
        #[source]
        source: TypeError,
    },
    #[error("empty error detail")]
    EmptyDetail,
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn field<T>(name: &'static str, r: Result<T, TypeError>) -> Result<T, ConvertError> {
    r.map_err(|source| ConvertError::Invalid { field: name, source })
}

fn required<T>(name: &'static str, v: Option<T>) -> Result<T, ConvertError> {
    v.ok_or(ConvertError::Missing(name))
}

/// Validates a volume name from the wire.
pub fn volume_name(name: &str) -> Result<VolumeName, ConvertError> {
    field("volume", VolumeName::new(name))
}

/// Validates a block size from the wire.
pub fn block_size(bytes: u32) -> Result<BlockSize, ConvertError> {
    field("block_size", BlockSize::new(bytes))
}

/// Validates an address from the wire or a command line.
pub fn endpoint(field_name: &'static str, addr: &str) -> Result<Endpoint, ConvertError> {
    field(field_name, Endpoint::parse(addr))
}

/// Validates a stored credential hash.
pub fn credential_hash(bytes: &[u8]) -> Result<CredentialHash, ConvertError> {
    field("credential_hash", CredentialHash::from_slice(bytes))
}

/// The volume and credential every vehicle call presents.
pub fn volume_auth(auth: Option<pb::VolumeAuth>) -> Result<(VolumeName, Credential), ConvertError> {
    let auth = required("auth", auth)?;
    Ok((volume_name(&auth.volume)?, field("auth.credential", Credential::new(auth.credential))?))
}

/// Builds the wire form of a volume's credentials.
pub fn to_volume_auth(volume: &VolumeName, credential: &Credential) -> pb::VolumeAuth {
    pb::VolumeAuth {
        volume: volume.as_str().to_owned(),
        credential: credential.expose().to_owned(),
        nms_session: 0,
        volume_incarnation: 0,
    }
}

impl TryFrom<pb::RequestId> for RequestId {
    type Error = ConvertError;
    fn try_from(r: pb::RequestId) -> Result<Self, Self::Error> {
        field("request_id", RequestId::new(r.client_id, r.seq))
    }
}

impl From<&RequestId> for pb::RequestId {
    fn from(r: &RequestId) -> Self {
        pb::RequestId { client_id: r.client_id().to_owned(), seq: r.seq() }
    }
}

/// An optional request id: absent on the wire is `None`, present must be valid.
pub fn optional_request_id(r: Option<pb::RequestId>) -> Result<Option<RequestId>, ConvertError> {
    r.map(RequestId::try_from).transpose()
}

impl TryFrom<pb::ReadOp> for ReadOp {
    type Error = ConvertError;
    fn try_from(op: pb::ReadOp) -> Result<Self, Self::Error> {
        Ok(ReadOp {
            block: op.block,
            offset: op.offset,
            len: (op.length != 0).then_some(op.length),
        })
    }
}

impl From<&ReadOp> for pb::ReadOp {
    fn from(op: &ReadOp) -> Self {
        pb::ReadOp { block: op.block, offset: op.offset, length: op.len.unwrap_or(0) }
    }
}

impl TryFrom<pb::WriteOp> for WriteOp {
    type Error = ConvertError;
    fn try_from(op: pb::WriteOp) -> Result<Self, Self::Error> {
        let len = u64::try_from(op.data.len()).unwrap_or(u64::MAX);
        // The volume's own block size is checked by the server; this rejects what no
        // block size could hold.
        field(
            "op.data",
            BlockSize::new(crate::types::MAX_BLOCK_SIZE_BYTES)
                .and_then(|max| max.check_range(op.offset, len)),
        )?;
        Ok(WriteOp {
            block: op.block,
            offset: op.offset,
            data: op.data,
            request_id: optional_request_id(op.request_id)?,
        })
    }
}

impl From<&WriteOp> for pb::WriteOp {
    fn from(op: &WriteOp) -> Self {
        pb::WriteOp {
            block: op.block,
            offset: op.offset,
            data: op.data.clone(),
            request_id: op.request_id.as_ref().map(Into::into),
        }
    }
}

impl TryFrom<pb::DeleteOp> for DeleteOp {
    type Error = ConvertError;
    fn try_from(op: pb::DeleteOp) -> Result<Self, Self::Error> {
        Ok(DeleteOp { block: op.block, request_id: optional_request_id(op.request_id)? })
    }
}

impl From<&DeleteOp> for pb::DeleteOp {
    fn from(op: &DeleteOp) -> Self {
        pb::DeleteOp { block: op.block, request_id: op.request_id.as_ref().map(Into::into) }
    }
}

/// A required nested op (`ReadRequest.op` and friends).
pub fn required_op<P, D: TryFrom<P, Error = ConvertError>>(
    name: &'static str,
    op: Option<P>,
) -> Result<D, ConvertError> {
    D::try_from(required(name, op)?)
}

impl BlockChange {
    /// Converts a PSS batch op, checking its data against the volume's block size.
    pub fn from_pb(op: pb::PssBlockOp, block_size: BlockSize) -> Result<Self, ConvertError> {
        if op.delete {
            return Ok(BlockChange::Delete { block: op.block, version: op.version });
        }
        let len = u64::try_from(op.data.len()).unwrap_or(u64::MAX);
        field("ops.data", block_size.check_range(0, len))?;
        Ok(BlockChange::Put { block: op.block, data: op.data, version: op.version })
    }
}

impl From<BlockChange> for pb::PssBlockOp {
    fn from(c: BlockChange) -> Self {
        match c {
            BlockChange::Put { block, data, version } => {
                pb::PssBlockOp { block, data, delete: false, version }
            }
            BlockChange::Delete { block, version } => {
                pb::PssBlockOp { block, data: Vec::new(), delete: true, version }
            }
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<Fault> for pb::ErrorDetail {
    fn from(f: Fault) -> Self {
        use pb::error_detail::Kind;
        let kind = match f {
            Fault::Moved { to, epoch } => Kind::Moved(pb::Redirect { address: to, epoch: epoch.0 }),
            Fault::NotOwner { owner_node, owner_address, epoch } => {
                Kind::NotOwner(pb::NotOwner { owner_node, owner_address, epoch: epoch.0 })
            }
            Fault::NotLeader { leader_id, leader_address } => Kind::NotLeader(pb::NotLeader {
                leader_id: leader_id.unwrap_or(0),
                leader_address: leader_address.unwrap_or_default(),
            }),
            Fault::StaleEpoch { presented, current } => {
                Kind::StaleEpoch(pb::StaleEpoch { presented: presented.0, current: current.0 })
            }
            Fault::LimitExceeded { limit, unit, value, max } => {
                Kind::Limit(pb::LimitExceeded { limit, unit, value, max })
            }
        };
        pb::ErrorDetail { kind: Some(kind) }
    }
}

impl TryFrom<pb::ErrorDetail> for Fault {
    type Error = ConvertError;
    fn try_from(d: pb::ErrorDetail) -> Result<Self, Self::Error> {
        use pb::error_detail::Kind;
        Ok(match d.kind.ok_or(ConvertError::EmptyDetail)? {
            Kind::Moved(r) => {
                endpoint("moved.address", &r.address)?;
                Fault::Moved { to: r.address, epoch: Epoch(r.epoch) }
            }
            Kind::NotOwner(n) => Fault::NotOwner {
                owner_node: n.owner_node,
                owner_address: n.owner_address,
                epoch: Epoch(n.epoch),
            },
            Kind::NotLeader(n) => Fault::NotLeader {
                leader_id: (n.leader_id != 0).then_some(n.leader_id),
                leader_address: non_empty(n.leader_address),
            },
            Kind::StaleEpoch(s) => {
                Fault::StaleEpoch { presented: Epoch(s.presented), current: Epoch(s.current) }
            }
            Kind::Limit(l) => {
                Fault::LimitExceeded { limit: l.limit, unit: l.unit, value: l.value, max: l.max }
            }
        })
    }
}
