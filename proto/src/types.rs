//! Validated domain types. A value of these types is always well formed: construction
//! goes through `new`/`parse`, which reject bad input with a [`TypeError`].

use sha2::{Digest, Sha256};
use std::fmt;

/// Smallest block size a volume may have, in bytes.
pub const MIN_BLOCK_SIZE_BYTES: u32 = 4 * 1024;
/// Largest block size a volume may have, in bytes.
pub const MAX_BLOCK_SIZE_BYTES: u32 = 1024 * 1024;
/// Longest volume name, in bytes.
pub const MAX_VOLUME_NAME_BYTES: usize = 128;
/// Longest client id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;
/// Longest credential, in bytes.
pub const MAX_CREDENTIAL_BYTES: usize = 256;

/// Why a value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("volume name is empty")]
    EmptyVolumeName,
    #[error("volume name is {len} bytes; the limit is {MAX_VOLUME_NAME_BYTES}")]
    VolumeNameTooLong { len: usize },
    #[error("volume name {name:?} has {ch:?}; allowed are A-Z a-z 0-9 . _ - and it may not start with '.'")]
    VolumeNameChar { name: String, ch: char },
    #[error("block size {0} bytes is not a power of two between {MIN_BLOCK_SIZE_BYTES} and {MAX_BLOCK_SIZE_BYTES}")]
    BlockSize(u32),
    #[error("client id is empty or longer than {MAX_CLIENT_ID_BYTES} bytes")]
    ClientId,
    #[error("request sequence number must be > 0")]
    ZeroSeq,
    #[error("credential is empty or longer than {MAX_CREDENTIAL_BYTES} bytes")]
    Credential,
    #[error("credential hash must be 32 bytes (sha256), got {0}")]
    CredentialHash(usize),
    #[error("address {addr:?} is not host:port or http(s)://host:port")]
    Address { addr: String },
    #[error("range {offset}+{len} bytes does not fit in a {block_size}-byte block")]
    Range { offset: u32, len: u64, block_size: u32 },
}

/// The name of a vehicle's volume: 1..=128 bytes of `[A-Za-z0-9._-]`, not starting with '.'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: impl Into<String>) -> Result<Self, TypeError> {
        let name = name.into();
        if name.is_empty() {
            return Err(TypeError::EmptyVolumeName);
        }
        if name.len() > MAX_VOLUME_NAME_BYTES {
            return Err(TypeError::VolumeNameTooLong { len: name.len() });
        }
        let bad =
            name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        if let Some(ch) = bad.or_else(|| name.starts_with('.').then_some('.')) {
            return Err(TypeError::VolumeNameChar { name, ch });
        }
        Ok(Self(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A volume's fixed block size in bytes: a power of two from 4 KiB to 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    pub fn new(bytes: u32) -> Result<Self, TypeError> {
        if bytes.is_power_of_two() && (MIN_BLOCK_SIZE_BYTES..=MAX_BLOCK_SIZE_BYTES).contains(&bytes)
        {
            Ok(Self(bytes))
        } else {
            Err(TypeError::BlockSize(bytes))
        }
    }
    pub fn bytes(self) -> u32 {
        self.0
    }
    /// Checks that `len` bytes at `offset` fit inside one block.
    pub fn check_range(self, offset: u32, len: u64) -> Result<(), TypeError> {
        if u64::from(offset) + len <= u64::from(self.0) {
            Ok(())
        } else {
            Err(TypeError::Range { offset, len, block_size: self.0 })
        }
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self(MIN_BLOCK_SIZE_BYTES)
    }
}

/// A block's number within its volume.
pub type BlockNo = u64;

/// The owner epoch of a volume: raised through Raft on every change of owner. The PSS
/// refuses write-back with an epoch older than the volume's (fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A position in a volume's write log. Every accepted write gets the next one; the
/// persisted watermark is the highest lsn below which everything is in the PSS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Identifies one client request for idempotent retries and replays.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId {
    /// Shared: a copy (dedupe tables, a migration's list of applied ids) costs no allocation.
    client_id: std::sync::Arc<str>,
    seq: u64,
}

