//! Allocator settings of the `pss` and `testbed` binaries, which both use mimalloc as
//! their global allocator (this library itself does not choose one).
//!
//! One setting: mimalloc's purge delay, how long freed memory stays with the process
//! before it is returned to the kernel. Memory returned and then used again is faulted
//! in and zeroed by the kernel, which under a write load (4 KiB blocks, Raft entries of
//! hundreds of KiB, sled's pages) is CPU spent for nothing.

use libmimalloc_sys as mi;

/// mimalloc's `mi_option_purge_delay`: its position in the `mi_option_e` enum of the
/// mimalloc sources libmimalloc-sys 0.1.49 vendors (15 in both
/// `c_src/mimalloc/v3/include/mimalloc.h`, the version built by default, and
/// `c_src/mimalloc/v2/include/mimalloc.h`); libmimalloc-sys exports no constant for it.
/// `purge_delay_option_id_is_mimallocs` checks it against mimalloc's own reading of
/// [`PURGE_DELAY_ENV`].
const MI_OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// The purge delay set at startup, in milliseconds. It is mimalloc 3's own default
/// (v3.3.2's `options.c`; its header's "(=10)" is mimalloc 2's default, which also
/// multiplies it by 10 for arenas): pinned so that building mimalloc 2 (the crate's `v2`
/// feature) or a new default does not silently return memory to the kernel every 10 ms.
/// Measured (`bench pss`, 256 clients, 60 s): 30 s instead cuts minor page faults from
/// 1.3-1.6 to 0.1-0.4 per write, but the kernel's page zeroing only from 6.6% to 5.0% of
/// the CPU samples (most zeroing is first touch of memory the process grows into: huge
/// pages of the in-memory Raft log and sled's cache), not visible in CPU per write on a
/// shared machine; so the shorter delay (memory back to the system sooner) stays.
pub const PURGE_DELAY_MS: i64 = 1000;

/// mimalloc's own environment variable for the purge delay (milliseconds; 0 purges at
/// once, -1 never). When it is set, its value is kept.
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Applies the settings above; returns the purge delay in effect, in milliseconds.
/// Call it first thing in `main`, before other threads start: mimalloc's option setters
/// are not thread-safe.
pub fn tune() -> i64 {
    if std::env::var_os(PURGE_DELAY_ENV).is_none() {
        // SAFETY: an option id of the linked mimalloc (checked by a test); called before
        // other threads exist (the caller's contract).
        unsafe { mi::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
    }
    purge_delay_ms()
}

/// The purge delay mimalloc uses now, in milliseconds.
// `c_long` is `i64` here but 32 bits on other targets.
#[allow(clippy::useless_conversion)]
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reading an option has no preconditions.
    i64::from(unsafe { mi::mi_option_get(MI_OPTION_PURGE_DELAY) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "WAYSIDE_ALLOC_TEST_CHILD";

    /// mimalloc reads `MIMALLOC_PURGE_DELAY` into its purge-delay option: a process
    /// started with the variable set must read that value through our option id, and
    /// `tune` must keep it. Without the variable, `tune` sets [`PURGE_DELAY_MS`].
    #[test]
    fn purge_delay_option_id_is_mimallocs() {
        if std::env::var_os(CHILD).is_some() {
            println!("before={} tuned={}", purge_delay_ms(), tune());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "alloc::tests::purge_delay_option_id_is_mimallocs", "--nocapture"])
            .env(CHILD, "1")
            .env(PURGE_DELAY_ENV, "4321")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        assert!(stdout.contains("before=4321 tuned=4321"), "child printed: {stdout}");
        if std::env::var_os(PURGE_DELAY_ENV).is_none() {
            assert_eq!(tune(), PURGE_DELAY_MS);
            assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
        }
    }
}
