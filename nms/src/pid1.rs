//! PID-1 mode: the NMS as the only program of a VM image (`/init` of the initramfs that
//! `unikernel build` writes).
//!
//! When the kernel starts `nms` as process 1 there is no shell, no `ip`, no `modprobe`, no
//! udev: the binary does their jobs itself, in this order:
//! 1. mounts `/proc` just long enough to read `/proc/cmdline`, then unmounts it again
//!    (nothing reads `/proc` while serving: the OSv constraint);
//! 2. loads the kernel modules listed in [`MODULE_ORDER_FILE`] with `finit_module(2)`;
//!    with `wayside.token=fw_cfg` also QEMU's fw_cfg driver ([`ON_DEMAND_MODULES`]), then
//!    mounts sysfs just long enough to read the cluster token the launcher passed
//!    ([`FW_CFG_CLUSTER_TOKEN`]: missing, the boot fails rather than serve without it);
//! 3. configures `lo` and the network interface (address, netmask, default gateway) with
//!    the classic `SIOCSIF*`/`SIOCADDRT` ioctls;
//! 4. serves (the NMS gRPC server) until `NmsAdmin.Shutdown`, SIGTERM or SIGINT
//!    (ctrl-alt-del) asks it to stop;
//! 5. syncs and powers the VM off (`reboot(RB_POWER_OFF)`). Process 1 must never exit:
//!    the kernel would panic, so every failure path also ends in a power-off.
//!
//! The kernel command line carries the settings as `wayside.KEY=VALUE` words
//! ([`BootParams`]); `unikernel build` renders them with [`BootParams::render`] and checks
//! them with [`BootParams::parse`], the same code the guest runs.

use std::ffi::CString;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use wayside_proto::types::Endpoint;

/// The initramfs file listing the modules to load, one path per line, in load order
/// (dependencies first). Written by `unikernel build`.
pub const MODULE_ORDER_FILE: &str = "/lib/modules/load-order";

/// An optional NMS configuration file (TOML) baked into the image; command-line words
/// override its fields.
pub const CONFIG_FILE: &str = "/etc/wayside/nms.toml";

/// The fw_cfg item a launcher passes the cluster token in (`-fw_cfg
/// name=opt/wayside/cluster_token,file=PATH`): kept out of the kernel command line and the
/// image, which anyone on the host may read; it overrides the baked-in file's token.
pub const FW_CFG_CLUSTER_TOKEN: &str = "opt/wayside/cluster_token";

/// The fw_cfg items a launcher passes the NMS's TLS files in (`wayside.tls=fw_cfg`): its
/// certificate chain, its key and the road's CA (PEM), in that order. Like the token they
/// stay off the command line and out of the image (the key is a secret).
pub const FW_CFG_TLS: [&str; 3] =
    ["opt/wayside/tls_cert", "opt/wayside/tls_key", "opt/wayside/tls_ca"];

/// Where the guest keeps the TLS files it read from fw_cfg (the initramfs's root, in
/// memory); the key file is 0600.
const TLS_DIR: &str = "/run/wayside-tls";

/// Modules in the image that only some boots load (not by the load order): QEMU's fw_cfg
/// driver, for `wayside.token=fw_cfg`, unloaded once the token is read. (Loaded in every
/// boot, guests live-migrated under TCG here arrived with corrupted kernel memory in 3 of
/// ~20 runs, against none of 5 without it.)
pub const ON_DEMAND_MODULES: &[&str] = &["qemu_fw_cfg"];

/// Where Linux's `qemu_fw_cfg` driver shows fw_cfg items by name.
const FW_CFG_SYSFS_BY_NAME: &str = "/sys/firmware/qemu_fw_cfg/by_name";

/// How long to wait for the network interface to appear after its driver is loaded.
pub const NET_DEVICE_WAIT: Duration = Duration::from_secs(10);

/// The prefix of every wayside word on the kernel command line.
pub const PARAM_PREFIX: &str = "wayside.";

