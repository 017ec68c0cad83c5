//! `testbed drive --netns`: every PSS node and NMS a real process in its own network
//! namespace, links shaped with tc tbf, the radio delayed and lossy through the user-space
//! shaper. A short drive must move twice and lose nothing, and leave no namespace or
//! process behind; Ctrl-C must stop a drive cleanly. Skips visibly without root/iproute2.
//! Starts many processes: nextest's `heavy` group.

mod common;

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wayside_testbed::drive::{self, Deployment, NetnsOptions, Scenario};
use wayside_testbed::mobility::a41_rsus;
use wayside_testbed::netns;

fn usable() -> bool {
    match netns::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP: network namespaces are unusable here: {e}");
            false
        }
    }
}

/// Processes whose parent is `ppid` and whose command is `nms` or `pss`.
fn server_children_of(ppid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat[stat.find('(').unwrap_or(0) + 1..close].to_string();
        let ppid_here: u32 =
            stat[close + 2..].split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid_here == ppid && (comm == "nms" || comm == "pss") {
            v.push((pid, comm));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_short_drive_moves_twice_and_loses_nothing() {
    if !usable() {
        return;
    }
    let [nms, pss] = common::wayside_binaries(["nms", "pss"]);
    let sc = Scenario::short(a41_rsus()[..3].to_vec(), 50.0).unwrap();
    let mut o = NetnsOptions {
        nms_bin: Some(nms),
        pss_bin: Some(pss),
        announce: false,
        ..Default::default()
    };
    let delay = Duration::from_millis(5);
    o.radio.delay = delay;
    o.radio.loss = 0.02;
    o.radio.loss_stall = Duration::from_millis(100);
    o.backhaul.delay = Duration::from_millis(2);
    o.backhaul.loss = 0.01;
    o.backhaul.loss_stall = Duration::from_millis(50);
    let t = Instant::now();
    let out = drive::run_scenario_on(sc.clone(), &Deployment::Netns(o), CancellationToken::new())
        .await
        .unwrap();
    let summary = drive::summary(&sc, &out);
    eprintln!("{summary}\n{}\n({:?})", out.deployment, t.elapsed());
    let ok: Vec<_> = out.moves.iter().filter(|m| m.ok).collect();
    assert!(ok.len() >= 2, "{summary}\n{:#?}", out.moves);
    assert_eq!((ok[0].from_rsu.as_str(), ok[0].to_rsu.as_str()), ("RSU1", "RSU2"));
    assert_eq!((ok[1].from_rsu.as_str(), ok[1].to_rsu.as_str()), ("RSU2", "RSU3"));
    assert!(out.checked > 0, "{summary}");
    assert_eq!(out.lost, 0, "{summary}");
    assert_eq!(out.read_mismatches, 0, "{summary}");
    assert_eq!(out.unpersisted, 0, "{summary}");
    assert_eq!(drive::verdict(&out), Ok(()), "{summary}");
    // Every op crossed the radio shaper: at least one round trip of its delay.
    let fastest = out.ops.iter().filter(|r| r.ok).map(|r| r.latency_ms).fold(f64::MAX, f64::min);
    assert!(fastest >= 2.0 * delay.as_secs_f64() * 1e3, "an op took {fastest} ms: no radio delay");
    // The vehicle used every RSU's radio (its shaper saw traffic).
    for i in 1..=3 {
        let line = out.deployment.lines().find(|l| l.starts_with(&format!("radio {i}:"))).unwrap();
        assert!(!line.contains(" 0 connections"), "{line}");
    }
    // Every RSU reached the PSS (write-back, ownership) and the moves crossed the backhaul
    // through its shapers, not around them.
    for i in 1..=3 {
        let prefix = format!("backhaul {i}:");
        let line = out.deployment.lines().find(|l| l.starts_with(&prefix));
        let line = line.unwrap_or_else(|| panic!("no {prefix} line in\n{}", out.deployment));
        assert!(!line.contains(" 0 connections") && !line.contains(" 0 chunks"), "{line}");
    }
    // Nothing left: no namespace of this process, no nms/pss child.
    let prefix = netns::process_prefix();
    let left: Vec<_> =
        netns::list_namespaces().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let kids = server_children_of(std::process::id());
    assert!(kids.is_empty(), "server processes left: {kids:?}");
}

#[test]
fn netns_drive_stops_cleanly_on_ctrl_c() {
    if !usable() {
        return;
    }
    let [nms, pss] = common::wayside_binaries(["nms", "pss"]);
    let out_dir = tempfile::tempdir().unwrap();
    // A slow drive (30 mph, x2: about a minute) so it is surely still driving at SIGINT.
    let mut child = Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args(["drive", "--netns", "--rsu-count", "3", "--speed-mph", "30", "--time-scale", "2"])
        .arg("--out")
        .arg(out_dir.path())
        .env("WAYSIDE_NMS_BIN", &nms)
        .env("WAYSIDE_PSS_BIN", &pss)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let (mut prefix, mut pids) = (None, Vec::<u32>::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("no `road ready` line within 60 s; stderr so far:\n{}", seen.join("\n"));
            }
        };
        // "netns: prefix ws-PID-N road- processes 1,2,3"
        if let Some(rest) = line.strip_prefix("netns: prefix ") {
            let mut it = rest.split_whitespace();
            prefix = it.next().map(str::to_string);
            pids = it.nth(1).unwrap_or("").split(',').filter_map(|p| p.parse().ok()).collect();
        }
        let ready = line.contains("the vehicles are driving");
        seen.push(line);
        if ready {
            break;
        }
    }
    let prefix = prefix.unwrap_or_else(|| panic!("no `netns: prefix` line:\n{}", seen.join("\n")));
    assert_eq!(pids.len(), 6, "3 PSS + 3 NMS processes expected: {pids:?}");
    for p in &pids {
        assert!(Path::new(&format!("/proc/{p}")).exists(), "server {p} is not running");
    }
    assert!(netns::list_namespaces().iter().any(|n| n.starts_with(&prefix)));
    // Let it drive a moment (a progress line shows it is moving), then Ctrl-C.
    let _ = rx.recv_timeout(Duration::from_secs(5)).map(|l| seen.push(l));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(45) {
            let _ = child.kill();
            panic!("testbed did not exit within 45 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("exited {status} {:?} after SIGINT", t.elapsed());
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    reader.join().unwrap();
    seen.extend(rx.try_iter());
    let stderr = seen.join("\n");
    // Interrupted: not a pass (130, as for SIGINT), though nothing it checked was lost.
    assert_eq!(status.code(), Some(130), "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("the drive was interrupted"), "{stderr}");
    assert!(stdout.contains("(interrupted)"), "no interrupted summary:\n{stdout}\n{stderr}");
    assert!(stdout.contains("lost 0"), "{stdout}");
    let left: Vec<_> =
        netns::list_namespaces().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for p in &pids {
        assert!(!Path::new(&format!("/proc/{p}")).exists(), "server process {p} left running");
    }
    assert!(out_dir.path().join("report.md").is_file());
}
