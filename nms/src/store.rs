//! The NMS's view of the persistent storage service: one trait with a written failure
//! contract, implemented over the real PSS client ([`PssStore`]) and in memory
//! ([`MemStore`], for unit tests only).
//!
//! Failure contract: every call may fail with [`StoreError::Unavailable`] (retry later);
//! `write_batch` is idempotent for one request id (the PSS dedupes), so a retry after an
//! ambiguous failure applies once; a write-back with an epoch older than the volume's is
//! [`StoreError::StaleEpoch`] and must not be retried.

use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use wayside_proto::types::{
    BlockNo, BlockSize, CredentialHash, Endpoint, Epoch, Lsn, RequestId, VolumeName,
};

/// A boxed future, so the trait stays object safe.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Each requested block's (data, version), `None` when absent.
pub type Fetched = Vec<Option<(Bytes, u64)>>;

/// A volume's record in the PSS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    pub name: VolumeName,
    pub block_size: BlockSize,
    pub epoch: Epoch,
    pub owner_node: String,
    pub owner_address: String,
    /// The owning process's session (0: not recorded, an older NMS's or PSS's).
    pub owner_session: u64,
    pub credential: CredentialHash,
    pub persisted: Lsn,
    pub block_count: u64,
    /// The epoch of the last write-back applied (0: none, or a PSS that does not record it).
    pub written_epoch: Epoch,
}

/// Take ownership of a volume (and create it when `create` is set and it is absent).
#[derive(Debug, Clone)]
pub struct Acquire {
    pub volume: VolumeName,
    pub owner_node: String,
    pub owner_address: String,
    /// The acquiring process's session (see [`VolumeMeta::owner_session`]).
    pub owner_session: u64,
    /// `None`: from whatever epoch it has.
    pub expected_epoch: Option<Epoch>,
    pub create: Option<(BlockSize, CredentialHash)>,
    pub request_id: RequestId,
}

/// One block's new content in a write-back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub block: BlockNo,
    /// The cached buffer itself (`None`: deleted): a batch shares it with the cache, so
    /// taking, retrying and encoding a batch copy each block once, into the PSS request.
    pub data: Option<Bytes>,
    pub version: u64,
}

/// One write-back batch.
#[derive(Debug, Clone)]
pub struct WriteBack {
    pub volume: VolumeName,
    pub epoch: Epoch,
    pub request_id: RequestId,
    pub changes: Vec<Change>,
    pub persisted: Lsn,
}

/// A page of stored block metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockPage {
    /// (block, version, length in bytes)
    pub blocks: Vec<(BlockNo, u64, u32)>,
    pub more: bool,
    pub next_block: BlockNo,
}

/// Why a PSS call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("stale epoch: presented {presented}, the volume is at {current}")]
    StaleEpoch { presented: Epoch, current: Epoch },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("PSS unavailable: {0}")]
    Unavailable(String),
    #[error("PSS refused the request: {0}")]
    Refused(String),
    /// A create met a volume another caller made (another credential or block size);
    /// nothing changed.
    #[error("{0}")]
    Exists(String),
}

/// The persistent store behind an NMS.
pub trait Store: Send + Sync + 'static {
    fn acquire(&self, req: Acquire) -> BoxFut<'_, Result<VolumeMeta, StoreError>>;
    fn get_volume(&self, volume: VolumeName) -> BoxFut<'_, Result<VolumeMeta, StoreError>>;
    fn write_batch(&self, batch: WriteBack) -> BoxFut<'_, Result<Lsn, StoreError>>;
    /// Each requested block's (data, version), `None` when absent.
    fn get_blocks(
        &self,
        volume: VolumeName,
        blocks: Vec<BlockNo>,
    ) -> BoxFut<'_, Result<Fetched, StoreError>>;
    fn list_blocks(
        &self,
        volume: VolumeName,
        start: BlockNo,
        limit: u32,
    ) -> BoxFut<'_, Result<BlockPage, StoreError>>;
}