/// True when this process is process 1 (the VM's init).
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// An IPv4 address with its prefix length (`10.0.2.15/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// The netmask of the prefix (`/24` -> 255.255.255.0).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits =
            if self.prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix_len)) };
        Ipv4Addr::from(bits)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) =
            s.split_once('/').ok_or("expected ADDRESS/PREFIX, e.g. 10.0.2.15/24")?;
        let addr: Ipv4Addr =
            addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix length {prefix:?} is not 0..=32"))?;
        Ok(Self { addr, prefix_len })
    }
}

/// A bad `wayside.*` word on the kernel command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamError {
    #[error("kernel command line: `{PARAM_PREFIX}{key}={value}`: {reason}")]
    BadValue { key: String, value: String, reason: String },
    #[error("kernel command line: unknown word `{PARAM_PREFIX}{key}` (known: ip, gw, iface, listen, pss, node, advertise, log, token, tls)")]
    UnknownKey { key: String },
    #[error("kernel command line: `{PARAM_PREFIX}{key}` given twice")]
    Duplicate { key: String },
}

/// The NMS's settings from the kernel command line (`wayside.KEY=VALUE` words; every other
/// word belongs to the kernel and is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// `wayside.ip`: the interface's address and prefix; `None` leaves it unconfigured.
    pub ip: Option<Ipv4Cidr>,
    /// `wayside.gw`: the default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// `wayside.iface`: the interface to configure (default `eth0`).
    pub iface: String,
    /// `wayside.listen`: the NMS's gRPC listen address (default `0.0.0.0:7000`).
    pub listen: SocketAddr,
    /// `wayside.pss`: comma-separated PSS endpoints.
    pub pss: Vec<Endpoint>,
    /// `wayside.node`: this NMS's node name.
    pub node: Option<String>,
    /// `wayside.advertise`: the address vehicles and other NMSs reach this NMS at
    /// (recorded in the PSS, sent in redirects); with user-mode networking that is the
    /// host's forwarded port, not the guest's address.
    pub advertise: Option<Endpoint>,
    /// `wayside.log`: the tracing filter (RUST_LOG syntax).
    pub log: Option<String>,
    /// `wayside.token=fw_cfg`: the cluster token is in the fw_cfg item
    /// [`FW_CFG_CLUSTER_TOKEN`] (the token itself never goes on the command line).
    pub token_from_fw_cfg: bool,
    /// `wayside.tls=fw_cfg`: the NMS's TLS files are in the fw_cfg items [`FW_CFG_TLS`]; it
    /// then serves TLS only and dials the PSS and other NMSs over TLS.
    pub tls_from_fw_cfg: bool,
}

impl Default for BootParams {
    fn default() -> Self {
        Self {
            ip: None,
            gateway: None,
            iface: "eth0".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            pss: Vec::new(),
            node: None,
            advertise: None,
            log: None,
            token_from_fw_cfg: false,
            tls_from_fw_cfg: false,
        }
    }
}

