//! Network namespaces for the emulated road: a [`Lab`] creates named namespaces, veth pairs,
//! bridges and `tc tbf` rate shaping, spawns processes inside namespaces, and removes all of
//! it when dropped (children first), also on panic and after Ctrl-C (callers stop on Ctrl-C
//! and drop the lab).
//!
//! Names: every namespace is `ws-<pid>-<lab>-<name>` (`<lab>` counts labs in this process),
//! so parallel tests and leftovers are told apart; [`reap_stale`] removes leftovers of
//! processes that no longer exist (after a SIGKILL nothing else could). Interface names are
//! at most 15 bytes, so host-side ends are `w<pid base36>x<lab><link><side>`.
//!
//! Addresses: each lab takes one private `10.N.0.0/16` that no host interface uses, held
//! with an advisory lock file (`/run/wayside-netns/10.N.lock`) for the lab's life so two
//! labs (in any processes) never share it.
//!
//! Children are spawned with `setns(CLONE_NEWNET)` in `pre_exec` (not `ip netns exec`, which
//! also remounts /sys) and with `PR_SET_PDEATHSIG = SIGKILL`, so a SIGKILLed testbed does not
//! leave servers running. That signal fires when the spawning *thread* exits: spawn from a
//! thread that outlives the child (a tokio worker, the main thread), not a blocking-pool one.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2 (`ip`, `tc`); [`probe`] says
//! whether this machine has them, so tests can SKIP visibly.

use std::fs::File;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command (`ip ...`, `tc ...`) ran and failed: its command line and stderr.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    /// A program could not be started at all.
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    /// Every candidate 10.N.0.0/16 is in use on the host or locked by another lab.
    #[error("no free 10.N.0.0/16 for a lab (10.{first}..=10.{last} all in use or locked)")]
    NoSubnet { first: u8, last: u8 },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

type Result<T> = std::result::Result<T, NetnsError>;

/// The prefix of every namespace this process creates: `ws-<pid>-`.
pub fn process_prefix() -> String {
    format!("ws-{}-", std::process::id())
}

/// Runs a command, returning its stdout; a failure names the command and its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Whether namespaces, veth pairs and `tc tbf` work here; `Err` says why not (for a
/// visible SKIP). The answer is computed once per process.
pub fn probe() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not root (network namespaces need CAP_NET_ADMIN)".into());
            }
            let try_it = || -> Result<()> {
                let mut lab = Lab::new("probe")?;
                let a = lab.namespace("a")?;
                let b = lab.namespace("b")?;
                let l = lab.veth(Some(&a), Some(&b), 30)?;
                lab.tbf(&l.a, &Tbf::new(1_000_000_000, 256 << 10, Duration::from_millis(50)))?;
                Ok(())
            };
            match try_it() {
                Ok(()) => Ok(()),
                // The machine lacks something: a visible SKIP.
                Err(e) if missing_feature(&e.to_string()) => Err(e.to_string()),
                // Anything else is the lab's own fault, which a SKIP would hide.
                Err(e) => panic!("the network lab failed on a machine that has what it needs: {e}"),
            }
        })
        .clone()
}

/// Whether a lab set-up error `why` says the machine lacks a feature (the `ip` or `tc`
/// tool, the permission, the kernel's namespaces, veths or tbf) rather than a fault of
/// the lab's code.
fn missing_feature(why: &str) -> bool {
    [
        "No such file or directory",
        "Operation not permitted",
        "Permission denied",
        "Unknown qdisc",
        "qdisc kind is unknown",
        "Unknown device type",
        "not supported",
        "Not supported",
    ]
    .iter()
    .any(|m| why.contains(m))
}

/// Removes namespaces `ws-<pid>-...` whose process no longer exists (left by a SIGKILLed
/// run), killing what still runs inside them first. Returns the names removed.
pub fn reap_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list_namespaces() {
        if of_dead_process(&name) && remove_namespace(&name) {
            removed.push(name);
        }
    }
    // Their log folders too (they hold the PSS nodes' data: tens of MiB each).
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains("-logs")
                && of_dead_process(&name)
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed.push(name);
            }
        }
    }
    removed
}