impl RequestId {
    pub fn new(client_id: impl Into<String>, seq: u64) -> Result<Self, TypeError> {
        let client_id = client_id.into();
        if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_BYTES {
            return Err(TypeError::ClientId);
        }
        if seq == 0 {
            return Err(TypeError::ZeroSeq);
        }
        Ok(Self { client_id: client_id.into(), seq })
    }
    /// The same client's request `seq` (sharing the client id, no allocation).
    pub fn with_seq(&self, seq: u64) -> Result<Self, TypeError> {
        if seq == 0 {
            return Err(TypeError::ZeroSeq);
        }
        Ok(Self { client_id: self.client_id.clone(), seq })
    }
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A vehicle's secret for one volume. Only its sha256 is stored anywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    pub fn new(secret: impl Into<String>) -> Result<Self, TypeError> {
        let secret = secret.into();
        if secret.is_empty() || secret.len() > MAX_CREDENTIAL_BYTES {
            return Err(TypeError::Credential);
        }
        Ok(Self(secret))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn hash(&self) -> CredentialHash {
        CredentialHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(***)")
    }
}

/// sha256 of a [`Credential`]; compared in constant time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialHash(pub [u8; 32]);

impl CredentialHash {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, TypeError> {
        <[u8; 32]>::try_from(bytes).map(Self).map_err(|_| TypeError::CredentialHash(bytes.len()))
    }
    /// Constant-time comparison, so response timing does not leak the hash.
    pub fn matches(&self, credential: &Credential) -> bool {
        let other = credential.hash();
        self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// A gRPC endpoint, normalised to `http://host:port` (or `https://`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint(String);

impl Endpoint {
    /// Accepts `host:port`, `http://host:port` or `https://host:port`.
    pub fn parse(addr: &str) -> Result<Self, TypeError> {
        let addr = addr.trim();
        let (scheme, rest) = match addr.split_once("://") {
            Some((s @ ("http" | "https"), rest)) => (s, rest),
            Some(_) => return Err(TypeError::Address { addr: addr.into() }),
            None => ("http", addr),
        };
        let rest = rest.trim_end_matches('/');
        let ok = match rest.rsplit_once(':') {
            Some((host, port)) => {
                // No spaces, quotes or commas: an address goes into lists and command
                // lines (a kernel's, the VM image's) as one word.
                let one_word = !host.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | ',' | '/')
                });
                !host.is_empty() && one_word && port.parse::<u16>().is_ok_and(|p| p > 0)
            }
            None => false,
        };
        if !ok {
            return Err(TypeError::Address { addr: addr.into() });
        }
        Ok(Self(format!("{scheme}://{rest}")))
    }
    pub fn uri(&self) -> &str {
        &self.0
    }
    /// `host:port` without the scheme.
    pub fn authority(&self) -> &str {
        self.0.split_once("://").map_or(&self.0, |(_, a)| a)
    }
    /// The same address over TLS (`https://host:port`).
    pub fn https(&self) -> Self {
        Self(format!("https://{}", self.authority()))
    }
    pub fn is_https(&self) -> bool {
        self.0.starts_with("https://")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fault a client can act on. Carried in gRPC status details (see [`crate::error`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The volume moved; reconnect to `to` and retry there.
    Moved { to: String, epoch: Epoch },
    /// This server does not own the volume.
    NotOwner { owner_node: String, owner_address: String, epoch: Epoch },
    /// This PSS node is not the leader; `leader_address` is a hint when known.
    NotLeader { leader_id: Option<u64>, leader_address: Option<String> },
    /// A write-back carried an epoch older than the volume's.
    StaleEpoch { presented: Epoch, current: Epoch },
    /// A named limit was exceeded.
    LimitExceeded { limit: String, unit: String, value: u64, max: u64 },
}

/// A vehicle's read of part or all of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOp {
    pub block: BlockNo,
    pub offset: u32,
    /// `None` reads to the end of the block.
    pub len: Option<u32>,
}

/// A vehicle's write of a byte range within one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOp {
    pub block: BlockNo,
    pub offset: u32,
    /// A slice of the message it was decoded from: copy it to keep it beyond the call.
    pub data: prost::bytes::Bytes,
    pub request_id: Option<RequestId>,
}

/// A vehicle's delete of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOp {
    pub block: BlockNo,
    pub request_id: Option<RequestId>,
}

/// One operation of a PSS write batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockChange {
    Put { block: BlockNo, data: Vec<u8>, version: u64 },
    Delete { block: BlockNo, version: u64 },
}

impl BlockChange {
    pub fn block(&self) -> BlockNo {
        match self {
            Self::Put { block, .. } | Self::Delete { block, .. } => *block,
        }
    }
}