impl BootParams {
    /// Parses the `wayside.*` words of a kernel command line.
    pub fn parse(cmdline: &str) -> Result<Self, BootParamError> {
        let mut p = Self::default();
        let mut seen = std::collections::BTreeSet::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix(PARAM_PREFIX) else { continue };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            if !seen.insert(key.to_string()) {
                return Err(BootParamError::Duplicate { key: key.into() });
            }
            let bad = |reason: String| BootParamError::BadValue {
                key: key.into(),
                value: value.into(),
                reason,
            };
            match key {
                "ip" => p.ip = Some(value.parse().map_err(bad)?),
                "gw" => {
                    p.gateway = Some(value.parse().map_err(|_| bad("not an IPv4 address".into()))?)
                }
                "iface" => {
                    // IFNAMSIZ is 16 including the NUL.
                    if value.is_empty() || value.len() > 15 || value.contains('/') {
                        return Err(bad("an interface name is 1..=15 bytes without '/'".into()));
                    }
                    p.iface = value.into();
                }
                "listen" => {
                    p.listen = value.parse().map_err(|_| {
                        bad("expected IP:PORT (an IP literal, e.g. 0.0.0.0:7000)".into())
                    })?
                }
                "pss" => {
                    p.pss = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| Endpoint::parse(s).map_err(|e| bad(e.to_string())))
                        .collect::<Result<_, _>>()?;
                    if p.pss.is_empty() {
                        return Err(bad("at least one PSS endpoint (host:port) is needed".into()));
                    }
                }
                "node" => {
                    if value.is_empty() || value.len() > 64 {
                        return Err(bad("a node name is 1..=64 bytes".into()));
                    }
                    p.node = Some(value.into());
                }
                "advertise" => {
                    p.advertise = Some(Endpoint::parse(value).map_err(|e| bad(e.to_string()))?)
                }
                "log" => p.log = Some(value.into()),
                "token" => {
                    if value != "fw_cfg" {
                        return Err(bad(
                            "the only token source is fw_cfg (the token itself never goes on \
                             the command line)"
                                .into(),
                        ));
                    }
                    p.token_from_fw_cfg = true;
                }
                "tls" => {
                    if value != "fw_cfg" {
                        return Err(bad("the only TLS files source is fw_cfg".into()));
                    }
                    p.tls_from_fw_cfg = true;
                }
                _ => return Err(BootParamError::UnknownKey { key: key.into() }),
            }
        }
        if p.gateway.is_some() && p.ip.is_none() {
            return Err(BootParamError::BadValue {
                key: "gw".into(),
                value: p.gateway.map(|g| g.to_string()).unwrap_or_default(),
                reason: "a gateway needs an address (wayside.ip=ADDRESS/PREFIX)".into(),
            });
        }
        Ok(p)
    }

    /// Renders the `wayside.*` words (the inverse of [`BootParams::parse`]).
    /// Refuses values the command line cannot carry as given: a space (or any blank)
    /// splits a word, so `node "rsu 1"` would boot as node `rsu`, and `node "a init=/x"`
    /// would add a kernel parameter.
    pub fn check_words(&self) -> Result<(), BootParamError> {
        let values = [
            ("iface", Some(&self.iface)),
            ("node", self.node.as_ref()),
            ("log", self.log.as_ref()),
        ];
        for (key, value) in values {
            let Some(value) = value else { continue };
            // (A quote would turn on the kernel's quoting and swallow the words after.)
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c == '"') {
                return Err(BootParamError::BadValue {
                    key: key.into(),
                    value: value.clone(),
                    reason: "must be one word: no spaces or quotes, not empty".into(),
                });
            }
        }
        Ok(())
    }

    pub fn render(&self) -> String {
        let mut words = Vec::new();
        if let Some(ip) = self.ip {
            words.push(format!("{PARAM_PREFIX}ip={ip}"));
        }
        if let Some(gw) = self.gateway {
            words.push(format!("{PARAM_PREFIX}gw={gw}"));
        }
        if self.iface != "eth0" {
            words.push(format!("{PARAM_PREFIX}iface={}", self.iface));
        }
        words.push(format!("{PARAM_PREFIX}listen={}", self.listen));
        if !self.pss.is_empty() {
            let list: Vec<&str> = self.pss.iter().map(|e| e.authority()).collect();
            words.push(format!("{PARAM_PREFIX}pss={}", list.join(",")));
        }
        if let Some(node) = &self.node {
            words.push(format!("{PARAM_PREFIX}node={node}"));
        }
        if let Some(adv) = &self.advertise {
            words.push(format!("{PARAM_PREFIX}advertise={}", adv.authority()));
        }
        if let Some(log) = &self.log {
            words.push(format!("{PARAM_PREFIX}log={log}"));
        }
        if self.token_from_fw_cfg {
            words.push(format!("{PARAM_PREFIX}token=fw_cfg"));
        }
        if self.tls_from_fw_cfg {
            words.push(format!("{PARAM_PREFIX}tls=fw_cfg"));
        }
        words.join(" ")
    }
}

