//! (being written)

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the benchmark.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("this benchmark is not built yet")
}