/// An in-memory store with the PSS's semantics (epochs, fencing, dedupe). Unit tests only.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    volumes: HashMap<VolumeName, VolumeMeta>,
    blocks: HashMap<(VolumeName, BlockNo), (Bytes, u64)>,
    applied: HashMap<RequestId, Lsn>,
}

impl Store for MemStore {
    fn acquire(&self, req: Acquire) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
        let mut g = self.inner.lock().expect("poisoned");
        let r = (|| {
            let meta = match (g.volumes.get(&req.volume), req.create) {
                (Some(m), Some((bs, cred))) if bs != m.block_size || cred != m.credential => {
                    return Err(StoreError::Exists(format!("volume {} exists already", m.name)));
                }
                (Some(m), _) => m.clone(),
                (None, Some((block_size, credential))) => VolumeMeta {
                    name: req.volume.clone(),
                    block_size,
                    epoch: Epoch(0),
                    owner_node: String::new(),
                    owner_address: String::new(),
                    owner_session: 0,
                    credential,
                    persisted: Lsn(0),
                    block_count: 0,
                    written_epoch: Epoch(0),
                },
                (None, None) => return Err(StoreError::NotFound(req.volume.to_string())),
            };
            if let Some(e) = req.expected_epoch {
                if e != meta.epoch {
                    return Err(StoreError::StaleEpoch { presented: e, current: meta.epoch });
                }
            }
            let meta = VolumeMeta {
                epoch: Epoch(meta.epoch.0 + 1),
                owner_node: req.owner_node,
                owner_address: req.owner_address,
                owner_session: req.owner_session,
                ..meta
            };
            g.volumes.insert(req.volume, meta.clone());
            Ok(meta)
        })();
        Box::pin(async move { r })
    }

    fn get_volume(&self, volume: VolumeName) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
        let r = self.inner.lock().expect("poisoned").volumes.get(&volume).cloned();
        Box::pin(async move { r.ok_or_else(|| StoreError::NotFound(volume.to_string())) })
    }

    fn write_batch(&self, b: WriteBack) -> BoxFut<'_, Result<Lsn, StoreError>> {
        let mut g = self.inner.lock().expect("poisoned");
        let r = (|| {
            let meta = g
                .volumes
                .get(&b.volume)
                .cloned()
                .ok_or_else(|| StoreError::NotFound(b.volume.to_string()))?;
            // As the PSS: a retried id first (its answer stands whatever the epoch now),
            // then the epoch, which must be the volume's.
            if let Some(l) = g.applied.get(&b.request_id) {
                return Ok(*l);
            }
            if b.epoch < meta.epoch {
                return Err(StoreError::StaleEpoch { presented: b.epoch, current: meta.epoch });
            }
            if b.epoch > meta.epoch {
                return Err(StoreError::Refused(format!(
                    "epoch {} is past the volume's {}",
                    b.epoch.0, meta.epoch.0
                )));
            }
            for c in b.changes {
                match c.data {
                    Some(data) => {
                        g.blocks.insert((b.volume.clone(), c.block), (data, c.version));
                    }
                    None => {
                        g.blocks.remove(&(b.volume.clone(), c.block));
                    }
                }
            }
            let m = g.volumes.get_mut(&b.volume).expect("checked");
            m.persisted = m.persisted.max(b.persisted);
            m.written_epoch = b.epoch;
            let p = m.persisted;
            g.applied.insert(b.request_id, p);
            Ok(p)
        })();
        Box::pin(async move { r })
    }

    fn get_blocks(
        &self,
        volume: VolumeName,
        blocks: Vec<BlockNo>,
    ) -> BoxFut<'_, Result<Fetched, StoreError>> {
        let g = self.inner.lock().expect("poisoned");
        let r = blocks.iter().map(|b| g.blocks.get(&(volume.clone(), *b)).cloned()).collect();
        Box::pin(async move { Ok(r) })
    }

    fn list_blocks(
        &self,
        volume: VolumeName,
        start: BlockNo,
        limit: u32,
    ) -> BoxFut<'_, Result<BlockPage, StoreError>> {
        let g = self.inner.lock().expect("poisoned");
        let mut all: Vec<(BlockNo, u64, u32)> = g
            .blocks
            .iter()
            .filter(|((v, b), _)| *v == volume && *b >= start)
            .map(|((_, b), (d, ver))| (*b, *ver, u32::try_from(d.len()).unwrap_or(u32::MAX)))
            .collect();
        all.sort_unstable();
        let limit = limit.max(1) as usize;
        let more = all.len() > limit;
        all.truncate(limit);
        let next_block = all.last().map_or(start, |b| b.0 + 1);
        Box::pin(async move { Ok(BlockPage { blocks: all, more, next_block }) })
    }
}