/// The PID-1 path: set the machine up, serve, power off. Never returns.
pub fn main() -> ! {
    let started = Instant::now();
    // Linux resets the machine at once on Ctrl-Alt-Del (QEMU's `sendkey ctrl-alt-delete`)
    // unless process 1 turns that off: then the kernel sends it SIGINT instead, a clean
    // stop (drain, sync, power off).
    // SAFETY: reboot(2) with RB_DISABLE_CAD changes only what that key does.
    if unsafe { libc::reboot(libc::RB_DISABLE_CAD) } != 0 {
        eprintln!(
            "wayside-init: could not turn off ctrl-alt-del's immediate reset: {}",
            std::io::Error::last_os_error()
        );
    }
    // A panic must not end process 1 (the kernel would panic, unsynced): it powers off too.
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| boot_and_serve(started)));
    match &outcome {
        Ok(Ok(())) => eprintln!("wayside-init: stopped cleanly; powering off"),
        Ok(Err(e)) => eprintln!("wayside-init: FATAL: {e:#}; powering off"),
        Err(_) => eprintln!("wayside-init: FATAL: a panic (reported above); powering off"),
    }
    power_off()
}

fn boot_and_serve(started: Instant) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cmdline = read_cmdline().context("reading the kernel command line")?;
    let params = BootParams::parse(&cmdline)?;
    // Telemetry reads RUST_LOG; set it before anything logs. Safe: still single-threaded.
    if let Some(filter) = &params.log {
        unsafe { std::env::set_var("RUST_LOG", filter) };
    }
    wayside_proto::telemetry::init();
    tracing::info!(?params, "wayside-init: starting as process 1");

    let order = Path::new(MODULE_ORDER_FILE);
    load_modules(order, |m| !ON_DEMAND_MODULES.contains(&m))?;
    let (mut token, mut tls) = (None, None);
    if params.token_from_fw_cfg || params.tls_from_fw_cfg {
        load_modules(order, |m| ON_DEMAND_MODULES.contains(&m))?;
        if params.token_from_fw_cfg {
            token = Some(read_fw_cfg_token().context("reading the cluster token from fw_cfg")?);
            tracing::info!("wayside-init: cluster token from fw_cfg {FW_CFG_CLUSTER_TOKEN}");
        }
        if params.tls_from_fw_cfg {
            tls = Some(read_fw_cfg_tls().context("reading the TLS files from fw_cfg")?);
            tracing::info!("wayside-init: TLS files from fw_cfg {}", FW_CFG_TLS.join(", "));
        }
        // Done with the driver: unloaded, the guest runs as one booted without them.
        for m in ON_DEMAND_MODULES {
            if let Err(e) = unload_module(m) {
                tracing::warn!(module = m, error = %e, "could not unload the module");
            }
        }
    }
    net::configure_loopback().context("configuring lo")?;
    if let Some(ip) = params.ip {
        net::wait_for_interface(&params.iface, NET_DEVICE_WAIT)?;
        net::configure_interface(&params.iface, ip, params.gateway)
            .with_context(|| format!("configuring {}", params.iface))?;
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "wayside-init: network up");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(params, token, tls))
}

/// Mounts sysfs, reads the TLS fw_cfg items into files under [`TLS_DIR`] (the key 0600),
/// unmounts sysfs again; returns the `[tls]` section naming them.
fn read_fw_cfg_tls() -> anyhow::Result<wayside_proto::tls::TlsFiles> {
    use anyhow::Context as _;
    std::fs::create_dir_all(TLS_DIR).with_context(|| format!("creating {TLS_DIR}"))?;
    let dir = Path::new(TLS_DIR);
    let files = wayside_proto::tls::TlsFiles {
        cert: Some(dir.join("cert.pem")),
        key: Some(dir.join("key.pem")),
        ca: Some(dir.join("ca.pem")),
    };
    let targets = [&files.cert, &files.key, &files.ca];
    for (item, target) in FW_CFG_TLS.iter().zip(targets) {
        let raw = read_fw_cfg(item, "tls")?;
        let target = target.as_ref().expect("set above");
        wayside_proto::tls::pki::write_private(target, &raw)
            .with_context(|| format!("writing {}", target.display()))?;
    }
    // Checked here, so a bad file fails the boot naming the item, not the first call.
    wayside_proto::tls::Tls::load(&files).context("the TLS files from fw_cfg")?;
    Ok(files)
}

