//! A small client for the QEMU Machine Protocol (QMP) over its unix socket: one JSON
//! object per line; a greeting, `qmp_capabilities`, then `{"execute": ...}` commands
//! answered by `{"return": ...}` or `{"error": ...}`, with asynchronous `{"event": ...}`
//! lines interleaved (kept, in a bounded buffer, for [`Qmp::wait_event`]).

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The longest QMP line accepted, in bytes (replies here are a few KiB).
pub const MAX_LINE_BYTES: u64 = 1 << 20;
/// Events kept for `wait_event`; older ones are dropped.
pub const MAX_BUFFERED_EVENTS: usize = 256;
/// How long connecting may take, greeting and capabilities included (a QEMU that is
/// stopped or stuck still accepts the socket's connection from its backlog).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one command may take to be answered (QEMU answers at once, or not at all).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed (QEMU exited?)")]
    Closed,
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP: no {what} within {ms} ms")]
    Timeout { what: String, ms: u128 },
}

/// A QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    /// A command timed out: its late answer could be taken for the next one's, so the
    /// session takes no more.
    broken: bool,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode, within [`CONNECT_TIMEOUT`].
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        Self::connect_within(path, CONNECT_TIMEOUT).await
    }

    /// [`Qmp::connect`] within `limit`.
    pub async fn connect_within(path: &Path, limit: Duration) -> Result<Self, QmpError> {
        let connect = async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| QmpError::Connect { path: path.display().to_string(), source })?;
            let (r, w) = stream.into_split();
            let mut qmp = Self {
                reader: BufReader::new(r),
                writer: w,
                events: VecDeque::new(),
                broken: false,
            };
            let greeting = qmp.read_value().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol(format!("unexpected greeting {greeting}")));
            }
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        };
        tokio::time::timeout(limit, connect).await.map_err(|_| QmpError::Timeout {
            what: format!("QMP greeting on {}", path.display()),
            ms: limit.as_millis(),
        })?
    }

    async fn read_value(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader).take(MAX_LINE_BYTES).read_line(&mut line).await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol(format!("line longer than {MAX_LINE_BYTES} bytes")));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    fn keep_event(&mut self, v: Value) {
        if self.events.len() == MAX_BUFFERED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(v);
    }

    /// Runs one command and returns its `return` value, within [`COMMAND_TIMEOUT`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        if self.broken {
            return Err(QmpError::Protocol("an earlier command timed out".into()));
        }
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, self.execute_inner(command, arguments));
        match answer.await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(QmpError::Timeout {
                    what: format!("answer to {command}"),
                    ms: COMMAND_TIMEOUT.as_millis(),
                })
            }
        }
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let v = self.read_value().await?;
            if v.get("event").is_some() {
                self.keep_event(v);
                continue;
            }
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {v}")));
        }
    }

    /// Waits for an event named `name` (already buffered or arriving within `limit`).
    pub async fn wait_event(&mut self, name: &str, limit: Duration) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).expect("index is valid"));
        }
        let wait = async {
            loop {
                let v = self.read_value().await?;
                if v["event"] == name {
                    return Ok(v);
                }
                if v.get("event").is_some() {
                    self.keep_event(v);
                }
            }
        };
        tokio::time::timeout(limit, wait).await.map_err(|_| QmpError::Timeout {
            what: format!("{name} event"),
            ms: limit.as_millis(),
        })?
    }

    /// `query-status`: (`running`, status string such as "running", "paused", "postmigrate").
    pub async fn status(&mut self) -> Result<(bool, String), QmpError> {
        let v = self.execute("query-status", None).await?;
        let running = v["running"].as_bool().unwrap_or(false);
        Ok((running, v["status"].as_str().unwrap_or("?").to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted QMP peer: checks the client's side of the protocol (greeting,
    /// capabilities, events interleaved with replies, errors). The real QEMU is exercised
    /// by the VM tests.
    #[tokio::test]
    async fn speaks_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("query-status"));
            s.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\r\n{\"return\": {\"running\": false, \"status\": \"paused\"}}\r\n")
                .await
                .unwrap();
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n")
                .await
                .unwrap();
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), (false, "paused".to_string()));
        let err = qmp.execute("bogus", None).await.unwrap_err();
        assert!(err.to_string().contains("GenericError: nope"), "{err}");
        let ev = qmp.wait_event("STOP", Duration::from_millis(10)).await.unwrap();
        assert_eq!(ev["event"], "STOP");
        server.await.unwrap();
        assert!(matches!(
            qmp.wait_event("RESUME", Duration::from_secs(5)).await,
            Err(QmpError::Closed)
        ));
    }

    /// A QEMU that is stopped or stuck still has its socket's connection accepted (from
    /// the backlog): connecting ends within its limit instead of waiting for ever.
    #[tokio::test]
    async fn a_silent_qmp_socket_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let t = std::time::Instant::now();
        let e = Qmp::connect_within(&path, Duration::from_millis(200)).await.err().unwrap();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