pub use pss_client::PssStore;

mod pss_client {
    //! The real PSS, over `wayside_pss::client::PssClient`.
    use super::*;
    use wayside_proto::pb;
    use wayside_pss::client::{ClientOptions, PssClient, PssError};

    /// The PSS cluster behind an NMS.
    #[derive(Clone)]
    pub struct PssStore {
        client: PssClient,
    }

    impl PssStore {
        pub fn new(endpoints: Vec<Endpoint>, opts: ClientOptions) -> Self {
            Self { client: PssClient::new(endpoints, opts) }
        }
        pub fn client(&self) -> &PssClient {
            &self.client
        }
    }

    /// [`err`], a volume the PSS does not have named by its name (as the in-memory store
    /// names it; the PSS's message, wrapped again, read "volume volume v does not exist
    /// does not exist").
    fn err_of(volume: &VolumeName, e: PssError) -> StoreError {
        match e {
            PssError::NotFound(_) => StoreError::NotFound(volume.to_string()),
            e => err(e),
        }
    }

    fn err(e: PssError) -> StoreError {
        match e {
            PssError::StaleEpoch { presented, current } => {
                StoreError::StaleEpoch { presented, current }
            }
            PssError::NotFound(m) => StoreError::NotFound(m),
            PssError::AlreadyExists(m) => StoreError::Exists(m),
            PssError::Unavailable(m) => StoreError::Unavailable(m),
            PssError::InvalidArgument(m) | PssError::FailedPrecondition(m) => {
                StoreError::Refused(m)
            }
            PssError::Other(s) => match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal => StoreError::Unavailable(s.message().to_owned()),
                // A named limit (max_blocks) refuses; one without (an HTTP/2 server's
                // ENHANCE_YOUR_CALM, say) is the transport's, and passes.
                tonic::Code::ResourceExhausted if wayside_proto::error::fault_of(&s).is_none() => {
                    StoreError::Unavailable(s.message().to_owned())
                }
                _ => StoreError::Refused(format!("{}: {}", s.code(), s.message())),
            },
        }
    }

    fn meta(m: pb::VolumeMeta) -> Result<VolumeMeta, StoreError> {
        let bad = |e: wayside_proto::convert::ConvertError| {
            StoreError::Refused(format!("PSS sent a malformed volume record: {e}"))
        };
        Ok(VolumeMeta {
            name: wayside_proto::convert::volume_name(&m.volume).map_err(bad)?,
            block_size: wayside_proto::convert::block_size(m.block_size).map_err(bad)?,
            epoch: Epoch(m.epoch),
            owner_node: m.owner_node,
            owner_address: m.owner_address,
            owner_session: m.owner_session,
            credential: wayside_proto::convert::credential_hash(&m.credential_hash).map_err(bad)?,
            persisted: Lsn(m.persisted_lsn),
            block_count: m.block_count,
            written_epoch: Epoch(m.written_epoch),
        })
    }

    impl Store for PssStore {
        fn acquire(&self, req: Acquire) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
            Box::pin(async move {
                let r = pb::AcquireVolumeRequest {
                    volume: req.volume.as_str().to_owned(),
                    owner_node: req.owner_node,
                    owner_address: req.owner_address,
                    owner_session: req.owner_session,
                    expected_epoch: req.expected_epoch.map_or(0, |e| e.0),
                    create: req.create.map(|(bs, h)| pb::CreateSpec {
                        block_size: bs.bytes(),
                        credential_hash: h.0.to_vec(),
                    }),
                    request_id: Some((&req.request_id).into()),
                };
                let reply =
                    self.client.acquire_volume(r).await.map_err(|e| err_of(&req.volume, e))?;
                meta(reply.meta.ok_or_else(|| {
                    StoreError::Refused("AcquireVolume reply without meta".into())
                })?)
            })
        }

        fn get_volume(&self, volume: VolumeName) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
            Box::pin(async move {
                meta(self.client.get_volume(&volume).await.map_err(|e| err_of(&volume, e))?)
            })
        }

        fn write_batch(&self, b: WriteBack) -> BoxFut<'_, Result<Lsn, StoreError>> {
            Box::pin(async move {
                let r = pb::WriteBatchRequest {
                    volume: b.volume.as_str().to_owned(),
                    epoch: b.epoch.0,
                    request_id: Some((&b.request_id).into()),
                    ops: b
                        .changes
                        .into_iter()
                        .map(|c| pb::PssBlockOp {
                            block: c.block,
                            delete: c.data.is_none(),
                            data: c.data.map_or_else(Vec::new, |d| d.to_vec()),
                            version: c.version,
                        })
                        .collect(),
                    persisted_lsn: b.persisted.0,
                };
                let reply = self.client.write_batch(r).await.map_err(|e| err_of(&b.volume, e))?;
                Ok(Lsn(reply.persisted_lsn))
            })
        }

        fn get_blocks(
            &self,
            volume: VolumeName,
            blocks: Vec<BlockNo>,
        ) -> BoxFut<'_, Result<Fetched, StoreError>> {
            Box::pin(async move {
                let got = self
                    .client
                    .get_blocks(&volume, &blocks)
                    .await
                    .map_err(|e| err_of(&volume, e))?;
                // (By lookup, not removal: a block asked for twice gets both answers.)
                let by_block: HashMap<BlockNo, Option<(Bytes, u64)>> = got
                    .into_iter()
                    .map(|b| (b.block, b.found.then(|| (Bytes::from(b.data), b.version))))
                    .collect();
                // Every block asked for must be answered (found or not): one left out
                // would be cached as absent, and a partial write over it would zero
                // the rest of its data and write that back.
                if let Some(b) = blocks.iter().find(|b| !by_block.contains_key(b)) {
                    return Err(StoreError::Unavailable(format!(
                        "the PSS's answer for volume {volume} left out block {b}"
                    )));
                }
                Ok(blocks.iter().map(|b| by_block.get(b).cloned().flatten()).collect())
            })
        }

        fn list_blocks(
            &self,
            volume: VolumeName,
            start: BlockNo,
            limit: u32,
        ) -> BoxFut<'_, Result<BlockPage, StoreError>> {
            Box::pin(async move {
                let r = self
                    .client
                    .list_blocks(&volume, start, limit)
                    .await
                    .map_err(|e| err_of(&volume, e))?;
                Ok(BlockPage {
                    blocks: r.blocks.into_iter().map(|b| (b.block, b.version, b.length)).collect(),
                    more: r.more,
                    next_block: r.next_block,
                })
            })
        }
    }
    #[cfg(test)]
    mod tests {
        use super::*;

        /// A write-back answered RESOURCE_EXHAUSTED is refused only for a named limit
        /// (`max_blocks`); without one it is the transport's (an HTTP/2 server's
        /// ENHANCE_YOUR_CALM), and retried, not taken as "the PSS refuses this volume".
        #[test]
        fn only_a_named_limit_refuses() {
            let bare = PssError::Other(tonic::Status::resource_exhausted("calm down"));
            assert!(matches!(err(bare), StoreError::Unavailable(_)));
            let fault = wayside_proto::types::Fault::LimitExceeded {
                limit: "max_blocks".into(),
                unit: "blocks".into(),
                value: 11,
                max: 10,
            };
            let named = wayside_proto::error::fault_status(fault, "max_blocks");
            assert_eq!(named.code(), tonic::Code::ResourceExhausted);
            assert!(matches!(err(PssError::Other(named)), StoreError::Refused(_)));
        }
    }
}
