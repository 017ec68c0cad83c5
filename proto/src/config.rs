//! TOML configuration files shared by the binaries: a file is read first, command-line
//! flags override it. Config structs use `#[serde(deny_unknown_fields, default)]` so a
//! misspelt key is an error that names it, and a missing key takes the default.

use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `detail` is the parser's message, with the offending line quoted unless it may
    /// hold a secret ([`SECRET_KEYS`]).
    #[error("config file {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads `path` as TOML, or returns the default when no file is given.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), detail: redacted(&text, &e) })
}

/// Keys whose values are secrets: a parse error on their line is reported without the
/// line (the parser quotes it, and stderr goes to logs).
pub const SECRET_KEYS: &[&str] = &["cluster_token", "credential", "token"];

/// The parse error `e` of `text` as the parser words it, or, when it is on a line that
/// names a secret, its message and line number alone.
fn redacted(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.to_string() };
    let start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let end = text[span.end.min(text.len())..].find('\n').map_or(text.len(), |i| span.end + i);
    let lines = &text[start..end.max(start)];
    if SECRET_KEYS.iter().any(|k| lines.contains(k)) {
        let line = text[..start].matches('\n').count() + 1;
        format!("line {line}: {} (the line is not shown: it may hold a secret)", e.message())
    } else {
        e.to_string()
    }
}

/// Parses TOML text.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str(text)
}

/// Renders a config as TOML (for `--print-default-config`).
pub fn render<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).expect("config structs serialize to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default, Debug)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        cluster_token: String,
        listen: String,
    }

    #[test]
    fn a_parse_error_on_a_secrets_line_does_not_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"x\"\ncluster_token = \"s3cret-value\" trailing\n").unwrap();
        let e = load::<Cfg>(Some(&p)).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        // Other lines are quoted as the parser words it.
        std::fs::write(&p, "listen = x\n").unwrap();
        let e = load::<Cfg>(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("listen = x"), "{e}");
    }
}
