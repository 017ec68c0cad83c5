//! `testbed::netns` on this machine's kernel: namespaces, veth pairs, `tc tbf` that really
//! limits the rate, a child process inside a namespace, clear errors, and nothing left after
//! the lab is dropped. Skips visibly without root or iproute2.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use wayside_testbed::netns::{self, Lab, Tbf};

fn usable() -> bool {
    match netns::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP: network namespaces are unusable here: {e}");
            false
        }
    }
}

#[test]
fn lab_shapes_a_link_runs_a_child_inside_and_removes_everything() {
    if !usable() {
        return;
    }
    let mut lab = Lab::new("lab").unwrap();
    let prefix = lab.prefix().to_string();
    let ns = lab.namespace("a").unwrap();
    let link = lab.veth(None, Some(&ns), 30).unwrap();
    // 32 Mbit/s both ways: 2 MB take >= 0.5 s (unshaped, a veth moves it in milliseconds).
    let rate = 32_000_000;
    lab.tbf_both(&link, &Tbf::new(rate, 32 << 10, Duration::from_millis(100))).unwrap();
    let listener = lab.tcp_listener_in(&ns, (link.b.addr, 0).into()).unwrap();
    let addr = listener.local_addr().unwrap();
    let total = 2_000_000usize;
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let t = Instant::now();
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(&vec![7u8; total]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), total);
    let took = t.elapsed();
    let bound = Duration::from_secs_f64(total as f64 * 8.0 / rate as f64);
    eprintln!("2 MB over a {rate} bit/s tbf link: {took:?} (bound {bound:?})");
    assert!(took >= bound.mul_f64(0.8), "{took:?} is faster than the shaped rate allows");
    assert!(took <= bound * 4, "{took:?}: far slower than the shaped rate");

    // A child runs inside the namespace (its net namespace is the lab's).
    let pid = lab
        .spawn(&ns, "sleeper", {
            let mut c = Command::new("sleep");
            c.arg("600");
            c
        })
        .unwrap();
    let want = std::fs::metadata(format!("/run/netns/{}", ns.name)).unwrap().ino();
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        // Until exec, the child may still show our namespace.
        let got = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
        if got == want || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(got, want, "the child is not in the namespace");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().starts_with("sleep"));

    drop(lab);
    assert!(
        !netns::list_namespaces().iter().any(|n| n.starts_with(&prefix)),
        "namespaces left: {:?}",
        netns::list_namespaces()
    );
    assert!(!Path::new(&format!("/sys/class/net/{}", link.a.iface)).exists(), "veth left");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "child {pid} still exists");
}

#[test]
fn a_failing_command_is_named_with_its_stderr() {
    if !usable() {
        return;
    }
    let mut lab = Lab::new("err").unwrap();
    let ns = lab.namespace("a").unwrap();
    let bogus = netns::End { ns: Some(ns), iface: "nosuchif0".into(), addr: [0, 0, 0, 0].into() };
    let e = lab.tbf(&bogus, &Tbf::for_rate(1_000_000)).unwrap_err().to_string();
    assert!(e.contains("tc ") && e.contains("nosuchif0"), "{e}");
    assert!(e.to_lowercase().contains("cannot find device"), "stderr missing: {e}");
    let e = lab.namespace("a").unwrap_err().to_string();
    assert!(e.contains("ip netns add") && e.contains("exists"), "{e}");
}
