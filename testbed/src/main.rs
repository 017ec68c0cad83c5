use clap::{Parser, Subcommand};

// The PSS runs in this process in `bench pss` and `drive`: the same allocator and
// allocator settings as the `pss` binary (`wayside_pss::alloc`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// wayside's testbed: the paper's vehicular model, the SMF, an emulated road, benchmarks.
///
/// Scenarios come from flags and files (`--rsus FILE` CSV, `--fcd FILE` SUMO trace), not a
/// config file: each run says in full on its command line what it measured.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks against peers (redis, memcached, etcd, QEMU); print figures and ratios.
    #[command(subcommand)]
    Bench(wayside_testbed::bench::Bench),
    /// Reproduce the paper's Tables IV-VII (reactive/proactive migration) from its inputs.
    Paper(wayside_testbed::paper::Args),
    /// Drive vehicles along a road of RSUs (PSS + one NMS per RSU + SMF, all real) with a
    /// read/write workload; check that no acknowledged write is lost. The README's main command.
    Drive(wayside_testbed::drive::Args),
    /// Measure the NMS's service migration time by each mechanism available here (wayside
    /// state migration, QEMU live migration of the image, cold boot + refill), print Table
    /// III beside the paper's and recompute Tables V-VII; report and SVG plot in --out.
    Mechanisms(wayside_testbed::mechanisms::Args),
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads start (mimalloc's option setters are not thread-safe).
    let purge_delay_ms = wayside_pss::alloc::tune();
    wayside_proto::telemetry::init();
    tracing::debug!(purge_delay_ms, "mimalloc");
    let cmd = Cli::parse().cmd;
    match tokio::runtime::Runtime::new()?.block_on(run(cmd)) {
        Err(e) if e.is::<wayside_testbed::drive::Interrupted>() => {
            eprintln!("{e}");
            std::process::exit(wayside_testbed::drive::INTERRUPTED_EXIT_CODE)
        }
        r => r,
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Bench(b) => wayside_testbed::bench::run(b).await,
        Cmd::Paper(a) => wayside_testbed::paper::run(a),
        Cmd::Drive(a) => wayside_testbed::drive::run(a).await,
        Cmd::Mechanisms(a) => wayside_testbed::mechanisms::run(a).await,
    }
}