/// Whether `name` (`ws-<pid>-...`) was made by a process that no longer exists.
fn of_dead_process(name: &str) -> bool {
    name.strip_prefix("ws-")
        .and_then(|r| r.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Kills what runs in namespace `name`, then deletes it; whether it is gone.
fn remove_namespace(name: &str) -> bool {
    kill_pids_in(name);
    ip(&["netns", "delete", name]).is_ok()
}

/// Every named namespace on the machine (`ip netns list`).
pub fn list_namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn kill_pids_in(ns: &str) {
    for pid in ip(&["netns", "pids", ns]).unwrap_or_default().split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill has no memory preconditions; the pid is inside our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// `tc tbf` rate shaping of one interface's egress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tbf {
    /// Sustained rate, bits per second.
    pub rate_bits_per_s: u64,
    /// Bucket size, bytes: how much may leave at line speed after an idle spell.
    pub burst_bytes: u64,
    /// Longest a packet may wait in the queue before it is dropped.
    pub latency: Duration,
}

impl Tbf {
    pub fn new(rate_bits_per_s: u64, burst_bytes: u64, latency: Duration) -> Self {
        Self { rate_bits_per_s, burst_bytes, latency }
    }

    /// A bucket for `rate`: at least 64 KiB (one GSO segment) and ~2 ms worth of bytes,
    /// so the timer granularity does not cut the rate; the queue may hold 50 ms.
    pub fn for_rate(rate_bits_per_s: u64) -> Self {
        let burst = (rate_bits_per_s / 8 / 500).max(64 << 10);
        Self::new(rate_bits_per_s, burst, Duration::from_millis(50))
    }
}

/// Parses a rate with its unit, as `tc` writes them: `54mbit`, `1gbit`, `250kbit`, `9600bit`
/// (decimal multiples; `/s` allowed). The result is bits per second.
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("/s").unwrap_or(&t);
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix("bit") {
        (n, 1.0)
    } else {
        return Err(format!("{s:?}: give a unit: bit, kbit, mbit or gbit (per second)"));
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?}: not a number before the unit"))?;
    let bits = v * mult;
    if !(bits.is_finite() && (1000.0..=1e12).contains(&bits)) {
        return Err(format!("{s:?}: rate must be between 1kbit and 1000gbit"));
    }
    Ok(bits as u64)
}

/// One namespace of a lab (a name; cheap to clone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ns {
    pub name: String,
}

/// One end of a link: its namespace (`None` = the host's) and interface name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub ns: Option<Ns>,
    pub iface: String,
    pub addr: Ipv4Addr,
}

/// A veth pair with an address on each end.
#[derive(Debug, Clone)]
pub struct Link {
    pub a: End,
    pub b: End,
}

/// A process spawned in a namespace.
struct Spawned {
    what: String,
    child: Child,
    log: PathBuf,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces, links and processes, all removed on drop.
pub struct Lab {
    prefix: String,
    host_tag: String,
    net: u8,
    _net_lock: File,
    namespaces: Vec<String>,
    host_ifaces: Vec<String>,
    children: Vec<Spawned>,
    next_link: u32,
    next_subnet: u32,
    logs: tempfile::TempDir,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("prefix", &self.prefix).field("net", &self.net).finish()
    }
}

