//! The cache's [`Remote`] over the wayside client library: the real back end of the mount.

use super::cache::{Remote, RemoteError};
use crate::client::{ClientError, VolumeClient};

/// A wayside volume reached through its NMS (redirects, reconnects and retries are the client
/// library's; what is left here is sorting its errors into "retry later" and "give up").
#[derive(Clone)]
pub struct VolumeRemote {
    pub client: VolumeClient,
}

fn classify(e: ClientError) -> RemoteError {
    match e {
        // The link, the NMS, a move or write-back pressure: all pass.
        // A TLS failure too: an RSU whose certificate the vehicle does not trust (or that
        // speaks no TLS) is passed like an unreachable one; the journal keeps the writes
        // for the next NMS (a mount with TLS wrongly set up fails its first attach).
        ClientError::Unavailable { .. }
        | ClientError::Tls(_)
        | ClientError::JournalFull { .. }
        | ClientError::LimitExceeded { .. } => RemoteError::Unavailable(e.to_string()),
        ClientError::Status(ref s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::Cancelled
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::Unknown
            ) =>
        {
            RemoteError::Unavailable(e.to_string())
        }
        ClientError::Options(_)
        | ClientError::Unauthenticated(_)
        | ClientError::NotFound(_)
        | ClientError::InvalidArgument(_)
        | ClientError::Status(_) => RemoteError::Refused(e.to_string()),
    }
}

impl Remote for VolumeRemote {
    async fn read(&self, block: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        self.client.read(block, 0, None).await.map_err(classify)
    }

    async fn read_many(&self, blocks: &[u64]) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        self.client.read_many(blocks).await.map_err(classify)
    }

    async fn write(&self, block: u64, offset: u32, data: Vec<u8>) -> Result<(), RemoteError> {
        self.client.write(block, offset, data).await.map(drop).map_err(classify)
    }

    async fn delete(&self, block: u64) -> Result<(), RemoteError> {
        self.client.delete(block).await.map(drop).map_err(classify)
    }

    async fn flush(&self) -> Result<(), RemoteError> {
        self.client.flush().await.map(drop).map_err(classify)
    }
}