/// Mounts sysfs, reads the cluster token fw_cfg item, unmounts sysfs again.
fn read_fw_cfg_token() -> anyhow::Result<wayside_proto::token::ClusterToken> {
    parse_token(&read_fw_cfg(FW_CFG_CLUSTER_TOKEN, "token")?)
}

/// Mounts sysfs, reads the fw_cfg item `item` (asked for by the word `wayside.{word}=fw_cfg`),
/// unmounts sysfs again.
fn read_fw_cfg(item: &str, word: &str) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let path = format!("{FW_CFG_SYSFS_BY_NAME}/{item}/raw");
    read_mounted("sysfs", "/sys", &path)?.with_context(|| {
        format!("reading {path} ({PARAM_PREFIX}{word}=fw_cfg: did the launcher pass -fw_cfg name={item},file=...?)")
    })
}

/// A token as a launcher's file holds it (a trailing newline allowed).
fn parse_token(raw: &[u8]) -> anyhow::Result<wayside_proto::token::ClusterToken> {
    let text = std::str::from_utf8(raw).map_err(|_| anyhow::anyhow!("not UTF-8"))?;
    wayside_proto::token::ClusterToken::new(text.trim_end_matches(['\n', '\r']))
        .map_err(anyhow::Error::msg)
}

/// Mounts `/proc`, reads the command line, unmounts `/proc` again.
fn read_cmdline() -> anyhow::Result<String> {
    use anyhow::Context as _;
    let bytes = read_mounted("proc", "/proc", "/proc/cmdline")?.context("reading /proc/cmdline")?;
    String::from_utf8(bytes).context("the kernel command line is not UTF-8")
}

/// Mounts a `fstype` file system on `dir` just long enough to read `path`, then unmounts it
/// again (nothing reads `/proc` or `/sys` while serving). The outer error is the mount's.
fn read_mounted(fstype: &str, dir: &str, path: &str) -> anyhow::Result<std::io::Result<Vec<u8>>> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    mount(fstype, dir, fstype)?;
    let read = std::fs::read(path);
    let umount = CString::new(dir).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(umount.as_ptr(), libc::MNT_DETACH) };
    Ok(read)
}

fn mount(source: &str, target: &str, fstype: &str) -> anyhow::Result<()> {
    let (s, t, f) = (CString::new(source)?, CString::new(target)?, CString::new(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        anyhow::bail!("mount {fstype} on {target}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `MODULE_INIT_COMPRESSED_FILE`: lets a kernel built with module decompression load
/// `.ko.xz`/`.ko.zst` files directly.
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

/// Loads the modules listed in `order_file` whose names `wanted` accepts, in order. A
/// module the kernel already has (built in or loaded) is fine.
pub fn load_modules(order_file: &Path, wanted: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let list = match std::fs::read_to_string(order_file) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", order_file.display())),
    };
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !wanted(module_name(path)) {
            continue;
        }
        let file = std::fs::File::open(path).with_context(|| format!("opening module {path}"))?;
        let flags = if path.ends_with(".ko") { 0 } else { MODULE_INIT_COMPRESSED_FILE };
        use std::os::fd::AsRawFd as _;
        // SAFETY: finit_module(fd, params, flags) with a valid fd and an empty C string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), flags) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                anyhow::bail!("loading module {path}: {err}");
            }
        }
        tracing::debug!(module = path, "module loaded");
    }
    Ok(())
}

