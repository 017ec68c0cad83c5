//! The client side of `PssBlocks.Pipeline`: many callers' `WriteBatch` and `GetBlocks`
//! requests to one node over one long-lived stream (the pattern of TiKV's
//! `BatchCommands`). A unary gRPC call costs an HTTP/2 stream of its own (headers,
//! trailers, a server task, a client dispatch); here the requests queued while the
//! previous message was on its way leave together in one message, and the replies that
//! are ready together come back in one.
//!
//! A [`Pipe`] owns one task that owns the stream. When the stream fails, every request
//! it carried fails with the stream's status (their outcome is unknown: the caller retries
//! them by request id, as after any failed unary call) and the task ends; the client
//! then opens a new pipe for the next request.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use wayside_proto::pb;
use wayside_proto::pb::pipeline_reply::Result as Answer;
use wayside_proto::pb::pipeline_request::Request as Ask;
use wayside_proto::pb::pss_blocks_client::PssBlocksClient;

/// Limits of one pipe, from the client's options.
#[derive(Debug, Clone, Copy)]
pub struct PipeLimits {
    /// Requests waiting for the pipe's task before callers wait to queue more.
    pub queue_requests: usize,
    /// Most requests in one message and unanswered on the stream (at most the server's
    /// `max_pipeline_requests`).
    pub max_requests: usize,
    /// A message stops taking requests at this many encoded bytes (a larger request
    /// still goes, alone).
    pub message_bytes: usize,
}

/// Messages handed to the stream and not yet sent (HTTP/2 flow control holds them).
const OUTBOUND_MESSAGES: usize = 2;

struct Queued {
    ask: Ask,
    reply: oneshot::Sender<Result<Answer, Status>>,
}

/// One `Pipeline` stream to one node; dropping it ends its task (and the stream).
pub struct Pipe {
    tx: mpsc::Sender<Queued>,
    task: tokio::task::AbortHandle,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pipe {
    /// Starts the pipe's task; the stream opens with the first request.
    pub fn start(client: PssBlocksClient<Channel>, limits: PipeLimits) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue_requests.max(1));
        let task = tokio::spawn(run(client, rx, limits)).abort_handle();
        Self { tx, task }
    }

    /// Whether the stream has ended (a new pipe is needed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends one request and waits for its answer (or for the stream's failure).
    pub async fn call(&self, ask: Ask) -> Result<Answer, Status> {
        let (reply, answer) = oneshot::channel();
        let closed = || Status::unavailable("the pipeline stream to the PSS node closed");
        self.tx.send(Queued { ask, reply }).await.map_err(|_| closed())?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }
}

/// The next reply message, once the call is set up (never, before).
async fn next_replies(
    inbound: &mut Option<Streaming<pb::PipelineReplies>>,
) -> Result<Option<pb::PipelineReplies>, Status> {
    match inbound {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

type Call = Pin<
    Box<
        dyn Future<Output = Result<tonic::Response<Streaming<pb::PipelineReplies>>, Status>> + Send,
    >,
>;

type Waiting = HashMap<u64, oneshot::Sender<Result<Answer, Status>>>;

/// Adds a queued request to the message being built, under a new tag.
fn take(
    q: Queued,
    next_tag: &mut u64,
    batch: &mut Vec<pb::PipelineRequest>,
    bytes: &mut usize,
    waiting: &mut Waiting,
) {
    // Its caller gave up (its try timed out, or the call was dropped): not sent. Sent
    // late, a write's first try could land after a later write of the same blocks.
    if q.reply.is_closed() {
        return;
    }
    *next_tag += 1;
    let req = pb::PipelineRequest { tag: *next_tag, request: Some(q.ask) };
    *bytes += prost::Message::encoded_len(&req);
    batch.push(req);
    waiting.insert(*next_tag, q.reply);
}

async fn run(
    mut client: PssBlocksClient<Channel>,
    mut rx: mpsc::Receiver<Queued>,
    limits: PipeLimits,
) {
    // The stream opens with the first request, so an idle client holds none.
    let Some(first) = rx.recv().await else { return };
    let (out_tx, out_rx) = mpsc::channel::<pb::PipelineRequests>(OUTBOUND_MESSAGES);
    let mut call: Option<Call> = Some(Box::pin(async move {
        client.pipeline(tokio_stream::wrappers::ReceiverStream::new(out_rx)).await
    }));
    let mut inbound: Option<Streaming<pb::PipelineReplies>> = None;
    let mut waiting = Waiting::new();
    let mut next_tag = 0u64;
    // The message being built; it leaves when the stream has room for it.
    let mut batch: Vec<pb::PipelineRequest> = Vec::new();
    let mut batch_bytes = 0usize;
    take(first, &mut next_tag, &mut batch, &mut batch_bytes, &mut waiting);
    let failure = loop {
        // Fill the message with whatever else is queued, within the limits.
        while waiting.len() < limits.max_requests && batch_bytes < limits.message_bytes {
            let Ok(q) = rx.try_recv() else { break };
            take(q, &mut next_tag, &mut batch, &mut batch_bytes, &mut waiting);
        }
        tokio::select! {
            r = async { call.as_mut().expect("polled only while set").await }, if call.is_some() => {
                call = None;
                match r {
                    Ok(response) => inbound = Some(response.into_inner()),
                    Err(status) => break status,
                }
            }
            r = next_replies(&mut inbound) => match r {
                Ok(Some(m)) => {
                    for reply in m.replies {
                        let Some(tx) = waiting.remove(&reply.tag) else { continue };
                        let answer = match reply.result {
                            Some(Answer::Error(e)) => {
                                Err(wayside_proto::error::status_of_stream_error(e))
                            }
                            Some(a) => Ok(a),
                            None => Err(Status::internal("a pipeline reply without a result")),
                        };
                        let _ = tx.send(answer);
                    }
                }
                Ok(None) => break Status::unavailable("the PSS node ended the pipeline stream"),
                Err(status) => break status,
            },
            permit = out_tx.reserve(), if !batch.is_empty() => match permit {
                Ok(permit) => {
                    permit.send(pb::PipelineRequests { requests: std::mem::take(&mut batch) });
                    batch_bytes = 0;
                }
                Err(_) => break Status::unavailable("the pipeline stream to the PSS node closed"),
            },
            q = rx.recv(), if batch.is_empty() && waiting.len() < limits.max_requests => {
                // The pipe was dropped (its handle owns the sender): nothing to answer.
                let Some(q) = q else { return };
                take(q, &mut next_tag, &mut batch, &mut batch_bytes, &mut waiting);
            }
        }
    };
    tracing::debug!(code = ?failure.code(), error = %failure.message(), unanswered = waiting.len(), "PSS pipeline stream ended");
    // The stream's end is no answer to the requests on it: their outcome is unknown, and
    // retried (their request ids keep writes applied once) rather than taken as a refusal
    // of each (an oversized reply, or the connection's end, failed every caller's request
    // OUT_OF_RANGE or the like, which the NMS took as its write-back refused). A node
    // without the stream (UNIMPLEMENTED) is told so: its calls go unary from then on.
    let failure = if failure.code() == tonic::Code::Unimplemented {
        failure
    } else {
        Status::unavailable(format!(
            "the pipeline stream to the PSS node failed: {:?}: {}",
            failure.code(),
            failure.message()
        ))
    };
    for (_, tx) in waiting {
        let _ = tx.send(Err(failure.clone()));
    }
}
