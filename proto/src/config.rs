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
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads `path` as TOML, or returns the default when no file is given.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
}

/// Parses TOML text.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str(text)
}

/// Renders a config as TOML (for `--print-default-config`).
pub fn render<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).expect("config structs serialize to TOML")
}
