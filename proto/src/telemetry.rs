//! Logging set-up for the binaries: `tracing` to stderr, level from `RUST_LOG`
//! (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Installs a subscriber for a test: what it logs goes through the test harness's capture,
/// so a failing test shows it and a passing one stays quiet. Level from `RUST_LOG`, by
/// default the NMS side (client library, moves, the SMF) at `info`, everything else at
/// `warn`. Safe to call in every test.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,wayside_nms=info,wayside_testbed=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}