/// Unloads module `name` (`delete_module(2)`, not waiting for users).
fn unload_module(name: &str) -> std::io::Result<()> {
    let c = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: delete_module(name, flags) with a valid NUL-terminated name.
    let rc = unsafe { libc::syscall(libc::SYS_delete_module, c.as_ptr(), libc::O_NONBLOCK) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A module's name from its file's path (`.../qemu_fw_cfg.ko.xz` -> `qemu_fw_cfg`).
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    let name = file.split_once(".ko").map_or(file, |(name, _)| name);
    // The image numbers its modules in load order (`04-qemu_fw_cfg.ko`): not part of
    // the name (with it, the fw_cfg driver matched no on-demand name and loaded at every
    // boot).
    match name.split_once('-') {
        Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => name,
    }
}

/// Serves until a shutdown request, SIGTERM or SIGINT.
async fn serve(
    params: BootParams,
    token: Option<wayside_proto::token::ClusterToken>,
    tls: Option<wayside_proto::tls::TlsFiles>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(params.listen)
        .await
        .with_context(|| format!("binding {}", params.listen))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let signals = {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT (ctrl-alt-del): shutting down"),
                _ = shutdown.cancelled() => {}
            }
            shutdown.cancel();
        }
    };
    let server = run_server(&params, token, tls, listener, shutdown.clone());
    tracing::info!(listen = %params.listen, "wayside-init: serving");
    let (result, ()) = tokio::join!(
        async {
            let r = server.await;
            shutdown.cancel();
            r
        },
        signals
    );
    result
}

/// The NMS server (`crate::server::run`), configured from the baked-in file and the
/// command line.
async fn run_server(
    params: &BootParams,
    token: Option<wayside_proto::token::ClusterToken>,
    tls: Option<wayside_proto::tls::TlsFiles>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut config = nms_config(params)?;
    if token.is_some() {
        config.cluster_token = token;
    }
    if let Some(tls) = tls {
        config.tls = tls;
    }
    crate::server::run(config, listener, shutdown).await
}

/// The NMS configuration: the baked-in file (if any), overridden by the command line.
fn nms_config(params: &BootParams) -> anyhow::Result<crate::config::Config> {
    let file = Path::new(CONFIG_FILE);
    let mut config: crate::config::Config =
        wayside_proto::config::load(file.exists().then_some(file))?;
    // No block pool unless the baked-in file asks for one: filling it writes guest memory
    // right after boot, and guests that QEMU live-migrated meanwhile (TCG here) arrived
    // crashed (kernel panics in the page allocator and network buffers); an RSU that
    // wants it sets `block_pool_bytes` (and backs guest memory up front, `-mem-prealloc`).
    if !sets_block_pool(file) {
        config.block_pool_bytes = 0;
    }
    config.listen = params.listen.to_string();
    if let Some(node) = &params.node {
        config.node_id = node.clone();
    }
    if let Some(adv) = &params.advertise {
        config.advertise = adv.authority().to_string();
    }
    if !params.pss.is_empty() {
        config.pss = params.pss.iter().map(|e| e.authority().to_string()).collect();
    }
    Ok(config)
}

/// Whether the baked-in configuration file names `block_pool_bytes`.
fn sets_block_pool(file: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Pool {
        block_pool_bytes: Option<u64>,
    }
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| wayside_proto::config::parse::<Pool>(&t).ok())
        .is_some_and(|p| p.block_pool_bytes.is_some())
}

/// Syncs and powers the VM off (process 1 must never exit).
pub(crate) fn power_off() -> ! {
    // SAFETY: plain syscalls; process 1 may call reboot(2).
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
        // Power-off failed (no ACPI): a reboot makes QEMU (-no-reboot) exit instead.
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Process 1 must not exit; nothing is left to do.
    loop {
        std::thread::park();
    }
}

/// Interface configuration with the classic ioctls (no netlink, no `ip` binary).
mod net {
    use super::Ipv4Cidr;
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    struct Socket(libc::c_int);
    impl Drop for Socket {
        fn drop(&mut self) {
            // SAFETY: closing our own fd.
            unsafe { libc::close(self.0) };
        }
    }

