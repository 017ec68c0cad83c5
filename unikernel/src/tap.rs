//! Host networking for VMs on tap devices: one Linux bridge with a host address on a private
//! /24, and tap devices enslaved to it, one per QEMU (a migration destination needs its own,
//! because the source still holds its tap open while the guest's memory is copied).
//!
//! Everything is made with iproute2 (`ip link`, `ip addr`, `ip tuntap`) and removed again
//! when the [`Bridge`] is dropped. Subnets are taken from `10.202.0.0/16`, one /24 per bridge,
//! chosen under a host-wide file lock so that concurrent test processes never share one.
//! Only these bridges and taps are touched; nothing is routed or forwarded off the host.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use wayside_nms::pid1::Ipv4Cidr;

/// The lock that serialises subnet allocation between processes.
pub const LOCK_FILE: &str = "/tmp/wayside-tap.lock";
/// Subnets are `10.202.N.0/24` with N in this range.
pub const SUBNET_RANGE: std::ops::RangeInclusive<u8> = 1..=250;
/// Guest addresses on a bridge start at `.GUEST_HOST_BASE` (the host is `.1`).
pub const GUEST_HOST_BASE: u8 = 10;
/// At most this many guests per bridge (`.10` to `.249`).
pub const MAX_GUESTS: usize = 240;

/// Errors creating host network devices.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("/dev/net/tun is missing: tap devices cannot be created here")]
    NoTun,
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (install iproute2): {0}")]
    NoIp(std::io::Error),
    #[error("{LOCK_FILE}: {0}")]
    Lock(std::io::Error),
    #[error("no free 10.202.N.0/24 subnet (all of N = 1..=250 are in use on this host)")]
    NoSubnet,
    #[error("guest index {0} is beyond the {MAX_GUESTS} guests a bridge holds")]
    TooManyGuests(usize),
}

/// Whether tap devices can be created here (the tun driver's device node exists).
pub fn tun_available() -> bool {
    Path::new("/dev/net/tun").exists()
}

fn ip(args: &[&str]) -> Result<String, TapError> {
    let out = Command::new("ip").args(args).output().map_err(TapError::NoIp)?;
    if !out.status.success() {
        return Err(TapError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Linux bridge with the host's address `10.202.N.1/24`, and the taps on it.
/// Dropping it deletes every tap it made and the bridge.
#[derive(Debug)]
pub struct Bridge {
    name: String,
    subnet: u8,
    taps: Mutex<Vec<String>>,
}

/// Holds an exclusive `flock` on [`LOCK_FILE`] until dropped.
struct HostLock(File);

impl HostLock {
    fn take() -> Result<Self, TapError> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(TapError::Lock)?;
        // SAFETY: flock on a file descriptor we own; blocking until the other holder is done
        // (it holds the lock only for a few `ip` commands).
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(TapError::Lock(std::io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor we locked.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Bridge {
    /// Creates a bridge on a free `10.202.N.0/24` with the host at `.1`, up.
    pub fn create() -> Result<Self, TapError> {
        if !tun_available() {
            return Err(TapError::NoTun);
        }
        let _lock = HostLock::take()?;
        let used = ip(&["-4", "-o", "addr", "show"])?;
        let links = ip(&["-o", "link", "show"])?;
        let subnet = SUBNET_RANGE
            .clone()
            .find(|n| {
                !used.contains(&format!(" 10.202.{n}."))
                    && !links.contains(&format!(": {}:", Self::name_for(*n)))
            })
            .ok_or(TapError::NoSubnet)?;
        let name = Self::name_for(subnet);
        ip(&["link", "add", &name, "type", "bridge"])?;
        let bridge = Self { name, subnet, taps: Mutex::new(Vec::new()) };
        // From here on, Drop removes the bridge if a later step fails.
        let cidr = format!("{}/24", bridge.host_ip());
        ip(&["addr", "add", &cidr, "dev", &bridge.name])?;
        ip(&["link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    fn name_for(subnet: u8) -> String {
        format!("wsbr{subnet}")
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the bridge (`10.202.N.1`): bind host services for guests here.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.subnet, 1)
    }

    /// Guest number `i`'s address with its prefix (`10.202.N.(10+i)/24`).
    pub fn guest_cidr(&self, i: usize) -> Result<Ipv4Cidr, TapError> {
        if i >= MAX_GUESTS {
            return Err(TapError::TooManyGuests(i));
        }
        let host = GUEST_HOST_BASE + u8::try_from(i).map_err(|_| TapError::TooManyGuests(i))?;
        Ok(Ipv4Cidr { addr: Ipv4Addr::new(10, 202, self.subnet, host), prefix_len: 24 })
    }

    /// Creates a new tap device on this bridge, up, and returns its name. The name is
    /// unique on the host (`wst<N>-<k>`, under the 15-byte limit).
    pub fn add_tap(&self) -> Result<String, TapError> {
        let mut taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
        let name = format!("wst{}-{}", self.subnet, taps.len());
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        taps.push(name.clone());
        ip(&["link", "set", &name, "master", &self.name])?;
        ip(&["link", "set", &name, "up"])?;
        Ok(name)
    }

    /// The taps made so far, in order.
    pub fn taps(&self) -> Vec<String> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let taps = std::mem::take(&mut *self.taps.lock().unwrap_or_else(|e| e.into_inner()));
        for t in taps {
            if let Err(e) = ip(&["link", "del", &t]) {
                tracing::warn!(tap = %t, error = %e, "could not remove tap");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.name]) {
            tracing::warn!(bridge = %self.name, error = %e, "could not remove bridge");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridge_and_its_taps_exist_until_dropped() {
        if !tun_available() {
            eprintln!("SKIP: /dev/net/tun is missing");
            return;
        }
        let b = match Bridge::create() {
            Ok(b) => b,
            Err(TapError::Ip { stderr, .. }) if stderr.contains("Operation not permitted") => {
                eprintln!("SKIP: not allowed to create network devices ({stderr})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let other = Bridge::create().expect("a second bridge");
        assert_ne!(b.host_ip(), other.host_ip(), "two bridges never share a subnet");
        let t0 = b.add_tap().unwrap();
        let t1 = b.add_tap().unwrap();
        assert_ne!(t0, t1);
        let shown = ip(&["-o", "link", "show", "master", b.name()]).unwrap();
        assert!(shown.contains(&t0) && shown.contains(&t1), "{shown}");
        let addr = ip(&["-4", "-o", "addr", "show", "dev", b.name()]).unwrap();
        assert!(addr.contains(&format!("{}/24", b.host_ip())), "{addr}");
        assert_eq!(b.guest_cidr(0).unwrap().addr.octets()[3], 10);
        assert!(b.guest_cidr(MAX_GUESTS).is_err());
        let name = b.name().to_string();
        drop(b);
        drop(other);
        assert!(ip(&["link", "show", &name]).is_err(), "bridge {name} left behind");
        assert!(ip(&["link", "show", &t0]).is_err(), "tap {t0} left behind");
    }
}
