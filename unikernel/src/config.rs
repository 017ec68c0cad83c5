//! This binary's configuration: a TOML file (`--config`), overridden by flags.

use serde::{Deserialize, Serialize};

use crate::vm::{Accel, Machine};

/// Settings; every limit is named with its unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Guest memory in MiB. The initramfs is unpacked into RAM, so leave room for it.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// KVM, TCG, or auto (KVM when a 2 s probe shows it works).
    pub accel: Accel,
    /// QEMU machine type.
    pub machine: Machine,
    /// How long `run` waits for the NMS health check, in milliseconds (TCG boots take seconds).
    pub boot_timeout_ms: u64,
    /// How long `stop` waits for a clean power-off before QMP `quit`, in milliseconds.
    pub stop_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            memory_mib: 512,
            cpus: 1,
            accel: Accel::Auto,
            machine: Machine::Microvm,
            boot_timeout_ms: 120_000,
            stop_grace_ms: 15_000,
        }
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
        let err = wayside_proto::config::parse::<Config>("cpus = 2\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
