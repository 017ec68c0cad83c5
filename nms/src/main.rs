use clap::Parser;
use std::path::PathBuf;
use wayside_nms::config::Config;

// glibc malloc was ~7% of a loaded NMS (4 KiB blocks and per-request HTTP/2 buffers); the
// same allocator and settings as the `pss` binary (`wayside_pss::alloc`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// wayside's network memory server (NMS): the RSU-side block cache, migration, vehicle client and FUSE mount.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML) of `nms serve`; flags override it. Alone (no
    /// subcommand): check the file and exit.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the default configuration of `nms serve` as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run an NMS: serve vehicles' volumes from memory, write back to the PSS, migrate.
    /// Example: nms serve --listen 127.0.0.1:7100 --pss 127.0.0.1:7001,127.0.0.1:7002 --node-id rsu-1
    Serve(wayside_nms::cli::ServeArgs),
    /// Move a volume between NMSs and print the timeline:
    /// nms migrate --volume car-1 --from 127.0.0.1:7100 --to 127.0.0.1:7200
    /// (migrate, status and shutdown present the cluster token in WAYSIDE_CLUSTER_TOKEN and,
    /// to an NMS on TLS, an operator's road certificate in --tls-cert/--tls-key; they and
    /// the volume commands dial over TLS with the road's CA in --tls-ca or WAYSIDE_TLS_CA)
    Migrate(wayside_nms::cli::MigrateArgs),
    /// Print an NMS's cache and volumes.
    Status {
        /// The NMS's address.
        #[arg(long)]
        nms: String,
        #[command(flatten)]
        tls: wayside_nms::cli::OperatorTlsArgs,
    },
    /// Ask an NMS to drain, flush its dirty blocks to the PSS and exit.
    Shutdown {
        /// The NMS's address.
        #[arg(long)]
        nms: String,
        #[command(flatten)]
        tls: wayside_nms::cli::OperatorTlsArgs,
    },
    #[command(flatten)]
    Volume(wayside_nms::cli::VolumeCmd),
    /// Mount a volume as a POSIX file system (FUSE) on this vehicle; see `nms mount --help`.
    Mount(wayside_nms::fuse::cli::MountCmd),
    /// Unmount a file system mounted by `nms mount`.
    Umount(wayside_nms::fuse::cli::UmountArgs),
    /// Run the SMF (service management framework): plans and starts volume moves between
    /// RSUs' NMSs from vehicles' position reports. Example: nms smf --listen 127.0.0.1:7300
    Smf(wayside_nms::smf::service::SmfArgs),
}

fn main() -> anyhow::Result<()> {
    // Before any other thread starts (mimalloc's option setters are not thread-safe).
    wayside_pss::alloc::tune();
    // As the VM image's /init (process 1) the NMS sets the machine up itself and never returns.
    if wayside_nms::pid1::is_pid1() {
        wayside_nms::pid1::main();
    }
    wayside_proto::telemetry::init();
    let cli = Cli::parse();
    if cli.print_default_config && cli.command.is_some() {
        anyhow::bail!("--print-default-config takes no subcommand: it prints and exits");
    }
    if cli.config.is_some() && !matches!(cli.command, Some(Command::Serve(_)) | None) {
        anyhow::bail!(
            "--config configures `nms serve` only (the other commands take flags and \
             environment variables)"
        );
    }
    match cli.command {
        Some(Command::Mount(args)) => return wayside_nms::fuse::cli::mount_cmd(args),
        Some(Command::Umount(args)) => return wayside_nms::fuse::cli::umount_cmd(args),
        Some(Command::Smf(args)) => {
            return runtime()?.block_on(wayside_nms::smf::service::serve_cmd(args))
        }
        Some(Command::Serve(args)) => {
            let config: Config = wayside_proto::config::load(cli.config.as_deref())?;
            return runtime()?.block_on(wayside_nms::cli::serve(config, args));
        }
        Some(Command::Migrate(args)) => {
            return runtime()?.block_on(wayside_nms::cli::migrate(args))
        }
        Some(Command::Status { nms, tls }) => {
            return runtime()?.block_on(wayside_nms::cli::status(&nms, &tls))
        }
        Some(Command::Shutdown { nms, tls }) => {
            return runtime()?.block_on(wayside_nms::cli::shutdown(&nms, &tls))
        }
        Some(Command::Volume(cmd)) => return runtime()?.block_on(wayside_nms::cli::volume(cmd)),
        None => {}
    }
    if cli.print_default_config {
        print!("{}", wayside_proto::config::render(&Config::default()));
        return Ok(());
    }
    let Some(path) = cli.config else {
        anyhow::bail!("no subcommand given: see `nms --help`");
    };
    let config: Config = wayside_proto::config::load(Some(&path))?;
    config.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("{}: a valid configuration", path.display());
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
