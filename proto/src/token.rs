//! The cluster token: a shared secret that admin and migration calls carry, so a vehicle
//! on the NMS's port (which serves vehicles, operators and other NMSs alike) cannot shut a
//! node down, read its status, or move another vehicle's volume to an address of its own.
//!
//! Servers wrap their admin and migration services in [`RequireToken`] (no token
//! configured: every call passes, and the node says so at start); callers put the token in
//! a call's metadata with [`ClusterToken::request`]. The token is 16 to 256 visible ASCII
//! characters, compared in constant time, never printed (`Debug` hides it).

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The metadata key a call carries the token under.
pub const CLUSTER_TOKEN_KEY: &str = "x-wayside-cluster-token";

/// The environment variable the binaries read the token from (it overrides a config file's).
pub const CLUSTER_TOKEN_ENV: &str = "WAYSIDE_CLUSTER_TOKEN";

/// Fewest and most characters of a token.
pub const CLUSTER_TOKEN_MIN_CHARS: usize = 16;
pub const CLUSTER_TOKEN_MAX_CHARS: usize = 256;

/// A validated cluster token.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterToken(String);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(<hidden>)")
    }
}

impl TryFrom<String> for ClusterToken {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let n = s.chars().count();
        if !(CLUSTER_TOKEN_MIN_CHARS..=CLUSTER_TOKEN_MAX_CHARS).contains(&n) {
            return Err(format!(
                "a cluster token has {CLUSTER_TOKEN_MIN_CHARS} to {CLUSTER_TOKEN_MAX_CHARS} \
                 characters, not {n}"
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a cluster token is visible ASCII characters only (no spaces)".into());
        }
        Ok(Self(s))
    }
}

impl From<ClusterToken> for String {
    fn from(t: ClusterToken) -> String {
        t.0
    }
}

impl ClusterToken {
    pub fn new(s: impl Into<String>) -> Result<Self, String> {
        Self::try_from(s.into())
    }

    /// The token in `WAYSIDE_CLUSTER_TOKEN`, if set (an invalid one is an error).
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(CLUSTER_TOKEN_ENV) {
            Ok(s) => Self::new(s).map(Some).map_err(|e| format!("{CLUSTER_TOKEN_ENV}: {e}")),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(format!("{CLUSTER_TOKEN_ENV}: {e}")),
        }
    }

    fn value(&self) -> MetadataValue<Ascii> {
        MetadataValue::try_from(self.0.as_str()).expect("visible ASCII is a valid header value")
    }

    /// `msg` as a request carrying the token.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(CLUSTER_TOKEN_KEY, self.value());
        r
    }

    /// Whether `presented` is this token (constant time for tokens of equal length).
    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        mine.len() == presented.len()
            && mine.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// `msg` as a request carrying `token` when there is one.
pub fn request<T>(token: Option<&ClusterToken>, msg: T) -> Request<T> {
    match token {
        Some(t) => t.request(msg),
        None => Request::new(msg),
    }
}

/// A server interceptor admitting only calls that carry the token (every call when none
/// is configured). A missing or wrong token is UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct RequireToken(pub Option<ClusterToken>);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        check(self.0.as_ref(), &req).map(|()| req)
    }
}

/// Whether `req` carries `token` (always, when there is none): for a service that guards
/// only some of its calls. A missing or wrong token is UNAUTHENTICATED.
pub fn check<T>(token: Option<&ClusterToken>, req: &Request<T>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    match req.metadata().get(CLUSTER_TOKEN_KEY) {
        Some(v) if token.matches(v.as_bytes()) => Ok(()),
        Some(_) => Err(Status::unauthenticated(format!("wrong {CLUSTER_TOKEN_KEY}"))),
        None => Err(Status::unauthenticated(format!(
            "this call needs the cluster token in {CLUSTER_TOKEN_KEY} (callers read it from \
             {CLUSTER_TOKEN_ENV})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    #[test]
    fn only_the_token_passes_and_it_is_never_printed() {
        let t = ClusterToken::new("0123456789abcdef-road").unwrap();
        let mut gate = RequireToken(Some(t.clone()));
        assert!(gate.call(t.request(())).is_ok());
        let other = ClusterToken::new("0123456789abcdef-roae").unwrap();
        let e = gate.call(other.request(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(gate.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        // No token configured: every call passes.
        assert!(RequireToken(None).call(Request::new(())).is_ok());
        assert!(!format!("{t:?}").contains("0123"));
        assert!(ClusterToken::new("short").is_err());
        assert!(ClusterToken::new("has a space in it, too").is_err());
    }
}
