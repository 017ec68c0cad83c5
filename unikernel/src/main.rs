use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::signal::unix::SignalKind;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wayside_nms::pid1::{BootParams, Ipv4Cidr};
use wayside_proto::types::Endpoint;
use wayside_unikernel::config::Config;
use wayside_unikernel::image::{self, Image};
use wayside_unikernel::kernel::{self, KernelTree};
use wayside_unikernel::vm::{self, Accel, Machine, Net, Vm, VmOptions};

/// Builds the NMS boot image and runs, controls and live-migrates it under QEMU.
///
/// Typical use:
///   unikernel fetch-kernel                 # Debian's kernel into ~/.cache/wayside/kernel (not installed)
///   unikernel build --out img --strip      # vmlinuz + initramfs (nms as /init) + manifest.json
///   unikernel run img --pss 10.0.2.2:5000  # boots it; prints boot-to-serving time
///   unikernel status; unikernel stop
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
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

/// The guest's NMS settings (the `wayside.*` words of the kernel command line).
#[derive(clap::Args, Debug, Default)]
struct BootArgs {
    /// Guest address and prefix (default with user-mode networking: 10.0.2.15/24).
    #[arg(long)]
    ip: Option<String>,
    /// Guest default gateway (default with user-mode networking: 10.0.2.2).
    #[arg(long)]
    gw: Option<String>,
    /// NMS gRPC listen address inside the guest (IP:PORT; default 0.0.0.0:7000).
    #[arg(long)]
    listen: Option<String>,
    /// PSS endpoints as the guest sees them, comma-separated (with user-mode networking the
    /// host's 127.0.0.1:PORT is 10.0.2.2:PORT).
    #[arg(long)]
    pss: Option<String>,
    /// The NMS's node name.
    #[arg(long)]
    node: Option<String>,
    /// Tracing filter inside the guest (RUST_LOG syntax).
    #[arg(long)]
    log: Option<String>,
}

