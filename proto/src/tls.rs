//! TLS on every hop (DESIGN.md section 8): the vehicle's calls to its NMS cross the air,
//! and the NMS's calls to the PSS, the PSS's Raft messages, the SMF's calls and NMS-to-NMS
//! moves cross the road's backhaul.
//!
//! A node's `[tls]` config section ([`TlsFiles`]) names three PEM files: its certificate
//! chain and key (what it presents as a server, and as a client to servers that ask) and
//! the road's CA (what the certificates of the servers it calls, and at a PSS of its
//! callers, must be signed by). [`Tls::load`] reads and checks them once at start, naming
//! the file at fault. With TLS configured a process dials every address over TLS, whatever
//! scheme the address was written with: an `http://` in a config file or in a redirect
//! never downgrades a hop to plaintext. Without it a process dials plaintext and refuses
//! `https://` addresses rather than guess at trust roots.
//!
//! Who must present a certificate: a PSS requires one of every caller (only the road's
//! own nodes reach it: NMSs, PSS peers, operators with a road certificate); an NMS and the
//! SMF ask for one but take callers without (vehicles have none; their volume credential
//! authenticates them, over an encrypted channel). Their admin and migration calls need
//! both the cluster token and a road certificate ([`crate::token::RequireToken`]), so a
//! vehicle that learns the token still cannot move a volume or stop a node. The
//! certificates a connection's caller presented reach its calls as [`PeerCertificates`].
//!
//! [`pki`] makes a road's CA and node certificate, for `testbed` roads and tests.

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;

/// A `[tls]` config section: PEM files. All absent: plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM), leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The road's CA certificate(s) (PEM): what the servers this process calls (and, at a
    /// PSS, its callers) must present a certificate signed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Nothing configured: plaintext.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }
}

/// What is wrong with a TLS set-up, naming the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("tls.{what} {path}: {detail}")]
    Pem { what: &'static str, path: PathBuf, detail: String },
    #[error("tls.cert and tls.key go together: {0} is set without the other")]
    Half(&'static str),
    #[error("tls.ca is needed: {0}")]
    NoCa(&'static str),
    #[error("tls.cert and tls.key are needed: {0}")]
    NoIdentity(&'static str),
    #[error("tls.cert {cert} and tls.key {key} do not make a usable identity: {detail}")]
    Identity { cert: PathBuf, key: PathBuf, detail: String },
    #[error("{0} is an https:// address, but this process has no TLS set up (tls.ca)")]
    HttpsWithoutTls(String),
    #[error("TLS set-up: {0}")]
    Config(String),
}

/// Whether a server asks its callers for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Callers present none.
    None,
    /// Callers may present one, and one presented must be signed by the road's CA (an NMS,
    /// the SMF: vehicles have none, the road's nodes and operators have theirs).
    Optional,
    /// Every caller must present one signed by the road's CA (a PSS).
    Required,
}

/// The certificate chain a connection's caller presented (leaf first), verified against
/// the road's CA during the handshake: what a server built on
/// [`crate::h2serve::serve_http2`] puts in the extensions of every call on that
/// connection. Absent: the caller presented none (or the connection is plaintext).
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<[CertificateDer<'static>]>);

/// Whether the caller of `req` presented a road certificate: through a hand-built server
/// ([`PeerCertificates`]) or tonic's own (its TLS connection info).
pub fn road_certified<T>(req: &tonic::Request<T>) -> bool {
    req.extensions().get::<PeerCertificates>().is_some_and(|c| !c.0.is_empty())
        || req.peer_certs().is_some_and(|c| !c.is_empty())
}

/// A loaded TLS set-up; cheap to clone.
#[derive(Clone)]
pub struct Tls(Arc<Inner>);

struct Inner {
    files: TlsFiles,
    /// PEM text, for tonic's configs.
    cert_pem: Option<Vec<u8>>,
    key_pem: Option<Vec<u8>>,
    ca_pem: Option<Vec<u8>>,
    /// Parsed, for rustls.
    certs: Vec<CertificateDer<'static>>,
    key: Option<PrivateKeyDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.0.files).finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })
}

fn pem_err(what: &'static str, path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { what, path: path.into(), detail: detail.to_string() }
}

