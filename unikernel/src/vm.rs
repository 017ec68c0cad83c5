//! Running the image under `qemu-system-x86_64`: choosing KVM or TCG with a short probe,
//! building the command line, starting QEMU, waiting for the NMS's gRPC health check,
//! status and stop through QMP, and live migration to a second QEMU (`-incoming`).
//!
//! A running VM is described by its state folder: `vm.json` ([`VmState`]), the QMP socket,
//! the serial console log and QEMU's own log. The CLI's `status`, `stop` and `migrate`
//! find the VM through it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wayside_nms::pid1::{BootParams, Ipv4Cidr, FW_CFG_CLUSTER_TOKEN, FW_CFG_TLS};
use wayside_proto::tls::{Tls, TlsFiles};
use wayside_proto::token::ClusterToken;

use crate::image::Image;
use crate::qmp::{Qmp, QmpError};

/// The QEMU binary (override with `$WAYSIDE_QEMU`).
pub fn qemu_binary() -> String {
    std::env::var("WAYSIDE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// How long a live migration may run before it is cancelled and the source resumed
/// (a guest dirtying memory faster than the link carries it never converges).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the KVM probe may take before KVM counts as broken (nested KVM hangs).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest address, gateway and host alias of QEMU's user-mode network.
pub const USER_NET_GUEST: Ipv4Cidr = Ipv4Cidr { addr: Ipv4Addr::new(10, 0, 2, 15), prefix_len: 24 };
pub const USER_NET_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// A fixed MAC, so a migration destination has the same device as its source.
pub const GUEST_MAC: &str = "52:54:00:77:00:01";

/// The guest's MAC. On user-mode networking every guest is alone on its own network, so
/// one fixed MAC serves. On a tap, guests share a bridge and must differ: the MAC is made
/// from the guest's IPv4 address (`52:54:` + its four bytes), so it is unique on the
/// bridge and a migration destination (same address) gets its source's MAC.
pub fn guest_mac(net: &Net, ip: Option<Ipv4Addr>) -> String {
    match (net, ip) {
        (Net::Tap { .. }, Some(ip)) => {
            let [a, b, c, d] = ip.octets();
            format!("52:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
        }
        _ => GUEST_MAC.to_string(),
    }
}

/// Errors running or controlling a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start {qemu}: {source} (install the qemu-system-x86 package)")]
    NoQemu { qemu: String, source: std::io::Error },
    #[error("QEMU exited ({status}) before the NMS served; last lines of {log}:\n{tail}")]
    Exited { status: String, log: PathBuf, tail: String },
    #[error("the NMS at {endpoint} did not answer its health check within {ms} ms; last lines of {log}:\n{tail}")]
    NotServing { endpoint: String, ms: u128, log: PathBuf, tail: String },
    #[error("no VM state in {dir} ({reason}); start one with `unikernel run`")]
    NoState { dir: PathBuf, reason: String },
    #[error("migration {status}: {detail}")]
    Migration { status: String, detail: String },
    #[error("bad option: {0}")]
    BadOption(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io { path: path.to_path_buf(), source }
}

/// CPU virtualisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if the probe shows it works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// `-M microvm`: no PCI, no firmware tables beyond ACPI, virtio-mmio devices.
    Microvm,
    /// `-M q35` with virtio-net-pci, for QEMU builds without microvm.
    Q35,
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// QEMU user-mode networking: the guest is 10.0.2.15, the host is 10.0.2.2 (host
    /// loopback), and host `host_port` on 127.0.0.1 forwards to the NMS port.
    User { host_port: u16 },
    /// A host tap device (created by the caller); the guest's address comes from
    /// `--ip`/`--gw`, and the NMS is reached at that address directly.
    Tap { ifname: String },
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub image: Image,
    pub state_dir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub machine: Machine,
    pub net: Net,
    pub boot: BootParams,
    /// Start as a migration destination listening here (`-incoming tcp:...`).
    pub incoming: Option<SocketAddr>,
    /// The cluster token the guest's NMS requires on admin and migration calls: handed to
    /// the guest through QEMU's fw_cfg from a 0600 file in the state folder (never on the
    /// command line, which anyone on the host may read); [`Vm::stop`] presents it.
    pub cluster_token: Option<ClusterToken>,
    /// The guest NMS's TLS files (host paths; certificate, key and the road's CA, all
    /// three): copied into the state folder (the key 0600) and handed to the guest through
    /// fw_cfg; the NMS then serves TLS only and dials the PSS with its certificate, and this
    /// side's health checks and stop dial it trusting the CA.
    pub tls: Option<TlsFiles>,
}

/// The file in a VM's state folder that holds its cluster token (mode 0600).
const TOKEN_FILE: &str = "cluster_token";

/// The files in a VM's state folder that hold its TLS certificate, key (0600) and CA, in
/// the order of [`FW_CFG_TLS`].
const TLS_FILES: [&str; 3] = ["tls_cert.pem", "tls_key.pem", "tls_ca.pem"];

/// `vm.json` in the state folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub qemu_log: PathBuf,
    /// Where the NMS answers, seen from the host (`http://127.0.0.1:PORT`).
    pub nms_endpoint: String,
    pub accel: Accel,
    pub machine: Machine,
    pub net: Net,
    pub memory_mib: u32,
    pub cpus: u32,
    pub image_dir: PathBuf,
    pub cmdline: String,
    pub argv: Vec<String>,
    /// The file holding the guest NMS's cluster token, if it has one.
    #[serde(default)]
    pub cluster_token_file: Option<PathBuf>,
    /// The road's CA the guest NMS's certificate is checked against, when it serves TLS
    /// (`nms_endpoint` is then `https://`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

/// Runs the accelerator probe: boots `kernel` with no initramfs and `panic=-1`, so a
/// working guest panics ("VFS: Unable to mount root fs") and, with `-no-reboot`, QEMU
/// exits. That takes well under a second with a working KVM. On these machines nested
/// KVM either hangs in the kernel's early boot or QEMU aborts setting MSRs; a tiny
/// real-mode test program runs fine there, so the probe has to boot a real kernel.
pub fn probe_accel(accel: &str, kernel: &Path, timeout: Duration) -> bool {
    let Ok(dir) = tempfile::tempdir() else { return false };
    let serial = dir.path().join("probe-serial.log");
    let mut cmd = Command::new(qemu_binary());
    cmd.args(["-M", "microvm", "-accel", accel]);
    if accel == "kvm" {
        cmd.args(["-cpu", "host"]);
    }
    let child = cmd
        .args(["-m", "128", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 quiet", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&serial).unwrap_or_default();
                return status.success() && log.contains("Kernel panic");
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Resolves `Auto`: KVM when `/dev/kvm` exists and the probe boots `kernel` with it, else TCG.
pub fn choose_accel(accel: Accel, kernel: &Path) -> Accel {
    match accel {
        Accel::Auto
            if Path::new("/dev/kvm").exists() && probe_accel("kvm", kernel, KVM_PROBE_TIMEOUT) =>
        {
            Accel::Kvm
        }
        Accel::Auto => Accel::Tcg,
        other => other,
    }
}

/// The host's CPU clock in kHz (from /proc/cpuinfo, host side), or 2 GHz if unknown.
pub fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .filter(|mhz| *mhz > 100.0 && *mhz < 10_000.0)
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it, release it). QEMU's hostfwd and
/// -incoming need a number; the tiny race with another process is acceptable here.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The QEMU command line (without the binary) and the kernel command line.
pub fn qemu_args(opts: &VmOptions, accel: Accel) -> Result<(Vec<String>, String), VmError> {
    let mut boot = opts.boot.clone();
    if let Net::User { host_port } = opts.net {
        // User-mode networking fixes the guest's addresses, and vehicles reach the NMS
        // at the host's forwarded port.
        boot.ip.get_or_insert(USER_NET_GUEST);
        boot.gateway.get_or_insert(USER_NET_HOST);
        if boot.advertise.is_none() {
            boot.advertise =
                wayside_proto::types::Endpoint::parse(&format!("127.0.0.1:{host_port}")).ok();
        }
    }
    if let (Net::Tap { .. }, Some(ip), None) = (&opts.net, boot.ip, &boot.advertise) {
        // On a tap the guest's own address is reachable from the host and from the other
        // guests on the bridge; the NMS must not advertise its wildcard listen address,
        // which would go into the PSS as the owner and into redirects.
        boot.advertise =
            wayside_proto::types::Endpoint::parse(&format!("{}:{}", ip.addr, boot.listen.port()))
                .ok();
    }
    if boot.pss.is_empty() && opts.image.manifest.nms_config.is_none() {
        return Err(VmError::BadOption(
            "the NMS needs PSS endpoints: give --pss HOST:PORT[,HOST:PORT] (to build or run)"
                .into(),
        ));
    }
    if boot.ip.is_none() {
        return Err(VmError::BadOption("the guest needs an address (--ip ADDRESS/PREFIX)".into()));
    }
    if let Net::Tap { ifname } = &opts.net {
        // As root, QEMU would create a missing tap itself, attached to nothing: the guest
        // would boot unreachable. Refuse that here, with what to do.
        if ifname.is_empty() || !Path::new("/sys/class/net").join(ifname).exists() {
            return Err(VmError::BadOption(format!(
                "tap device {ifname:?} does not exist: create it (ip tuntap add dev {ifname} mode tap) \
                 and attach it to the bridge the host side uses (ip link set {ifname} master BRIDGE up)"
            )));
        }
    }
    // The guest reads the token from fw_cfg only when told to (its driver is loaded on
    // demand), and refuses to boot if told and it is missing.
    boot.token_from_fw_cfg = opts.cluster_token.is_some();
    boot.tls_from_fw_cfg = opts.tls.is_some();
    let mut cmdline = format!("{} {}", opts.image.manifest.kernel_args, boot.render());
    if accel == Accel::Tcg {
        // Under TCG on a busy host the kernel's TSC calibration against the PIT fails and
        // the boot then stalls for minutes in the delay-loop calibration (seen here).
        // TCG's guest TSC is the host's, so tell the guest the host's rate.
        cmdline.push_str(&format!(" tsc_early_khz={}", host_tsc_khz()));
    }
    // Whatever the guest is told must also parse in the guest, as given.
    boot.check_words().map_err(|e| VmError::BadOption(e.to_string()))?;
    BootParams::parse(&cmdline).map_err(|e| VmError::BadOption(e.to_string()))?;
    let s = |p: &Path| p.display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| x.to_string()));
    let (machine, nic) = match opts.machine {
        Machine::Microvm => ("microvm", "virtio-net-device"),
        Machine::Q35 => ("q35", "virtio-net-pci"),
    };
    push(&["-M", machine, "-accel", if accel == Accel::Kvm { "kvm" } else { "tcg" }]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &opts.memory_mib.to_string(), "-smp", &opts.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    push(&["-kernel", &s(&opts.image.kernel_path()), "-initrd", &s(&opts.image.initramfs_path())]);
    push(&["-append", &cmdline]);
    push(&["-serial", &format!("file:{}", s(&opts.state_dir.join("serial.log")))]);
    let netdev = match &opts.net {
        Net::User { host_port } => {
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{host_port}-:{}", boot.listen.port())
        }
        Net::Tap { ifname } => format!("tap,id=n0,ifname={ifname},script=no,downscript=no"),
    };
    let mac = guest_mac(&opts.net, boot.ip.map(|c| c.addr));
    push(&["-netdev", &netdev, "-device", &format!("{nic},netdev=n0,mac={mac}")]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", s(&opts.state_dir.join("qmp.sock")))]);
    if let Some(addr) = opts.incoming {
        push(&["-incoming", &format!("tcp:{addr}")]);
    }
    if opts.cluster_token.is_some() {
        // (QEMU's option syntax: a comma in a value is written twice.)
        let file = s(&opts.state_dir.join(TOKEN_FILE)).replace(',', ",,");
        push(&["-fw_cfg", &format!("name={FW_CFG_CLUSTER_TOKEN},file={file}")]);
    }
    if opts.tls.is_some() {
        for (item, name) in FW_CFG_TLS.iter().zip(TLS_FILES) {
            let file = s(&opts.state_dir.join(name)).replace(',', ",,");
            push(&["-fw_cfg", &format!("name={item},file={file}")]);
        }
    }
    Ok((a, cmdline))
}

/// A VM started by this process (killed on drop unless detached) or found via its state.
pub struct Vm {
    pub state: VmState,
    pub state_dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Tail of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text =
        std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The result of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub qemu_status: String,
    pub running: bool,
    pub nms_serving: bool,
    pub nms_endpoint: String,
    pub accel: Accel,
    pub pid: u32,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopOutcome {
    /// The NMS accepted `NmsAdmin.Shutdown`, flushed and powered the VM off.
    Clean,
    /// QEMU was told to quit over QMP (the guest did not power off in time, or `force`).
    Forced,
    /// QEMU was not running any more.
    AlreadyStopped,
}

/// QEMU live-migration figures (from `query-migrate`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Wall time of `unikernel migrate` from its start (starting the destination included)
    /// to the destination's NMS answering health checks (the source's exit not included).
    pub wall_ms: u128,
    /// QEMU's `total-time` (migration start to completion).
    pub total_ms: u64,
    /// QEMU's `downtime`: how long the guest was stopped.
    pub downtime_ms: u64,
    pub setup_ms: u64,
    pub ram_transferred_bytes: u64,
    pub ram_total_bytes: u64,
    /// Time from migration completion until the NMS answered health checks on the destination.
    pub serving_after_ms: u128,
}

impl Vm {
    /// Starts QEMU for `opts` and returns once its QMP socket answers. `detach` leaves
    /// QEMU running when this `Vm` is dropped (the CLI's `run`).
    pub async fn launch(opts: &VmOptions, detach: bool) -> Result<Vm, VmError> {
        Self::launch_with(opts, detach, detach).await
    }

    /// [`Vm::launch`], with QEMU in a process group of its own (`own_group`) also when it
    /// is not detached: a terminal's ctrl-C then reaches only the caller, which stops the
    /// VM cleanly (the NMS drains its write-back) instead of QEMU quitting at once. (A
    /// test's QEMU stays in the test's group, so a ctrl-C of the test run ends it too.)
    pub async fn launch_with(
        opts: &VmOptions,
        detach: bool,
        own_group: bool,
    ) -> Result<Vm, VmError> {
        // A QEMU still running on this state folder would lose its control socket and its
        // state to this one, and could no longer be stopped.
        if let Ok(mut old) = Vm::attach(&opts.state_dir) {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", old.state.pid));
            if old.is_alive() && comm.is_ok_and(|c| c.starts_with("qemu")) {
                return Err(VmError::BadOption(format!(
                    "a VM (QEMU pid {}) still runs on the state folder {}: stop it first \
                     (`unikernel stop`), or give another folder",
                    old.state.pid,
                    opts.state_dir.display()
                )));
            }
        }
        std::fs::create_dir_all(&opts.state_dir).map_err(io(&opts.state_dir))?;
        let accel = choose_accel(opts.accel, &opts.image.kernel_path());
        let (argv, cmdline) = qemu_args(opts, accel)?;
        let qmp_socket = opts.state_dir.join("qmp.sock");
        let serial_log = opts.state_dir.join("serial.log");
        let qemu_log = opts.state_dir.join("qemu.log");
        for p in [&qmp_socket, &serial_log] {
            let _ = std::fs::remove_file(p);
        }
        let token_file = opts.state_dir.join(TOKEN_FILE);
        let _ = std::fs::remove_file(&token_file);
        if let Some(t) = &opts.cluster_token {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&token_file)
                .map_err(io(&token_file))?;
            f.write_all(String::from(t.clone()).as_bytes()).map_err(io(&token_file))?;
        }
        // Copies a previous launch left (a relaunch without TLS keeps no key here).
        for name in TLS_FILES {
            let stale = opts.state_dir.join(name);
            let given = opts.tls.as_ref().is_some_and(|t| {
                [&t.cert, &t.key, &t.ca].iter().any(|p| p.as_deref() == Some(stale.as_path()))
            });
            if !given {
                let _ = std::fs::remove_file(&stale);
            }
        }
        let tls_ca_file = match &opts.tls {
            Some(files) => {
                let (Some(cert), Some(key), Some(ca)) = (&files.cert, &files.key, &files.ca) else {
                    return Err(VmError::BadOption(
                        "a VM's TLS needs all of tls.cert, tls.key and tls.ca".into(),
                    ));
                };
                // Checked here, so a bad file is named now rather than by a failed boot.
                Tls::load(files).map_err(|e| VmError::BadOption(e.to_string()))?;
                for (src, name) in [cert, key, ca].into_iter().zip(TLS_FILES) {
                    let dst = opts.state_dir.join(name);
                    if src != &dst {
                        let bytes = std::fs::read(src).map_err(io(src))?;
                        wayside_proto::tls::pki::write_private(&dst, &bytes).map_err(io(&dst))?;
                    }
                }
                Some(opts.state_dir.join(TLS_FILES[2]))
            }
            None => None,
        };
        let log = std::fs::File::create(&qemu_log).map_err(io(&qemu_log))?;
        let log2 = log.try_clone().map_err(io(&qemu_log))?;
        let qemu = qemu_binary();
        let mut cmd = Command::new(&qemu);
        cmd.args(&argv).stdin(Stdio::null()).stdout(log).stderr(log2);
        if own_group {
            use std::os::unix::process::CommandExt as _;
            // Its own process group: a terminal's ctrl-C to `unikernel run` must not kill it.
            cmd.process_group(0);
        }
        if !detach {
            use std::os::unix::process::CommandExt as _;
            // A VM this process owns dies with it (SIGKILLed, or exiting without dropping
            // the handle), not left running unowned. The signal follows the spawning
            // thread: tokio's workers live as long as their runtime, which owns the VM.
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| VmError::NoQemu { qemu: qemu.clone(), source })?;
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        let nms_endpoint = match &opts.net {
            Net::User { host_port } => format!("{scheme}://127.0.0.1:{host_port}"),
            Net::Tap { .. } => {
                let ip = opts.boot.ip.map(|c| c.addr).unwrap_or(Ipv4Addr::UNSPECIFIED);
                format!("{scheme}://{ip}:{}", opts.boot.listen.port())
            }
        };
        let state = VmState {
            pid: child.id(),
            qmp_socket,
            serial_log,
            qemu_log,
            nms_endpoint,
            accel,
            machine: opts.machine,
            net: opts.net.clone(),
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            image_dir: opts.image.dir.clone(),
            cmdline,
            argv,
            cluster_token_file: opts.cluster_token.is_some().then_some(token_file),
            tls_ca_file,
        };
        let mut vm = Vm { state, state_dir: opts.state_dir.clone(), child: Some(child) };
        let json = serde_json::to_string_pretty(&vm.state).expect("state serializes");
        let path = opts.state_dir.join("vm.json");
        std::fs::write(&path, json).map_err(io(&path))?;
        // QEMU creates the QMP socket early; wait for it (or for QEMU to die).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            vm.check_alive()?;
            if vm.state.qmp_socket.exists() && Qmp::connect(&vm.state.qmp_socket).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(VmError::Exited {
                    status: "no QMP socket within 20 s".into(),
                    log: vm.state.qemu_log.clone(),
                    tail: log_tail(&vm.state.qemu_log, 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if detach {
            // Dropping the handle must not kill it; the pid is in vm.json.
            vm.child = None;
        }
        Ok(vm)
    }

    /// Finds a VM by its state folder.
    pub fn attach(state_dir: &Path) -> Result<Vm, VmError> {
        let path = state_dir.join("vm.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| VmError::NoState { dir: state_dir.into(), reason: e.to_string() })?;
        let state: VmState = serde_json::from_str(&text)
            .map_err(|e| VmError::NoState { dir: state_dir.into(), reason: e.to_string() })?;
        Ok(Vm { state, state_dir: state_dir.into(), child: None })
    }

    /// Leaves QEMU running when this handle is dropped (while this process lives: a VM
    /// launched owned, not detached, still dies with the process, by PR_SET_PDEATHSIG).
    pub fn detach(&mut self) {
        self.child = None;
    }

    /// Whether the QEMU process still exists.
    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => {
                let pid = libc::pid_t::try_from(self.state.pid).unwrap_or(0);
                // SAFETY: signal 0 only checks that the process exists.
                pid > 0 && unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(self.state.pid)
            }
        }
    }

    fn check_alive(&mut self) -> Result<(), VmError> {
        let status = match &mut self.child {
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                _ => None,
            },
            // A detached QEMU (not our child): gone is all there is to know.
            None => (!self.is_alive()).then(|| "exited (detached: no status)".to_owned()),
        };
        if let Some(status) = status {
            return Err(VmError::Exited {
                status,
                log: self.state.qemu_log.clone(),
                tail: format!(
                    "{}\n--- serial ---\n{}",
                    log_tail(&self.state.qemu_log, 10),
                    log_tail(&self.state.serial_log, 20)
                ),
            });
        }
        Ok(())
    }

    pub async fn qmp(&self) -> Result<Qmp, VmError> {
        Ok(Qmp::connect(&self.state.qmp_socket).await?)
    }

    /// Polls the NMS's gRPC health check until it answers SERVING; returns the time waited.
    pub async fn wait_serving(&mut self, limit: Duration) -> Result<Duration, VmError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let tls = self.tls()?;
            if health_check(&self.state.nms_endpoint, tls.as_ref(), Duration::from_millis(500))
                .await
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err(VmError::NotServing {
                    endpoint: self.state.nms_endpoint.clone(),
                    ms: limit.as_millis(),
                    log: self.state.serial_log.clone(),
                    tail: log_tail(&self.state.serial_log, 30),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&mut self) -> Result<VmStatus, VmError> {
        if !self.is_alive() {
            return Err(VmError::NoState {
                dir: self.state_dir.clone(),
                reason: "QEMU is not running".into(),
            });
        }
        let (running, qemu_status) = self.qmp().await?.status().await?;
        Ok(VmStatus {
            qemu_status,
            running,
            nms_serving: health_check(
                &self.state.nms_endpoint,
                self.tls()?.as_ref(),
                Duration::from_secs(2),
            )
            .await,
            nms_endpoint: self.state.nms_endpoint.clone(),
            accel: self.state.accel,
            pid: self.state.pid,
        })
    }

    /// Waits up to `limit` for QEMU to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.is_alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !self.is_alive()
    }

    /// What this side dials the guest's NMS with, when the NMS serves TLS: the road's CA
    /// and the VM's own certificate from the state folder (the guest's NMS takes admin
    /// calls, such as `stop`'s shutdown, only from callers presenting a road certificate).
    pub fn tls(&self) -> Result<Option<Tls>, VmError> {
        let Some(files) = self.tls_files() else { return Ok(None) };
        Tls::load(&files).map_err(|e| VmError::BadOption(e.to_string()))
    }

    /// The guest's TLS files in the state folder (what a migration's destination gets).
    fn tls_files(&self) -> Option<TlsFiles> {
        self.state.tls_ca_file.as_ref()?;
        let f = |i: usize| Some(self.state_dir.join(TLS_FILES[i]));
        Some(TlsFiles { cert: f(0), key: f(1), ca: f(2) })
    }

    /// The cluster token the guest's NMS was booted with (from its state folder).
    pub fn cluster_token(&self) -> Result<Option<ClusterToken>, VmError> {
        let Some(path) = &self.state.cluster_token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        ClusterToken::new(text)
            .map(Some)
            .map_err(|e| VmError::BadOption(format!("{}: {e}", path.display())))
    }

    /// Stops the VM: asks the NMS to shut down (it flushes to the PSS and powers off),
    /// waits up to `grace`, then makes QEMU quit over QMP. `force` skips the clean part.
    pub async fn stop(&mut self, grace: Duration, force: bool) -> Result<StopOutcome, VmError> {
        if !self.is_alive() {
            return Ok(StopOutcome::AlreadyStopped);
        }
        if !force
            && request_shutdown(
                &self.state.nms_endpoint,
                self.cluster_token()?.as_ref(),
                self.tls()?.as_ref(),
                grace,
            )
            .await
            && self.wait_exit(grace).await
        {
            return Ok(StopOutcome::Clean);
        }
        match self.qmp().await {
            Ok(mut qmp) => match qmp.execute("quit", None).await {
                Ok(_) | Err(QmpError::Closed) => {}
                Err(e) => return Err(e.into()),
            },
            Err(_) if !self.is_alive() => return Ok(StopOutcome::Clean),
            Err(e) => return Err(e),
        }
        if !self.wait_exit(Duration::from_secs(10)).await {
            if let Some(c) = &mut self.child {
                let _ = c.kill();
            } else if self.is_alive() && owns_socket(self.state.pid, &self.state.qmp_socket) {
                // A detached QEMU (ours only if its command line names this VM's QMP
                // socket: the pid may have been reused).
                let pid = libc::pid_t::try_from(self.state.pid).unwrap_or(0);
                // SAFETY: sends a signal to a process checked to be this VM's QEMU.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                self.wait_exit(Duration::from_secs(5)).await;
            }
        }
        Ok(StopOutcome::Forced)
    }

    /// Live-migrates this VM to a new QEMU (state in `dest_state_dir`), over TCP on
    /// loopback. With user-mode networking the forwarded host port moves along: the source
    /// gives it up (`hostfwd_remove`) just before the destination starts, so clients keep
    /// one address and simply reconnect. On failure the source keeps running.
    pub async fn migrate(
        &mut self,
        dest_state_dir: &Path,
        dest_net: Option<Net>,
    ) -> Result<(Vm, MigrationReport), VmError> {
        let started = Instant::now();
        let image = Image::open(&self.state.image_dir, false)?;
        let boot = BootParams::parse(&self.state.cmdline)
            .map_err(|e| VmError::BadOption(e.to_string()))?;
        let net = dest_net.unwrap_or_else(|| self.state.net.clone());
        // (Read before the source gives up its forwarded port: a failure here changes nothing.)
        let cluster_token = self.cluster_token()?;
        let mut src = self.qmp().await?;
        if let Net::User { host_port } = &self.state.net {
            if matches!(net, Net::User { host_port: p } if p == *host_port) {
                let out =
                    hmp(&mut src, &format!("hostfwd_remove n0 tcp:127.0.0.1:{host_port}")).await?;
                // QEMU answers "host forwarding rule for ... removed" (or "not found").
                if !out.contains("removed") {
                    return Err(VmError::Migration {
                        status: "not started".into(),
                        detail: format!("hostfwd_remove: {out}"),
                    });
                }
            }
        }
        let port = free_port().map_err(io(dest_state_dir))?;
        let incoming = SocketAddr::from(([127, 0, 0, 1], port));
        let opts = VmOptions {
            image,
            state_dir: dest_state_dir.into(),
            memory_mib: self.state.memory_mib,
            cpus: self.state.cpus,
            // The destination must match the source's accelerator and machine.
            accel: self.state.accel,
            machine: self.state.machine,
            net,
            boot,
            incoming: Some(incoming),
            cluster_token,
            tls: self.tls_files(),
        };
        let mut dest = match Vm::launch(&opts, self.child.is_none()).await {
            Ok(d) => d,
            Err(e) => {
                restore_forward(&mut src, &self.state.net, opts.boot.listen.port()).await;
                return Err(e);
            }
        };
        let limit = MIGRATION_TIMEOUT;
        let deadline = Instant::now() + limit;
        let outcome = async {
            src.execute("migrate", Some(serde_json::json!({ "uri": format!("tcp:{incoming}") })))
                .await?;
            loop {
                if Instant::now() >= deadline {
                    // A migration that never converges: cancelled, and the source resumed,
                    // unless it completed meanwhile (the destination may have run since).
                    let _ = src.execute("migrate_cancel", None).await;
                    let settle = Instant::now() + Duration::from_secs(10);
                    loop {
                        let info = src.execute("query-migrate", None).await?;
                        match info["status"].as_str().unwrap_or("?") {
                            "completed" => return Ok(info),
                            "cancelled" | "failed" => break,
                            _ if Instant::now() >= settle => break,
                            _ => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    return Err(VmError::Migration {
                        status: "timed out".into(),
                        detail: format!("not completed within {} s", limit.as_secs()),
                    });
                }
                let info = src.execute("query-migrate", None).await?;
                match info["status"].as_str().unwrap_or("?") {
                    "completed" => return Ok(info),
                    s @ ("failed" | "cancelled") => {
                        return Err(VmError::Migration {
                            status: s.into(),
                            detail: info["error-desc"].as_str().unwrap_or("").to_string(),
                        })
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        .await;
        let info = match outcome {
            Ok(info) => info,
            Err(e) => {
                let _ = dest.stop(Duration::ZERO, true).await;
                restore_forward(&mut src, &self.state.net, opts.boot.listen.port()).await;
                let _ = src.execute("cont", None).await;
                return Err(e);
            }
        };
        let completed = Instant::now();
        let serving = dest.wait_serving(Duration::from_secs(60)).await;
        // (The move's time ends with the destination serving: the source's exit is not
        // part of it.)
        let wall_ms = started.elapsed().as_millis();
        let serving_after_ms = completed.elapsed().as_millis();
        // The source is paused in "postmigrate"; it has nothing left to do (whether or not
        // the destination serves: it may have run, so the source must not resume).
        let _ = src.execute("quit", None).await;
        self.wait_exit(Duration::from_secs(10)).await;
        if let Err(e) = serving {
            // The migrated VM holds the only copy of the guest now: left running (not
            // killed when `dest` is dropped), for its operator to look at and stop.
            dest.child.take();
            return Err(VmError::Migration {
                status: "completed, but the destination does not serve".into(),
                detail: format!(
                    "{e}; its QEMU (pid {}) is left running with the only copy of the guest: \
                     see {} and stop it with `unikernel stop --state-dir {}`",
                    dest.state.pid,
                    dest.state_dir.display(),
                    dest.state_dir.display()
                ),
            });
        }
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let report = MigrationReport {
            wall_ms,
            total_ms: n(&info["total-time"]),
            downtime_ms: n(&info["downtime"]),
            setup_ms: n(&info["setup-time"]),
            ram_transferred_bytes: n(&info["ram"]["transferred"]),
            ram_total_bytes: n(&info["ram"]["total"]),
            serving_after_ms,
        };
        Ok((dest, report))
    }
}

/// Gives a migration source its forwarded port back after a failed migration.
async fn restore_forward(src: &mut Qmp, net: &Net, guest_port: u16) {
    if let Net::User { host_port } = net {
        let _ = hmp(src, &format!("hostfwd_add n0 tcp:127.0.0.1:{host_port}-:{guest_port}")).await;
    }
}

async fn hmp(qmp: &mut Qmp, command: &str) -> Result<String, VmError> {
    let out = qmp
        .execute("human-monitor-command", Some(serde_json::json!({ "command-line": command })))
        .await?;
    Ok(out.as_str().unwrap_or("").trim().to_string())
}

/// Whether process `pid`'s command line names `qmp_socket` (so it is that VM's QEMU).
fn owns_socket(pid: u32, qmp_socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let wanted = qmp_socket.as_os_str().as_encoded_bytes();
    !wanted.is_empty() && cmdline.windows(wanted.len()).any(|w| w == wanted)
}

fn is_zombie(pid: u32) -> bool {
    // Host side only (the guest never reads /proc while serving).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// A channel to `endpoint` (over TLS with `tls`) whose connect and every call are bounded
/// by `timeout`.
async fn channel(
    endpoint: &str,
    tls: Option<&Tls>,
    timeout: Duration,
) -> Option<tonic::transport::Channel> {
    let ep = wayside_proto::types::Endpoint::parse(endpoint).ok()?;
    wayside_proto::client::endpoint(&ep, tls)
        .ok()?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .ok()
}

/// One gRPC health check (`grpc.health.v1.Health/Check`, whole server) with a timeout.
pub async fn health_check(endpoint: &str, tls: Option<&Tls>, timeout: Duration) -> bool {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let attempt = async {
        let channel = channel(endpoint, tls, timeout).await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .ok()?;
        Some(reply.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(timeout * 2, attempt).await.ok().flatten().unwrap_or(false)
}

/// Asks the NMS to shut down cleanly (`NmsAdmin.Shutdown`), presenting `token`.
pub async fn request_shutdown(
    endpoint: &str,
    token: Option<&ClusterToken>,
    tls: Option<&Tls>,
    timeout: Duration,
) -> bool {
    use wayside_proto::pb::nms_admin_client::NmsAdminClient;
    let attempt = async {
        let channel = channel(endpoint, tls, timeout).await?;
        let req = wayside_proto::token::request(token, wayside_proto::pb::ShutdownRequest {});
        NmsAdminClient::new(channel).shutdown(req).await.ok()
    };
    tokio::time::timeout(timeout * 2, attempt).await.ok().flatten().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lingering detached QEMU is killed only when its command line names this VM's
    /// QMP socket (its recorded pid may belong to another process by now).
    #[test]
    fn a_pid_is_this_vms_qemu_only_if_it_names_the_socket() {
        let me = std::process::id();
        let arg0 = std::env::args_os().next().unwrap();
        assert!(owns_socket(me, Path::new(&arg0)));
        assert!(!owns_socket(me, Path::new("/tmp/no-such-vm/qmp.sock")));
        assert!(!owns_socket(u32::MAX, Path::new(&arg0)), "no such process");
    }
}
