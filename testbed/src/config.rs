//! This binary's configuration: a TOML file (`--config`), overridden by flags.

use serde::{Deserialize, Serialize};

/// Settings; every limit is named with its unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on for gRPC.
    pub listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Self { listen: "127.0.0.1:0".into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_unknown_keys_are_rejected() {
        let text = wayside_proto::config::render(&Config::default());
        let back: Config = wayside_proto::config::parse(&text).unwrap();
        assert_eq!(back, Config::default());
        let err =
            wayside_proto::config::parse::<Config>("listen = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
