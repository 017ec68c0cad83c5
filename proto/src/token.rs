//! The cluster token: a shared secret that admin and migration calls carry, so a vehicle
//! on the NMS's port (which serves vehicles, operators and other NMSs alike) cannot shut a
//! node down, read its status, or move another vehicle's volume to an address of its own.
//!
//! Servers wrap their admin and migration services in [`RequireToken`] (no token
//! configured: every call passes, and the node says so at start); callers put the token in
//! a call's metadata with [`ClusterToken::request`]. The token is 16 to 256 visible ASCII
//! characters, compared in constant time, never printed (`Debug` hides it).
//!
//! A server on TLS also requires a road certificate for these calls: the token is one
//! secret shared by every node of the road (and handed to every VM), a certificate is each
//! node's or operator's own, so a vehicle that learns the token still cannot use it.

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
/// is configured) and, on a server that asks for it (one on TLS), come from a caller that
/// presented a road certificate. Either missing, or a wrong token, is UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct RequireToken {
    token: Option<ClusterToken>,
    road_certificate: bool,
}

impl RequireToken {
    /// Calls must carry `token` (when there is one) and, with `road_certificate`, come
    /// from a caller that presented a road certificate ([`crate::tls::road_certified`]).
    pub fn new(token: Option<ClusterToken>, road_certificate: bool) -> Self {
        Self { token, road_certificate }
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        check(self.token.as_ref(), self.road_certificate, &req).map(|()| req)
    }
}

/// Whether `req` carries `token` (always, when there is none) and, with
/// `road_certificate`, comes from a caller that presented a road certificate: for a
/// service that guards only some of its calls. Either missing, or a wrong token, is
/// UNAUTHENTICATED.
pub fn check<T>(
    token: Option<&ClusterToken>,
    road_certificate: bool,
    req: &Request<T>,
) -> Result<(), Status> {
    if road_certificate && !crate::tls::road_certified(req) {
        return Err(Status::unauthenticated(
            "this call needs a road certificate and the caller presented none (operators: \
             --tls-cert and --tls-key, or WAYSIDE_TLS_CERT and WAYSIDE_TLS_KEY)",
        ));
    }
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
        let mut gate = RequireToken::new(Some(t.clone()), false);
        assert!(gate.call(t.request(())).is_ok());
        let other = ClusterToken::new("0123456789abcdef-roae").unwrap();
        let e = gate.call(other.request(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(gate.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        // No token configured: every call passes.
        assert!(RequireToken::new(None, false).call(Request::new(())).is_ok());
        // A server on TLS: the token alone is not enough without a road certificate.
        let mut tls_gate = RequireToken::new(Some(t.clone()), true);
        let e = tls_gate.call(t.request(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("road certificate"), "{e}");
        let mut certified = t.request(());
        let leaf = rustls_pki_types::CertificateDer::from(vec![0x30, 0]);
        certified.extensions_mut().insert(crate::tls::PeerCertificates(vec![leaf].into()));
        assert!(tls_gate.call(certified).is_ok());
        let mut no_token = Request::new(());
        let leaf = rustls_pki_types::CertificateDer::from(vec![0x30, 0]);
        no_token.extensions_mut().insert(crate::tls::PeerCertificates(vec![leaf].into()));
        assert_eq!(tls_gate.call(no_token).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(!format!("{t:?}").contains("0123"));
        assert!(ClusterToken::new("short").is_err());
        assert!(ClusterToken::new("has a space in it, too").is_err());
    }
}
