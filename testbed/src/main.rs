use clap::{Parser, Subcommand};
use std::path::PathBuf;
use wayside_testbed::config::Config;

/// wayside's testbed: the paper's vehicular model, the SMF, an emulated road, benchmarks.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML); flags override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wayside_proto::telemetry::init();
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", wayside_proto::config::render(&Config::default()));
        return Ok(());
    }
    let _config: Config = wayside_proto::config::load(cli.config.as_deref())?;
    match cli.cmd {
        Some(Cmd::Bench(b)) => wayside_testbed::bench::run(b).await,
        Some(Cmd::Paper(a)) => wayside_testbed::paper::run(a),
        Some(Cmd::Drive(a)) => wayside_testbed::drive::run(a).await,
        None => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            Ok(())
        }
    }
}