    fn socket() -> std::io::Result<Socket> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *dst = src as libc::c_char;
        }
        req
    }

    fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }

    fn ioctl<T>(
        sock: &Socket,
        request: libc::Ioctl,
        arg: &mut T,
        what: &str,
    ) -> std::io::Result<()> {
        // SAFETY: `arg` is the structure this request expects.
        let rc = unsafe { libc::ioctl(sock.0, request, arg as *mut T) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }

    fn set_addr(sock: &Socket, iface: &str, cidr: Ipv4Cidr) -> std::io::Result<()> {
        let mut req = ifreq(iface);
        req.ifr_ifru.ifru_addr = sockaddr(cidr.addr);
        ioctl(sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
        let mut req = ifreq(iface);
        req.ifr_ifru.ifru_netmask = sockaddr(cidr.netmask());
        ioctl(sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")
    }

    fn set_up(sock: &Socket, iface: &str) -> std::io::Result<()> {
        let mut req = ifreq(iface);
        ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ioctl(sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
    }

    pub fn configure_loopback() -> std::io::Result<()> {
        let sock = socket()?;
        set_addr(&sock, "lo", Ipv4Cidr { addr: Ipv4Addr::LOCALHOST, prefix_len: 8 })?;
        set_up(&sock, "lo")
    }

    pub fn wait_for_interface(iface: &str, limit: Duration) -> anyhow::Result<()> {
        let sock = socket()?;
        let deadline = Instant::now() + limit;
        loop {
            let mut req = ifreq(iface);
            if ioctl(&sock, libc::SIOCGIFINDEX, &mut req, "SIOCGIFINDEX").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "network interface {iface} did not appear within {} ms (is the virtio-net driver in the image and a virtio-net device attached?)",
                    limit.as_millis()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn configure_interface(
        iface: &str,
        cidr: Ipv4Cidr,
        gateway: Option<Ipv4Addr>,
    ) -> std::io::Result<()> {
        let sock = socket()?;
        set_addr(&sock, iface, cidr)?;
        set_up(&sock, iface)?;
        if let Some(gw) = gateway {
            // SAFETY: rtentry is plain old data; all-zero is valid.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr(gw);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            ioctl(&sock, libc::SIOCADDRT, &mut rt, "SIOCADDRT (default route)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_word_names_its_source_never_the_token() {
        let p = BootParams::parse("wayside.token=fw_cfg wayside.tls=fw_cfg").unwrap();
        assert!(p.token_from_fw_cfg && p.tls_from_fw_cfg);
        assert_eq!(BootParams::parse(&p.render()).unwrap(), p);
        let e = BootParams::parse("wayside.tls=/etc/key.pem").unwrap_err();
        assert!(e.to_string().contains("only TLS files source is fw_cfg"), "{e}");
        assert_eq!(BootParams::parse(&p.render()).unwrap(), p, "renders back");
        assert!(!BootParams::default().render().contains("token"));
        let e = BootParams::parse("wayside.token=0123456789abcdef0").unwrap_err();
        assert!(e.to_string().contains("only token source is fw_cfg"), "{e}");
        assert_eq!(module_name("/lib/modules/x/qemu_fw_cfg.ko.xz"), "qemu_fw_cfg");
        assert_eq!(module_name("virtio_net.ko"), "virtio_net");
        // As the image names them (numbered in load order).
        let spaced = BootParams { node: Some("rsu 1".into()), ..BootParams::default() };
        assert!(
            matches!(spaced.check_words(), Err(BootParamError::BadValue { key, .. }) if key == "node")
        );
        let injected = BootParams { log: Some("info init=/x".into()), ..BootParams::default() };
        assert!(injected.check_words().is_err());
        // A quote turns on the kernel's quoting: the words after it would be swallowed.
        let quoted = BootParams { node: Some("rsu\"1".into()), ..BootParams::default() };
        assert!(quoted.check_words().is_err());
        // A PSS address cannot carry more words either (it is an Endpoint).
        for bad in ["10.0.2.2:5000 panic=0 10.0.2.2:5001", "a\"b:1", "a,b:1", "a\tb:1"] {
            assert!(wayside_proto::types::Endpoint::parse(bad).is_err(), "{bad:?}");
        }
        assert!(wayside_proto::types::Endpoint::parse("10.0.2.2:5000").is_ok());
        assert!(BootParams { node: Some("rsu-1".into()), ..BootParams::default() }
            .check_words()
            .is_ok());
        assert_eq!(module_name("/lib/modules/04-qemu_fw_cfg.ko"), "qemu_fw_cfg");
        assert_eq!(module_name("/lib/modules/12-virtio-net.ko.zst"), "virtio-net");
        assert_eq!(module_name("/lib/modules/v2-x.ko"), "v2-x");
    }

    #[test]
    fn a_fw_cfg_token_is_read_as_its_file_holds_it() {
        let t = "0123456789abcdef-road";
        let want = wayside_proto::token::ClusterToken::new(t).unwrap();
        assert_eq!(parse_token(t.as_bytes()).unwrap(), want);
        assert_eq!(parse_token(format!("{t}\n").as_bytes()).unwrap(), want, "echo > file");
        assert!(parse_token(b"short").unwrap_err().to_string().contains("16 to 256"));
        assert!(parse_token(b"0123456789abcdef \n").is_err(), "no spaces");
        assert!(parse_token(&[0xff; 20]).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn the_image_keeps_no_block_pool_unless_its_file_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("nms.toml");
        assert!(!sets_block_pool(&f), "no file");
        std::fs::write(&f, "cache_capacity_bytes = 1048576\n").unwrap();
        assert!(!sets_block_pool(&f));
        std::fs::write(&f, "block_pool_bytes = 0\n").unwrap();
        assert!(sets_block_pool(&f));
        std::fs::write(&f, "block_pool_bytes = 8388608\nnode_id = \"rsu\"\n").unwrap();
        assert!(sets_block_pool(&f));
    }

    #[test]
    fn parses_and_renders_the_command_line() {
        let line = "console=ttyS0 quiet wayside.ip=10.0.2.15/24 wayside.gw=10.0.2.2 \
                    wayside.listen=0.0.0.0:7000 wayside.pss=10.0.2.2:5000,10.0.2.2:5001 \
                    wayside.node=rsu-1 wayside.advertise=127.0.0.1:7001 panic=-1";
        let p = BootParams::parse(line).unwrap();
        assert_eq!(p.ip, Some(Ipv4Cidr { addr: Ipv4Addr::new(10, 0, 2, 15), prefix_len: 24 }));
        assert_eq!(p.ip.unwrap().netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(p.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(p.pss.len(), 2);
        assert_eq!(p.pss[1].authority(), "10.0.2.2:5001");
        assert_eq!(p.node.as_deref(), Some("rsu-1"));
        assert_eq!(p.advertise.as_ref().map(|e| e.authority()), Some("127.0.0.1:7001"));
        assert_eq!(BootParams::parse(&p.render()).unwrap(), p);
        // No wayside words: the defaults.
        assert_eq!(BootParams::parse("console=ttyS0").unwrap(), BootParams::default());
    }

    #[test]
    fn bad_words_are_named() {
        let cases = [
            ("wayside.ip=10.0.2.300/24", "not an IPv4 address"),
            ("wayside.ip=10.0.2.15", "ADDRESS/PREFIX"),
            ("wayside.ip=10.0.2.15/33", "prefix length"),
            ("wayside.listen=localhost:7000", "IP:PORT"),
            ("wayside.pss=", "at least one"),
            ("wayside.pss=10.0.2.2", "address"),
            ("wayside.gw=10.0.2.2", "needs an address"),
            ("wayside.bogus=1", "unknown word `wayside.bogus`"),
            ("wayside.node=a wayside.node=b", "given twice"),
            ("wayside.iface=a-very-long-interface-name", "1..=15"),
        ];
        for (line, want) in cases {
            let err = BootParams::parse(line).unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn netmask_edges() {
        let c = |p| Ipv4Cidr { addr: Ipv4Addr::UNSPECIFIED, prefix_len: p };
        assert_eq!(c(0).netmask(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(c(32).netmask(), Ipv4Addr::BROADCAST);
        assert_eq!(c(20).netmask(), Ipv4Addr::new(255, 255, 240, 0));
    }
}