fn base36(mut v: u64) -> String {
    const D: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(D[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

/// The second octets a lab may take (10.N.0.0/16).
const NET_FIRST: u8 = 100;
const NET_LAST: u8 = 199;

fn host_uses_net(n: u8) -> bool {
    let text = ip(&["-4", "-o", "addr", "show"]).unwrap_or_default()
        + &ip(&["-4", "route", "show"]).unwrap_or_default();
    let pat = format!("10.{n}.");
    text.split_whitespace().any(|w| w.starts_with(&pat))
}

fn lock_net(n: u8) -> Option<File> {
    let dir = Path::new("/run/wayside-netns");
    std::fs::create_dir_all(dir).ok()?;
    let f = File::create(dir.join(format!("10.{n}.lock"))).ok()?;
    // SAFETY: flock on an fd we own; a non-blocking exclusive lock, released on close.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (r == 0).then_some(f)
}

impl Lab {
    /// A new, empty lab; `tag` becomes part of its prefix (`ws-<pid>-<n><tag>-`).
    pub fn new(tag: &str) -> Result<Self> {
        if tag.is_empty() || tag.len() > 12 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(NetnsError::Invalid {
                what: "lab tag",
                why: format!("{tag:?}: 1 to 12 ASCII letters or digits"),
            });
        }
        let pid = std::process::id();
        let seq = LABS.fetch_add(1, Ordering::Relaxed);
        let span = u32::from(NET_LAST - NET_FIRST) + 1;
        let start = (pid.wrapping_mul(7919).wrapping_add(seq * 31)) % span;
        let mut taken = None;
        for k in 0..span {
            let n = NET_FIRST + ((start + k) % span) as u8;
            if let Some(lock) = lock_net(n) {
                if !host_uses_net(n) {
                    taken = Some((n, lock));
                    break;
                }
            }
        }
        let (net, lock) = taken.ok_or(NetnsError::NoSubnet { first: NET_FIRST, last: NET_LAST })?;
        // A dead process with this pid may have left a lab of this number: its namespaces
        // would collide with ours ("File exists"); nothing of this process has the number.
        let prefix = format!("ws-{pid}-{seq}{tag}-");
        for name in list_namespaces().into_iter().filter(|n| n.starts_with(&prefix)) {
            tracing::info!(namespace = %name, "removing a namespace a dead process left");
            remove_namespace(&name);
        }
        let logs = tempfile::Builder::new()
            .prefix(&format!("ws-{pid}-{seq}-logs"))
            .tempdir()
            .map_err(|source| NetnsError::Io { context: "creating a log folder".into(), source })?;
        Ok(Self {
            prefix,
            host_tag: format!("w{}x{}", base36(pid.into()), base36(seq.into())),
            net,
            _net_lock: lock,
            namespaces: Vec::new(),
            host_ifaces: Vec::new(),
            children: Vec::new(),
            next_link: 0,
            next_subnet: 1,
            logs,
        })
    }

    /// The prefix of this lab's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's private network is `10.{net}.0.0/16`.
    pub fn net(&self) -> u8 {
        self.net
    }

    /// Where spawned processes' stdout/stderr go.
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Creates namespace `<prefix><name>` with its loopback up.
    pub fn namespace(&mut self, name: &str) -> Result<Ns> {
        let full = format!("{}{name}", self.prefix);
        ip(&["netns", "add", &full])?;
        self.namespaces.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"])?;
        Ok(Ns { name: full })
    }

    /// The base of the next free `/24` of the lab's network (`10.N.k.0`); links use its
    /// first addresses with a prefix of `len` (24..=30).
    fn subnet(&mut self, len: u8) -> Result<Ipv4Addr> {
        // Subnets are carved in /24 steps from 10.N.1.0: simple and never overlapping.
        let k = self.next_subnet;
        if k > 254 || !(24..=30).contains(&len) {
            return Err(NetnsError::Invalid {
                what: "subnet",
                why: format!("subnet #{k} of /{len} (at most 254 links of /24../30)"),
            });
        }
        self.next_subnet += 1;
        Ok(Ipv4Addr::new(10, self.net, k as u8, 0))
    }

    fn iface_name(&mut self, ns: Option<&Ns>, side: char) -> String {
        let k = self.next_link;
        if ns.is_none() {
            format!("{}{}{side}", self.host_tag, base36(k.into()))
        } else {
            format!("v{}{side}", base36(k.into()))
        }
    }

    /// A veth pair between two namespaces (`None` = the host's), with addresses `.1` and
    /// `.2` of a fresh subnet of prefix length `len`, both ends up.
    pub fn veth(&mut self, a: Option<&Ns>, b: Option<&Ns>, len: u8) -> Result<Link> {
        let base = self.subnet(len)?;
        let o = base.octets();
        let (aa, ba) = (Ipv4Addr::new(o[0], o[1], o[2], 1), Ipv4Addr::new(o[0], o[1], o[2], 2));
        let link = self.veth_bare(a, b)?;
        self.addr(&link.a, aa, len)?;
        self.addr(&link.b, ba, len)?;
        Ok(Link { a: End { addr: aa, ..link.a }, b: End { addr: ba, ..link.b } })
    }

    /// A veth pair without addresses (e.g. one end to plug into a bridge); both ends up.
    pub fn veth_bare(&mut self, a: Option<&Ns>, b: Option<&Ns>) -> Result<Link> {
        let an = self.iface_name(a, 'a');
        let bn = self.iface_name(b, 'b');
        self.next_link += 1;
        let mut args: Vec<&str> = vec!["link", "add", "name", &an];
        if let Some(ns) = a {
            args.extend(["netns", &ns.name]);
        }
        args.extend(["type", "veth", "peer", "name", &bn]);
        if let Some(ns) = b {
            args.extend(["netns", &ns.name]);
        }
        ip(&args)?;
        if a.is_none() {
            self.host_ifaces.push(an.clone());
        }
        if b.is_none() {
            self.host_ifaces.push(bn.clone());
        }
        let link = Link {
            a: End { ns: a.cloned(), iface: an, addr: Ipv4Addr::UNSPECIFIED },
            b: End { ns: b.cloned(), iface: bn, addr: Ipv4Addr::UNSPECIFIED },
        };
        self.up(&link.a)?;
        self.up(&link.b)?;
        Ok(link)
    }

    fn ns_args(ns: Option<&Ns>) -> Vec<String> {
        ns.map(|n| vec!["-n".to_string(), n.name.clone()]).unwrap_or_default()
    }

    fn ip_in(ns: Option<&Ns>, rest: &[&str]) -> Result<String> {
        let mut args = Self::ns_args(ns);
        args.extend(rest.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ip(&refs)
    }

    fn up(&self, e: &End) -> Result<()> {
        self.set_link(e, true)
    }

    /// Sets the interface of `e` up or down: down cuts the link (its peer loses carrier,
    /// the routes through it go; TCP connections across it see nothing more, not a reset),
    /// up heals it (the addresses stay).
    pub fn set_link(&self, e: &End, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        Self::ip_in(e.ns.as_ref(), &["link", "set", &e.iface, state]).map(drop)
    }

    /// Adds `addr/len` to an interface.
    pub fn addr(&self, e: &End, addr: Ipv4Addr, len: u8) -> Result<()> {
        Self::ip_in(e.ns.as_ref(), &["addr", "add", &format!("{addr}/{len}"), "dev", &e.iface])
            .map(drop)
    }

    /// Gives `ns` the address `addr/32` on its loopback, so connections from inside `ns` to
    /// `addr` end at a listener there (e.g. a shaper standing in for a remote node).
    /// The namespace stops answering ARP for addresses not on the asking interface
    /// (`arp_ignore=1`, `arp_announce=2`): otherwise it would claim `addr` on its links
    /// and steal the real node's traffic.
    pub fn own_address(&self, ns: &Ns, addr: Ipv4Addr) -> Result<()> {
        let script = "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore && \
                      echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce";
        ip(&["netns", "exec", &ns.name, "sh", "-c", script])?;
        Self::ip_in(Some(ns), &["addr", "add", &format!("{addr}/32"), "dev", "lo"]).map(drop)
    }

    /// A bridge named `br0` in `ns` (never in the host's namespace, so deleting the
    /// namespace removes it), up, with `addr/24` if given.
    pub fn bridge(&mut self, ns: &Ns) -> Result<End> {
        Self::ip_in(Some(ns), &["link", "add", "name", "br0", "type", "bridge"])?;
        Self::ip_in(Some(ns), &["link", "set", "br0", "up"])?;
        Ok(End { ns: Some(ns.clone()), iface: "br0".into(), addr: Ipv4Addr::UNSPECIFIED })
    }

    /// Plugs `port` (an interface in the bridge's namespace) into `bridge`.
    pub fn enslave(&self, port: &End, bridge: &End) -> Result<()> {
        Self::ip_in(port.ns.as_ref(), &["link", "set", &port.iface, "master", &bridge.iface])
            .map(drop)
    }

    /// A fresh /24 for a bridge's segment: `10.N.k.0`.
    pub fn segment(&mut self) -> Result<Ipv4Addr> {
        self.subnet(24)
    }

    /// A route to `dest/len` via `gateway` in the namespace of `e`.
    pub fn route(&self, ns: Option<&Ns>, dest: Ipv4Addr, len: u8, via: Ipv4Addr) -> Result<()> {
        Self::ip_in(ns, &["route", "add", &format!("{dest}/{len}"), "via", &via.to_string()])
            .map(drop)
    }

    /// Shapes the egress of `e` with `tc tbf` (replacing its root qdisc).
    pub fn tbf(&self, e: &End, t: &Tbf) -> Result<()> {
        if t.rate_bits_per_s == 0 || t.burst_bytes == 0 {
            return Err(NetnsError::Invalid {
                what: "tbf",
                why: format!(
                    "rate {} bit/s, burst {} bytes: both must be > 0",
                    t.rate_bits_per_s, t.burst_bytes
                ),
            });
        }
        let mut args = Self::ns_args(e.ns.as_ref());
        let rate = format!("{}bit", t.rate_bits_per_s);
        let burst = format!("{}b", t.burst_bytes);
        let lat = format!("{}us", t.latency.as_micros().max(1));
        args.extend(
            ["qdisc", "replace", "dev", &e.iface, "root", "tbf", "rate", &rate, "burst", &burst]
                .iter()
                .map(|s| s.to_string()),
        );
        args.extend(["latency".to_string(), lat]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("tc", &refs).map(drop)
    }

    /// Shapes both directions of a link.
    pub fn tbf_both(&self, l: &Link, t: &Tbf) -> Result<()> {
        self.tbf(&l.a, t)?;
        self.tbf(&l.b, t)
    }

    /// Spawns `cmd` inside `ns` (stdout and stderr to `<log_dir>/<what>.log`); the lab
    /// kills it on drop. Returns its pid.
    pub fn spawn(&mut self, ns: &Ns, what: &str, mut cmd: Command) -> Result<u32> {
        let path = PathBuf::from("/run/netns").join(&ns.name);
        let fd = File::open(&path).map_err(|source| NetnsError::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
        let log = self.logs.path().join(format!("{what}.log"));
        let out = File::create(&log).map_err(|source| NetnsError::Io {
            context: format!("creating {}", log.display()),
            source,
        })?;
        let err = out
            .try_clone()
            .map_err(|source| NetnsError::Io { context: "dup of a log file".into(), source })?;
        let raw = fd.as_raw_fd();
        // SAFETY: only async-signal-safe calls (setns, setpgid, prctl) between fork and exec; `fd`
        // outlives `spawn` (it is dropped after it returns).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its own process group: a Ctrl-C at the terminal reaches the testbed,
                // which stops its servers in order, not the servers directly.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let command = format!("{cmd:?} in {}", ns.name);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| NetnsError::Spawn { command, source })?;
        drop(fd);
        let pid = child.id();
        self.children.push(Spawned { what: what.to_string(), child, log });
        Ok(pid)
    }

    /// A TCP listener bound inside `ns` (a socket keeps the namespace it was created in,
    /// so this process can serve inside a namespace without a child process).
    pub fn tcp_listener_in(
        &self,
        ns: &Ns,
        addr: std::net::SocketAddr,
    ) -> Result<std::net::TcpListener> {
        self.in_namespace(ns, move |name| {
            std::net::TcpListener::bind(addr).map_err(|source| NetnsError::Io {
                context: format!("binding {addr} in {name}"),
                source,
            })
        })
    }

    /// A TCP connection made from inside `ns` to `addr` (the socket stays in `ns`).
    pub fn tcp_connect_in(
        &self,
        ns: &Ns,
        addr: std::net::SocketAddr,
    ) -> Result<std::net::TcpStream> {
        self.in_namespace(ns, move |name| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|source| {
                NetnsError::Io { context: format!("connecting to {addr} from {name}"), source }
            })
        })
    }

    /// Runs `f` (given the namespace's name) on a short-lived thread that has entered `ns`:
    /// sockets it creates stay in `ns`, this process's other threads do not move.
    fn in_namespace<T: Send + 'static>(
        &self,
        ns: &Ns,
        f: impl FnOnce(&str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = PathBuf::from("/run/netns").join(&ns.name);
        let fd = File::open(&path).map_err(|source| NetnsError::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
        let name = ns.name.clone();
        std::thread::spawn(move || {
            // SAFETY: setns on an fd we own, affecting only this (throwaway) thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Io {
                    context: format!("entering namespace {name}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            f(&name)
        })
        .join()
        .map_err(|_| NetnsError::Invalid { what: "thread", why: "panicked".into() })?
    }

    /// The pids of the processes this lab spawned (still tracked).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.child.id()).collect()
    }

    /// `Err` naming the first spawned process that has exited, with its log's tail.
    pub fn check_children(&mut self) -> std::result::Result<(), String> {
        for c in &mut self.children {
            if let Ok(Some(st)) = c.child.try_wait() {
                return Err(format!("{} exited ({st}); log tail:\n{}", c.what, tail(&c.log, 2000)));
            }
        }
        Ok(())
    }

    /// The last `n` bytes of a spawned process's log.
    pub fn log_tail(&self, what: &str, n: usize) -> String {
        tail(&self.logs.path().join(format!("{what}.log")), n)
    }

    /// Stops the children whose name starts with `prefix` (SIGTERM, then SIGKILL after
    /// `grace`), e.g. the NMSs before the PSS they flush to.
    pub fn stop_matching(&mut self, prefix: &str, grace: Duration) {
        let (mut stop, keep): (Vec<_>, Vec<_>) =
            self.children.drain(..).partition(|c| c.what.starts_with(prefix));
        self.children = keep;
        terminate(&mut stop, grace);
    }

    /// Stops every child (last spawned first; SIGTERM, SIGKILL at `grace`), then removes every
    /// namespace and host-side interface. Idempotent; `Drop` calls it with 5 s of grace.
    pub fn shutdown(&mut self, grace: Duration) {
        let mut all = std::mem::take(&mut self.children);
        terminate(&mut all, grace);
        for ns in self.namespaces.drain(..).rev() {
            kill_pids_in(&ns);
            if let Err(e) = ip(&["netns", "delete", &ns]) {
                tracing::warn!(error = %e, "removing a namespace");
            }
        }
        // A host-side veth end vanishes with its peer's namespace; this catches the rest.
        for i in self.host_ifaces.drain(..) {
            if Path::new(&format!("/sys/class/net/{i}")).exists() {
                let _ = ip(&["link", "delete", &i]);
            }
        }
    }
}

/// Stops children in reverse order of spawning (a later process may depend on an earlier
/// one: an NMS flushes to the PSS started before it), each with SIGTERM and a wait, all
/// within one `grace` deadline; whatever still runs at the deadline gets SIGKILL.
fn terminate(children: &mut [Spawned], grace: Duration) {
    let deadline = Instant::now() + grace;
    for c in children.iter_mut().rev() {
        // Reaped already (`check_children`): its pid may be another process's now.
        if !matches!(c.child.try_wait(), Ok(None)) {
            continue;
        }
        // SAFETY: kill on the pid of a child we have not reaped yet.
        unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
        loop {
            match c.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(process = %c.what, "did not stop on SIGTERM in time; SIGKILL");
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let start = s.len().saturating_sub(n);
    let start = (start..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
    s[start..].to_string()
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}

/// Finds a wayside binary (`nms`, `pss`): `$WAYSIDE_<NAME>_BIN`, else beside the running
/// executable (or one folder up, for test executables in `deps/`), else `cargo build` of it
/// (debug, in the current target dir) when `cargo` is available.
pub fn wayside_binary(name: &str) -> std::result::Result<PathBuf, String> {
    let var = format!("WAYSIDE_{}_BIN", name.to_ascii_uppercase());
    if let Some(p) = std::env::var_os(&var).map(PathBuf::from) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{var}={} is not a file", p.display()))
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "cannot find the `{name}` binary: set {var} or build it (`cargo build -p wayside-{name}`)"
    ))
}

/// Spawns a PSS cluster: node `i + 1` in `nodes[i].0`, listening on `nodes[i].1`, its data
/// under `data_dir`. Returns the endpoints (`host:port`).
pub fn spawn_pss(
    lab: &mut Lab,
    pss_bin: &Path,
    nodes: &[(Ns, std::net::SocketAddr)],
    data_dir: &Path,
    tls: Option<&wayside_proto::tls::TlsFiles>,
) -> Result<Vec<String>> {
    let peers = nodes
        .iter()
        .enumerate()
        .map(|(i, (_, a))| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    for (i, (ns, addr)) in nodes.iter().enumerate() {
        let mut cmd = Command::new(pss_bin);
        cmd.args(["serve", "--id", &(i + 1).to_string(), "--listen", &addr.to_string()])
            .args(["--peers", &peers, "--data-dir"])
            .arg(data_dir.join(format!("pss{}", i + 1)))
            .args(tls_args(tls))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
        lab.spawn(ns, &format!("pss{}", i + 1), cmd)?;
    }
    Ok(nodes.iter().map(|(_, a)| a.to_string()).collect())
}

/// `pss serve`'s flags for `tls`'s files (none for plaintext).
fn tls_args(tls: Option<&wayside_proto::tls::TlsFiles>) -> Vec<std::ffi::OsString> {
    let mut a = Vec::new();
    for (flag, path) in tls.map_or(Vec::new(), |t| {
        vec![("--tls-cert", &t.cert), ("--tls-key", &t.key), ("--tls-ca", &t.ca)]
    }) {
        if let Some(p) = path {
            a.push(flag.into());
            a.push(p.clone().into_os_string());
        }
    }
    a
}

/// Spawns `nms serve --config <file>` in `ns` with `cfg` (written as TOML beside the logs).
pub fn spawn_nms(
    lab: &mut Lab,
    nms_bin: &Path,
    ns: &Ns,
    cfg: &wayside_nms::config::Config,
) -> Result<u32> {
    let what = format!("nms-{}", cfg.node_id);
    let file = lab.log_dir().join(format!("{what}.toml"));
    let text = wayside_proto::config::render(cfg);
    std::fs::write(&file, text).map_err(|source| NetnsError::Io {
        context: format!("writing {}", file.display()),
        source,
    })?;
    let mut cmd = Command::new(nms_bin);
    cmd.arg("--config")
        .arg(&file)
        .arg("serve")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    lab.spawn(ns, &what, cmd)
}

/// Waits until `addr` accepts TCP connections, failing early (with the log tail) when a
/// process of the lab has exited.
pub async fn wait_tcp(
    lab: &mut Lab,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        lab.check_children()?;
        let c =
            tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr))
                .await;
        if matches!(c, Ok(Ok(_))) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{addr} did not accept connections within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until one of the PSS `endpoints` says it is the Raft leader.
pub async fn wait_pss_leader(
    lab: &mut Lab,
    endpoints: &[String],
    tls: Option<&wayside_proto::tls::Tls>,
    timeout: Duration,
) -> std::result::Result<(), String> {
    use wayside_proto::pb;
    let deadline = Instant::now() + timeout;
    loop {
        lab.check_children()?;
        for ep in endpoints {
            let e = wayside_proto::types::Endpoint::parse(ep).map_err(|e| e.to_string()).and_then(
                |ep| wayside_proto::client::endpoint(&ep, tls).map_err(|e| e.to_string()),
            );
            let Ok(e) = e else {
                return Err(format!("bad PSS endpoint {ep:?}"));
            };
            let e = e.connect_timeout(Duration::from_millis(300)).timeout(Duration::from_secs(1));
            let Ok(ch) = e.connect().await else { continue };
            let mut c = pb::pss_admin_client::PssAdminClient::new(ch);
            if let Ok(st) = c.status(pb::StatusRequest {}).await {
                if st.into_inner().role == pb::RaftRole::Leader as i32 {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no PSS leader among {endpoints:?} within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_missing_feature_is_a_skip() {
        assert!(missing_feature("spawning ip netns add x: No such file or directory (os error 2)"));
        assert!(missing_feature("ip netns add x: exit status: 1: mount --make-shared /run/netns failed: Operation not permitted"));
        assert!(missing_feature("tc qdisc add: Error: Specified qdisc kind is unknown."));
        assert!(!missing_feature("no free 10.N.0.0/16 between 10.100 and 10.199"));
        assert!(!missing_feature(
            "ip netns add ws-1-1cut-core: Cannot create namespace file: File exists"
        ));
    }

    /// A killed run's log folder (it holds its PSS nodes' data) goes with its namespaces;
    /// a live process's stays.
    #[test]
    fn a_dead_runs_log_folder_is_reaped() {
        // Past any pid_max: no such process.
        let dead = std::env::temp_dir().join("ws-4194400-3-logsTEST");
        std::fs::create_dir_all(dead.join("pss-1")).unwrap();
        let live = std::env::temp_dir().join(format!("ws-{}-999-logsTEST", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        let removed = reap_stale();
        assert!(!dead.exists(), "{removed:?}");
        assert!(live.exists());
        std::fs::remove_dir_all(&live).unwrap();
    }
    use super::*;

    #[test]
    fn rates_need_units() {
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("54Mbit/s").unwrap(), 54_000_000);
        assert_eq!(parse_rate("2.5kbit").unwrap(), 2500);
        assert!(parse_rate("100").unwrap_err().contains("unit"));
        assert!(parse_rate("xmbit").is_err());
        assert!(parse_rate("0bit").is_err());
    }

    #[test]
    fn names_fit_in_ifnamsiz() {
        let tag = format!("w{}x{}", base36(4_194_304), base36(46655));
        assert!(tag.len() + base36(46655).len() < 15, "{tag}");
    }
}
