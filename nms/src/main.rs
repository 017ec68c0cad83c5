use clap::Parser;
use std::path::PathBuf;
use wayside_nms::config::Config;

/// wayside's network memory server (NMS): the RSU-side block cache, migration, vehicle client and FUSE mount.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML); flags override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> anyhow::Result<()> {
    wayside_proto::telemetry::init();
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", wayside_proto::config::render(&Config::default()));
        return Ok(());
    }
    let _config: Config = wayside_proto::config::load(cli.config.as_deref())?;
    Ok(())
}
