//! `testbed bench nms` runs end to end against real peers (a smoke run, not a measurement):
//! every NMS phase is followed at once by the peer runs it is compared with, each round's
//! ratio is printed, gets find every key they read, and --pin is accepted.

use std::process::Command;

fn have(bin: &str, arg: &str) -> bool {
    Command::new(bin).arg(arg).output().is_ok_and(|o| o.status.success())
}

#[test]
fn bench_nms_pairs_each_phase_with_its_peers_in_every_round() {
    for (bin, arg, pkg) in [
        ("redis-server", "--version", "redis-server"),
        ("redis-benchmark", "--version", "redis-tools"),
        ("memcached", "-V", "memcached"),
        ("h2load", "--version", "nghttp2-client"),
    ] {
        if !have(bin, arg) {
            eprintln!("SKIP: {bin} is not installed (Debian package `{pkg}`)");
            return;
        }
    }
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_testbed"));
    cmd.args(["bench", "nms", "--rounds", "2", "--seconds", "1", "--clients", "4"])
        .args([
            "--blocks",
            "16",
            "--drivers",
            "h2load,h2",
            "--phases",
            "unary-write,unary-read,batched-read",
        ])
        .env("RUST_LOG", "warn");
    if two_cpus {
        cmd.arg("--pin");
    } else {
        eprintln!("SKIP (part): one CPU, so --pin is not tried");
    }
    let out = cmd.output().expect("runs testbed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text, String::from_utf8_lossy(&out.stderr));
    if two_cpus {
        assert!(text.contains("--pin: server side"), "{text}");
    }
    assert!(!text.contains("not measured"), "every peer measured:\n{text}");
    assert!(!text.contains("failed"), "{text}");
    assert!(!text.contains("still filling"), "the NMS's block pool said when it was full:\n{text}");
    // Each round lists every NMS phase directly followed by its peer runs.
    let round: Vec<String> = text
        .lines()
        .skip_while(|l| *l != "round 1:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().rsplitn(3, ' ').nth(2).unwrap_or("").trim().to_owned())
        .collect();
    assert_eq!(
        round,
        [
            "nms unary write (h2load)",
            "redis set P=1 (1 key)",
            "memcached set",
            "nms unary read (h2load)",
            "redis get P=1 (1 key)",
            "memcached get",
            "nms batched read (h2load)",
            "redis get P=16 (16 keys)",
            "nms batched read (h2)",
            "redis get P=16 (64 keys)",
        ],
        "{text}"
    );
    // Each comparison has one ratio per round, from the peer run right after the phase;
    // redis's working set is the driver's (h2load: 1 key; h2: 4 clients x 16 blocks).
    for head in [
        "ratio nms unary write (h2load) / redis set P=1 (1 key): ",
        "ratio nms unary write (h2load) / memcached set: ",
        "ratio nms unary read (h2load) / redis get P=1 (1 key): ",
        "ratio nms unary read (h2load) / memcached get: ",
        "ratio nms batched read (h2load) / redis get P=16 (16 keys): ",
        "ratio nms batched read (h2) / redis get P=16 (64 keys): ",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(head))
            .unwrap_or_else(|| panic!("no `{head}` line:\n{text}"));
        let rounds = line.split("rounds: ").nth(1).unwrap_or_else(|| panic!("{line}"));
        let each: Vec<f64> = rounds.split(", ").map(|r| r.parse().expect(line)).collect();
        assert_eq!(each.len(), 2, "{line}");
        assert!(each.iter().all(|r| *r > 0.0), "{line}");
    }
    // Unary calls are not compared with pipelined redis, nor batched ones with memcached.
    assert!(!text.contains("unary write (h2load) / redis set P=16"), "{text}");
    assert!(!text.contains("batched read (h2) / memcached"), "{text}");
    // The table: each run once, the NMS's first.
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| run") && !l.starts_with("| ---"))
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r.split(" | ").next().unwrap()).collect();
    assert_eq!(
        names,
        [
            "| nms unary write (h2load)",
            "| nms unary read (h2load)",
            "| nms batched read (h2load)",
            "| nms batched read (h2)",
            "| redis set P=1 (1 key)",
            "| memcached set",
            "| redis get P=1 (1 key)",
            "| memcached get",
            "| redis get P=16 (16 keys)",
            "| redis get P=16 (64 keys)",
        ],
        "{text}"
    );
}