impl BootArgs {
    /// Applies the flags over `base`, with a clear error naming a bad value.
    fn apply(&self, mut base: BootParams) -> anyhow::Result<BootParams> {
        if let Some(ip) = &self.ip {
            base.ip =
                Some(ip.parse::<Ipv4Cidr>().map_err(|e| anyhow::anyhow!("--ip {ip:?}: {e}"))?);
        }
        if let Some(gw) = &self.gw {
            base.gateway =
                Some(gw.parse().map_err(|_| anyhow::anyhow!("--gw {gw:?}: not an IPv4 address"))?);
        }
        if let Some(l) = &self.listen {
            base.listen = l.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("--listen {l:?}: expected IP:PORT, e.g. 0.0.0.0:7000")
            })?;
        }
        if let Some(pss) = &self.pss {
            base.pss = pss
                .split(',')
                .map(|s| Endpoint::parse(s).map_err(|e| anyhow::anyhow!("--pss {s:?}: {e}")))
                .collect::<anyhow::Result<_>>()?;
        }
        if let Some(n) = &self.node {
            base.node = Some(n.clone());
        }
        if let Some(l) = &self.log {
            base.log = Some(l.clone());
        }
        // The guest parses exactly this; refuse here what it would refuse there, and what
        // it would read as something else (a value with a space).
        base.check_words()?;
        BootParams::parse(&base.render())?;
        Ok(base)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Download Debian's stock kernel package with apt-get and unpack it (dpkg-deb -x) into
    /// a cache folder. Nothing is installed. Prints the kernel folder.
    FetchKernel {
        /// Cache folder [default: $WAYSIDE_KERNEL_DIR, else ~/.cache/wayside/kernel].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// The package [default: what linux-image-amd64 depends on].
        #[arg(long)]
        package: Option<String>,
    },
    /// Build an image folder: vmlinuz, initramfs.cpio (the static nms as /init, the
    /// virtio-net modules), manifest.json.
    Build {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// The nms binary [default: the `nms` beside this program].
        #[arg(long)]
        nms: Option<PathBuf>,
        /// Unpacked kernel package, or the fetch-kernel cache [default: the cache].
        #[arg(long)]
        kernel_dir: Option<PathBuf>,
        /// Kernel version, when the folder holds several.
        #[arg(long)]
        kernel_version: Option<String>,
        /// Modules to include (dependencies are added) [default: virtio_mmio, virtio_pci, virtio_net].
        #[arg(long = "module")]
        modules: Vec<String>,
        /// Drop debug info from /init (binutils `strip --strip-debug`).
        #[arg(long)]
        strip: bool,
        /// An NMS configuration file (TOML) to bake in; command-line words override it.
        #[arg(long)]
        nms_config: Option<PathBuf>,
        #[command(flatten)]
        boot: BootArgs,
    },
    /// Boot an image under QEMU and wait until the NMS answers its gRPC health check.
    /// With WAYSIDE_CLUSTER_TOKEN set, the guest's NMS requires that token on admin and
    /// migration calls (passed through QEMU's fw_cfg from a 0600 file in the state folder,
    /// never on a command line); `stop` presents it. With --tls-cert, --tls-key and --tls-ca
    /// the guest's NMS serves TLS only and dials the PSS over TLS (its files copied into the
    /// state folder and passed the same way).
    Run {
        /// The image folder.
        image: PathBuf,
        /// Where the VM's QMP socket, serial log and vm.json go.
        #[arg(long, default_value = "/tmp/wayside-vm")]
        state_dir: PathBuf,
        /// Host port (127.0.0.1) forwarded to the NMS [default: a free one].
        #[arg(long)]
        host_port: Option<u16>,
        /// Use this existing tap device instead of user-mode networking (give --ip/--gw).
        #[arg(long)]
        tap: Option<String>,
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        #[arg(long, value_enum)]
        machine: Option<Machine>,
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Stay in the foreground until the VM exits.
        #[arg(long)]
        foreground: bool,
        /// The guest NMS's certificate chain (PEM): it then serves TLS only. (Flags only:
        /// the WAYSIDE_TLS_* an operator exports for their own calls are not the VM's.)
        #[arg(long, requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
        tls_key: Option<PathBuf>,
        /// The road's CA (PEM): the PSS's certificate is checked against it, and so is the
        /// NMS's by `status` and `stop`.
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_ca: Option<PathBuf>,
        #[command(flatten)]
        boot: BootArgs,
    },
    /// Show a running VM's QEMU status and whether its NMS serves.
    Status {
        #[arg(long, default_value = "/tmp/wayside-vm")]
        state_dir: PathBuf,
    },
    /// Stop a VM: NmsAdmin.Shutdown (flush, power off), then QMP `quit` if it lingers.
    Stop {
        #[arg(long, default_value = "/tmp/wayside-vm")]
        state_dir: PathBuf,
        /// Skip the clean shutdown; QMP `quit` at once.
        #[arg(long)]
        force: bool,
    },
    /// Live-migrate a running VM to a new QEMU (-incoming) and report total time,
    /// downtime and bytes. With user-mode networking the forwarded port moves along.
    Migrate {
        #[arg(long, default_value = "/tmp/wayside-vm")]
        state_dir: PathBuf,
        /// State folder of the destination VM.
        #[arg(long)]
        to_state_dir: PathBuf,
        /// Tap device for the destination (tap networking only).
        #[arg(long)]
        to_tap: Option<String>,
    },
    /// Say whether KVM really works here (boots the kernel under KVM for at most 2 s) or
    /// TCG will be used.
    ProbeKvm {
        /// Unpacked kernel package, or the fetch-kernel cache [default: the cache].
        #[arg(long)]
        kernel_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    wayside_proto::telemetry::init();
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", wayside_proto::config::render(&Config::default()));
        return Ok(());
    }
    let config: Config = wayside_proto::config::load(cli.config.as_deref())?;
    let Some(cmd) = cli.cmd else {
        use clap::CommandFactory;
        Cli::command().print_help()?;
        return Ok(());
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(dispatch(cmd, config))
}

fn default_nms() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("nms")))
        .unwrap_or_else(|| PathBuf::from("nms"))
}

