//! `testbed mechanisms`: the measured service migration times feed Table III and the
//! recomputed Tables V-VII (through the paper module's own equations), and the report and
//! plot are written. The fast test measures wayside's state migration only; the heavy one
//! (`heavy_` prefix: boots the image under QEMU, TCG here) measures all three mechanisms.

mod common;

use std::path::Path;
use std::process::Command;

use wayside_testbed::paper::{self, Inputs, Mechanism};

fn testbed(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running testbed")
}

fn outcome(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("mechanisms.json")).expect("mechanisms.json");
    serde_json::from_str(&text).unwrap()
}

fn smt_of(o: &serde_json::Value, column: &str) -> Option<f64> {
    o["measurements"].as_array()?.iter().find(|m| m["column"] == column)?["smt_s"].as_f64()
}

#[test]
fn wayside_smt_is_measured_and_drives_the_recomputed_tables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let run = testbed(&[
        "mechanisms",
        "--mechanism",
        "wayside",
        "--volume-mib",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let o = outcome(&out);
    let smt = smt_of(&o, "wayside").expect("a wayside SMT");
    assert!(smt > 0.0 && smt < 60.0, "wayside SMT {smt} s");
    assert!(smt_of(&o, "QEMU-live").is_none() && smt_of(&o, "cold-boot").is_none());

    // The paper module, given the paper's mechanisms plus this SMT, gives exactly the cells
    // the command wrote for the `wayside` column (Tables V-VII, both conventions).
    let mut inputs = Inputs::paper();
    inputs.mechanisms.push(Mechanism { name: "wayside".into(), smt_s: smt });
    let expected = paper::compute(&inputs);
    let written: Vec<paper::Cell> = o["tables"]["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["column"] == "wayside")
        .map(|c| paper::Cell {
            table: match c["table"].as_str().unwrap() {
                "V" => "V",
                "VI" => "VI",
                "VII" => "VII",
                other => panic!("table {other} has a wayside column"),
            },
            speed: c["speed"].as_str().unwrap().into(),
            rsu: c["rsu"].as_str().unwrap().into(),
            column: "wayside".into(),
            published_convention: c["published_convention"].as_str().unwrap().into(),
            as_written: c["as_written"].as_str().unwrap().into(),
            published: None,
            matches: None,
            note: None,
        })
        .collect();
    let want: Vec<paper::Cell> =
        expected.cells.into_iter().filter(|c| c.column == "wayside").collect();
    assert_eq!(written.len(), 3 * 7 * 2, "Tables V-VII x 7 RSUs x 2 speeds");
    assert_eq!(written, want);
    // And the cells are the model's: a sub-second move fits reactively everywhere (eq. 6).
    assert!(written.iter().filter(|c| c.table == "V").all(|c| c.published_convention == "Y"));
    // The paper's own columns are still reproduced beside it.
    let paper_cells = o["tables"]["cells"].as_array().unwrap();
    assert!(paper_cells.iter().any(|c| c["column"] == "KVM" && c["matches"] == true));

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Table III"), "{report}");
    assert!(report.contains(&format!("{smt:.3}")), "Table III shows the measured SMT");
    assert!(report.contains("wayside (") && report.contains("Table VI"), "{report}");
    let svg = std::fs::read_to_string(out.join("smt-vs-dwell.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("measured: wayside"), "{svg}");
    assert!(stdout.contains("Table V at 30 mph"), "{stdout}");
}

#[test]
fn bad_mechanism_options_fail_clearly() {
    let run = testbed(&["mechanisms", "--mechanism", "criu"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("criu"));
    let dir = tempfile::tempdir().unwrap();
    let run = testbed(&[
        "mechanisms",
        "--mechanism",
        "wayside",
        "--volume-mib",
        "0",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--volume-mib"));
}

#[test]
fn rounds_measure_each_mechanism_again_and_report_the_median() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let args = ["mechanisms", "--mechanism", "wayside", "--volume-mib", "1", "--rounds", "3"];
    let run = testbed(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    for r in 1..=3 {
        assert!(stdout.contains(&format!("round {r}: measuring wayside")), "{stdout}");
    }
    let o = outcome(&out);
    let m = o["measurements"].as_array().unwrap().iter().find(|m| m["column"] == "wayside");
    let m = m.expect("wayside measured");
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("median of 3 runs ("), "{detail}");
    // The median is one of the runs printed.
    let runs: Vec<f64> = detail["median of 3 runs (".len()..]
        .split(" s)")
        .next()
        .unwrap()
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect();
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let smt = smt_of(&o, "wayside").unwrap();
    assert!((smt - sorted[1]).abs() < 0.0005, "median {smt} of {runs:?}");
    let run = testbed(&["mechanisms", "--mechanism", "wayside", "--rounds", "0"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--rounds"));
}

#[test]
fn heavy_all_three_mechanisms_measure_under_qemu() {
    let qemu = Command::new(wayside_unikernel::vm::qemu_binary()).arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: qemu-system-x86_64 is not installed");
        return;
    }
    let kdir = wayside_unikernel::kernel::default_cache_dir();
    if wayside_unikernel::kernel::KernelTree::locate(&kdir, None).is_err() {
        if let Err(e) = wayside_unikernel::kernel::fetch(&kdir, None) {
            eprintln!("SKIP: Debian's kernel is unobtainable ({e})");
            return;
        }
    }
    let [nms] = common::wayside_binaries(["nms"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let run = testbed(&[
        "mechanisms",
        "--mechanism",
        "wayside",
        "--mechanism",
        "qemu-live",
        "--mechanism",
        "cold-boot",
        "--volume-mib",
        "4",
        "--memory-mib",
        "384",
        "--nms",
        nms.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let o = outcome(&out);
    for m in ["wayside", "QEMU-live", "cold-boot"] {
        let smt = smt_of(&o, m).unwrap_or_else(|| panic!("{m} not measured: {o}"));
        assert!(smt > 0.0, "{m}: {smt}");
    }
    // A cold boot cannot beat moving the running state (it boots a kernel, then refills).
    assert!(smt_of(&o, "cold-boot").unwrap() > smt_of(&o, "wayside").unwrap());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for m in ["QEMU-live", "cold-boot", "wayside"] {
        assert!(report.contains(m), "{m} missing from the report");
    }
    let svg = std::fs::read_to_string(out.join("smt-vs-dwell.svg")).unwrap();
    assert!(svg.contains("measured: QEMU-live") && svg.contains("measured: cold-boot"));
}

/// QEMU processes whose parent is `pid`, with their command lines.
fn qemu_children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1));
        if ppid != Some(&pid.to_string()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("qemu-system") {
            out.push((child, cmd));
        }
    }
    out
}

#[test]
fn heavy_ctrl_c_removes_every_vm_tap_and_bridge() {
    if !wayside_unikernel::tap::tun_available() {
        eprintln!("SKIP: /dev/net/tun is missing");
        return;
    }
    let qemu = Command::new(wayside_unikernel::vm::qemu_binary()).arg("--version").output();
    let kdir = wayside_unikernel::kernel::default_cache_dir();
    if !qemu.is_ok_and(|o| o.status.success())
        || wayside_unikernel::kernel::KernelTree::locate(&kdir, None).is_err()
    {
        eprintln!("SKIP: QEMU or Debian's kernel is missing (see the heavy_all_three test)");
        return;
    }
    let [nms] = common::wayside_binaries(["nms"]);
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args(["mechanisms", "--mechanism", "wayside-vm", "--nms", nms.to_str().unwrap()])
        .arg("--out")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (with a deadline) until both VMs of the road exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let vms = loop {
        let vms = qemu_children(child.id());
        if vms.len() == 2 {
            break vms;
        }
        assert!(child.try_wait().unwrap().is_none(), "testbed exited before booting its VMs");
        assert!(std::time::Instant::now() < deadline, "no VMs started within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let taps: Vec<String> = vms
        .iter()
        .filter_map(|(_, cmd)| {
            cmd.split("ifname=").nth(1).and_then(|r| r.split(',').next()).map(str::to_string)
        })
        .collect();
    assert_eq!(taps.len(), 2, "{vms:?}");
    let bridge = format!("wsbr{}", taps[0].trim_start_matches("wst").split('-').next().unwrap());
    let exists = |dev: &str| Command::new("ip").args(["link", "show", dev]).output().unwrap();
    assert!(exists(&bridge).status.success(), "bridge {bridge} of {taps:?}");

    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    // Stopped within a bound (the VMs' clean stop included), or the test fails saying so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("testbed mechanisms still ran 120 s after SIGINT");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    for (pid, _) in &vms {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} survived");
    }
    for dev in taps.iter().chain([&bridge]) {
        assert!(!exists(dev).status.success(), "{dev} was left behind");
    }
}