fn certs_of(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_err(what, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

impl Tls {
    /// Reads and checks `files`; `None` when none is set (plaintext).
    pub fn load(files: &TlsFiles) -> Result<Option<Self>, TlsError> {
        if files.is_empty() {
            return Ok(None);
        }
        let (cert_pem, key_pem, certs, key) = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => {
                let cert_pem = read("cert", c)?;
                let key_pem = read("key", k)?;
                let certs = certs_of("cert", c, &cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| pem_err("key", k, format!("no usable private key: {e}")))?;
                (Some(cert_pem), Some(key_pem), certs, Some(key))
            }
            (Some(_), None) => return Err(TlsError::Half("tls.cert")),
            (None, Some(_)) => return Err(TlsError::Half("tls.key")),
            (None, None) => (None, None, Vec::new(), None),
        };
        let (ca_pem, roots) = match &files.ca {
            Some(p) => {
                let pem = read("ca", p)?;
                let roots = certs_of("ca", p, &pem)?;
                (Some(pem), roots)
            }
            None => (None, Vec::new()),
        };
        let tls = Self(Arc::new(Inner {
            files: files.clone(),
            cert_pem,
            key_pem,
            ca_pem,
            certs,
            key,
            roots,
        }));
        // Catch a key that does not match its certificate, or an unusable root, now
        // rather than at the first connection.
        if tls.has_identity() {
            tls.server_config(ClientAuth::None)?;
        }
        if tls.0.ca_pem.is_some() {
            tls.root_store()?;
        }
        Ok(Some(tls))
    }

    /// The files it was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.0.files
    }

    /// Whether it has a certificate and key to present.
    pub fn has_identity(&self) -> bool {
        self.0.key.is_some()
    }

    /// Whether it has the road's CA (needed to call a server).
    pub fn has_ca(&self) -> bool {
        self.0.ca_pem.is_some()
    }

    fn root_store(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut store = rustls::RootCertStore::empty();
        for c in &self.0.roots {
            store.add(c.clone()).map_err(|e| {
                let path = self.0.files.ca.clone().unwrap_or_default();
                pem_err("ca", &path, format!("not a usable CA certificate: {e}"))
            })?;
        }
        Ok(store)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A rustls server config presenting this identity, speaking HTTP/2 (ALPN `h2`).
    pub fn server_config(&self, auth: ClientAuth) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (Some(key), false) = (&self.0.key, self.0.certs.is_empty()) else {
            return Err(TlsError::NoIdentity("a server presents a certificate"));
        };
        let builder = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional | ClientAuth::Required => {
                if !self.has_ca() {
                    return Err(TlsError::NoCa("a server checks its callers' certificates"));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(self.root_store()?),
                    Self::provider(),
                );
                let verifier = match auth {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| TlsError::Config(e.to_string()))?,
                )
            }
        };
        let mut cfg =
            builder.with_single_cert(self.0.certs.clone(), key.clone_key()).map_err(|e| {
                TlsError::Identity {
                    cert: self.0.files.cert.clone().unwrap_or_default(),
                    key: self.0.files.key.clone().unwrap_or_default(),
                    detail: e.to_string(),
                }
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The acceptor a hand-built server ([`crate::h2serve::serve_http2`]) wraps its
    /// connections in.
    pub fn acceptor(&self, auth: ClientAuth) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        Ok(tokio_rustls::TlsAcceptor::from(self.server_config(auth)?))
    }

    /// tonic's server TLS config for this identity.
    pub fn tonic_server(
        &self,
        auth: ClientAuth,
    ) -> Result<tonic::transport::ServerTlsConfig, TlsError> {
        // Checked the same way as the hand-built servers' config.
        self.server_config(auth)?;
        let (Some(cert), Some(key)) = (&self.0.cert_pem, &self.0.key_pem) else {
            return Err(TlsError::NoIdentity("a server presents a certificate"));
        };
        let mut cfg = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        if auth != ClientAuth::None {
            let ca = self.0.ca_pem.as_ref().ok_or(TlsError::NoCa("a server checks callers"))?;
            cfg = cfg
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(auth == ClientAuth::Optional);
        }
        Ok(cfg)
    }

    /// tonic's client TLS config: trusts the road's CA, presents this identity if any.
    pub fn tonic_client(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let ca = self.0.ca_pem.as_ref().ok_or(TlsError::NoCa("to call a server over TLS"))?;
        let mut cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .assume_http2(true);
        if let (Some(cert), Some(key)) = (&self.0.cert_pem, &self.0.key_pem) {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Ok(cfg)
    }

    /// A rustls client config (for clients built on `h2` directly, like the benchmark's).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        if !self.has_ca() {
            return Err(TlsError::NoCa("to call a server over TLS"));
        }
        let builder = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.root_store()?);
        let mut cfg = match &self.0.key {
            Some(key) => builder
                .with_client_auth_cert(self.0.certs.clone(), key.clone_key())
                .map_err(|e| TlsError::Config(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Making a road's certificates: a CA, and node certificates it signs.
pub mod pki {
    use super::TlsFiles;
    use std::net::IpAddr;
    use std::path::Path;

    /// A CA made here; signs node certificates.
    pub struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    /// A certificate and key, PEM.
    pub struct Issued {
        pub cert_pem: String,
        pub key_pem: String,
    }

    impl Ca {
        /// A new CA named `name` (ECDSA P-256).
        pub fn new(name: &str) -> Result<Self, rcgen::Error> {
            let key = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let cert = p.self_signed(&key)?;
            Ok(Self { cert, key })
        }

        pub fn cert_pem(&self) -> String {
            self.cert.pem()
        }

        /// A certificate for a node reached as any of `names` (DNS names) or `ips`, good
        /// both as a server's and as a client's.
        pub fn issue(&self, names: &[String], ips: &[IpAddr]) -> Result<Issued, rcgen::Error> {
            let key = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::new(names.to_vec())?;
            p.subject_alt_names.extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
            p.distinguished_name.push(
                rcgen::DnType::CommonName,
                names.first().cloned().unwrap_or_else(|| "wayside node".into()),
            );
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.cert, &self.key)?;
            Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        }

        /// Writes `ca.pem` and a node certificate (`node.pem`, `node.key`, the key 0600)
        /// for `names` and `ips` into `dir`, and returns the `[tls]` section naming them.
        pub fn write_road(
            &self,
            dir: &Path,
            names: &[String],
            ips: &[IpAddr],
        ) -> std::io::Result<TlsFiles> {
            let node = self.issue(names, ips).map_err(std::io::Error::other)?;
            std::fs::create_dir_all(dir)?;
            let files = TlsFiles {
                cert: Some(dir.join("node.pem")),
                key: Some(dir.join("node.key")),
                ca: Some(dir.join("ca.pem")),
            };
            std::fs::write(dir.join("ca.pem"), self.cert_pem())?;
            std::fs::write(dir.join("node.pem"), &node.cert_pem)?;
            write_private(&dir.join("node.key"), node.key_pem.as_bytes())?;
            Ok(files)
        }
    }

    /// Writes `bytes` to a new file only its owner can read.
    pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let _ = std::fs::remove_file(path);
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    /// The names and addresses a node on this machine is reached by in tests and `testbed`
    /// roads: `localhost`, 127.0.0.1 and ::1.
    pub fn loopback() -> (Vec<String>, Vec<IpAddr>) {
        (
            vec!["localhost".into()],
            vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn road(dir: &Path) -> TlsFiles {
        let ca = pki::Ca::new("test road").unwrap();
        let (names, ips) = pki::loopback();
        ca.write_road(dir, &names, &ips).unwrap()
    }

    #[test]
    fn a_road_made_here_loads_and_bad_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let files = road(d.path());
        let tls = Tls::load(&files).unwrap().unwrap();
        assert!(tls.has_identity() && tls.has_ca());
        tls.server_config(ClientAuth::Required).unwrap();
        tls.client_config().unwrap();
        assert!(Tls::load(&TlsFiles::default()).unwrap().is_none());

        let half = TlsFiles { key: None, ..files.clone() };
        assert!(Tls::load(&half).unwrap_err().to_string().contains("tls.cert and tls.key"));
        let missing = TlsFiles { ca: Some(d.path().join("nope.pem")), ..files.clone() };
        let e = Tls::load(&missing).unwrap_err().to_string();
        assert!(e.contains("tls.ca") && e.contains("nope.pem"), "{e}");
        std::fs::write(d.path().join("junk.pem"), "not pem").unwrap();
        let junk = TlsFiles { cert: Some(d.path().join("junk.pem")), ..files.clone() };
        let e = Tls::load(&junk).unwrap_err().to_string();
        assert!(e.contains("tls.cert") && e.contains("no CERTIFICATE"), "{e}");
        // A key that is not the certificate's.
        let other = tempfile::tempdir().unwrap();
        let other_files = road(other.path());
        let mismatched = TlsFiles { key: other_files.key.clone(), ..files.clone() };
        let e = Tls::load(&mismatched).unwrap_err().to_string();
        assert!(e.contains("do not make a usable identity"), "{e}");
        // A client-only set-up: a CA, no identity; it cannot serve.
        let vehicle = TlsFiles { ca: files.ca.clone(), ..TlsFiles::default() };
        let v = Tls::load(&vehicle).unwrap().unwrap();
        assert!(!v.has_identity());
        assert!(v.server_config(ClientAuth::None).is_err());
        v.tonic_client().unwrap();
        let key_mode = std::fs::metadata(files.key.unwrap()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
    }
}