async fn dispatch(cmd: Cmd, config: Config) -> anyhow::Result<()> {
    match cmd {
        Cmd::FetchKernel { cache_dir, package } => {
            let dir = cache_dir.unwrap_or_else(kernel::default_cache_dir);
            let tree = kernel::fetch(&dir, package.as_deref())?;
            println!("kernel {} at {}", tree.version, tree.vmlinuz.display());
            println!("modules in {}", tree.modules_dir.display());
        }
        Cmd::Build { out, nms, kernel_dir, kernel_version, modules, strip, nms_config, boot } => {
            let boot = boot.apply(BootParams::default())?;
            let nms = nms.unwrap_or_else(default_nms);
            // Check /init before touching the kernel: the cheaper error first.
            image::check_init(&nms)?;
            let kdir = kernel_dir.unwrap_or_else(kernel::default_cache_dir);
            let tree = KernelTree::locate(&kdir, kernel_version.as_deref())?;
            let modules = if modules.is_empty() {
                kernel::DEFAULT_MODULES.iter().map(|s| s.to_string()).collect()
            } else {
                modules
            };
            let m = image::build(&image::BuildOptions {
                kernel: tree,
                nms,
                out_dir: out.clone(),
                modules,
                boot,
                nms_config,
                strip,
            })?;
            println!("image {} (kernel {})", out.display(), m.kernel_version);
            println!("  vmlinuz        {:>10} bytes  sha256 {}", m.kernel.bytes, m.kernel.sha256);
            println!(
                "  initramfs.cpio {:>10} bytes  sha256 {}",
                m.initramfs.bytes, m.initramfs.sha256
            );
            println!("  /init          {:>10} bytes", m.init.bytes);
            let names: Vec<&str> = m.modules.iter().map(|p| p.file.as_str()).collect();
            println!("  modules        {}", names.join(" "));
            println!("  cmdline        {}", m.default_cmdline);
        }
        Cmd::Run {
            image,
            state_dir,
            host_port,
            tap,
            accel,
            machine,
            memory_mib,
            foreground,
            tls_cert,
            tls_key,
            tls_ca,
            boot,
        } => {
            let img = Image::open(&image, true)?;
            let tls = tls_cert.is_some().then_some(wayside_proto::tls::TlsFiles {
                cert: tls_cert,
                key: tls_key,
                ca: tls_ca,
            });
            let params = boot.apply(img.boot_params()?)?;
            let net = match tap {
                Some(ifname) => Net::Tap { ifname },
                None => Net::User {
                    host_port: match host_port {
                        Some(p) => p,
                        None => vm::free_port()?,
                    },
                },
            };
            let opts = VmOptions {
                image: img,
                state_dir,
                memory_mib: memory_mib.unwrap_or(config.memory_mib),
                cpus: config.cpus,
                accel: accel.unwrap_or(config.accel),
                machine: machine.unwrap_or(config.machine),
                net,
                boot: params,
                incoming: None,
                cluster_token: wayside_proto::token::ClusterToken::from_env()
                    .map_err(anyhow::Error::msg)?,
                tls,
            };
            let started = Instant::now();
            // QEMU in a group of its own either way: a ctrl-C in the foreground is
            // handled below by a clean stop (the NMS drains), not by QEMU quitting.
            let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
            let mut vm = Vm::launch_with(&opts, !foreground, true).await?;
            // A ctrl-C or SIGTERM during the boot wait stops the VM (it is in a group of
            // its own, so nothing else would: it was left booting, and running).
            let boot = Duration::from_millis(config.boot_timeout_ms);
            let waited = tokio::select! {
                r = vm.wait_serving(boot) => r.map_err(anyhow::Error::from),
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted while booting")),
                _ = term.recv() => Err(anyhow::anyhow!("terminated while booting")),
            };
            if let Err(e) = waited {
                let _ = vm.stop(Duration::ZERO, true).await;
                return Err(e);
            }
            println!(
                "NMS serving at {} after {} ms (QEMU start to first health answer; {:?}, {:?})",
                vm.state.nms_endpoint,
                started.elapsed().as_millis(),
                vm.state.accel,
                vm.state.machine
            );
            println!(
                "state: {}  serial log: {}",
                vm.state_dir.display(),
                vm.state.serial_log.display()
            );
            if foreground {
                while vm.is_alive() {
                    let stop = tokio::select! {
                        _ = tokio::signal::ctrl_c() => true,
                        _ = term.recv() => true,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                    };
                    if stop {
                        let outcome =
                            vm.stop(Duration::from_millis(config.stop_grace_ms), false).await?;
                        println!("stopped: {outcome:?}");
                    }
                }
            }
        }
        Cmd::Status { state_dir } => {
            let mut vm = Vm::attach(&state_dir)?;
            let s = vm.status().await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        Cmd::Stop { state_dir, force } => {
            let mut vm = Vm::attach(&state_dir)?;
            let outcome = vm.stop(Duration::from_millis(config.stop_grace_ms), force).await?;
            println!("stopped: {outcome:?}");
        }
        Cmd::Migrate { state_dir, to_state_dir, to_tap } => {
            let mut vm = Vm::attach(&state_dir)?;
            check_distinct(&state_dir, &to_state_dir)?;
            let (mut dest, report) =
                vm.migrate(&to_state_dir, to_tap.map(|ifname| Net::Tap { ifname })).await?;
            dest.detach();
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!("now running from {}", to_state_dir.display());
        }
        Cmd::ProbeKvm { kernel_dir } => {
            let kdir = kernel_dir.unwrap_or_else(kernel::default_cache_dir);
            let tree = KernelTree::locate(&kdir, None)?;
            let works = Path::new("/dev/kvm").exists()
                && vm::probe_accel("kvm", &tree.vmlinuz, vm::KVM_PROBE_TIMEOUT);
            println!(
                "{}",
                if works { "kvm: works" } else { "kvm: not usable here; TCG will be used" }
            );
        }
    }
    Ok(())
}

fn check_distinct(a: &Path, b: &Path) -> anyhow::Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(a) == canon(b) {
        anyhow::bail!("--to-state-dir must differ from --state-dir");
    }
    std::fs::create_dir_all(b).with_context(|| format!("creating {}", b.display()))
}
