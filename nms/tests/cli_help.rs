//! `nms --help` describes the subcommands that exist; `--print-default-config` prints a
//! config that `--config` accepts back; an unknown key is an error that names it.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nms")).args(args).output().expect("runs nms")
}

#[test]
fn help_lists_every_subcommand() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "serve", "migrate", "status", "shutdown", "create", "put", "get", "flush", "stat", "mount",
        "umount", "smf",
    ] {
        assert!(text.contains(&format!("  {cmd}")), "`{cmd}` missing from --help:\n{text}");
    }
}

#[test]
fn default_config_round_trips_and_unknown_keys_are_named() {
    let out = run(&["--print-default-config"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("default.toml");
    std::fs::write(&good, &out.stdout).unwrap();
    // `--help` after a config exercises parsing without starting anything.
    let ok = run(&["--config", good.to_str().unwrap(), "serve", "--help"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let bad = dir.path().join("bad.toml");
    let mut text = String::from_utf8(out.stdout).unwrap();
    text.insert_str(0, "no_such_setting = 1\n");
    std::fs::write(&bad, text).unwrap();
    let err = run(&["--config", bad.to_str().unwrap(), "serve"]);
    assert!(!err.status.success(), "a config with an unknown key was accepted");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(stderr.contains("no_such_setting"), "the error does not name the key:\n{stderr}");
}

/// `nms smf` with a setting it refuses exits at once with an error naming the setting
/// (it used to keep waiting for Ctrl-C after its server had refused to start).
#[test]
fn smf_with_a_refused_setting_exits_naming_it() {
    for (args, named) in [
        (&["--time-scale", "0"][..], "time_scale"),
        (&["--silent-connection-timeout-ms", "15000"][..], "silent_connection_timeout_ms (15000)"),
        (&["--max-connections-per-source", "0"][..], "max_connections_per_source"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nms"))
            .args(["smf", "--listen", "127.0.0.1:0"])
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("runs nms");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("`nms smf {args:?}` was still running after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "`nms smf {args:?}` was accepted");
        assert!(stderr.contains(named), "`nms smf {args:?}` did not name {named}:\n{stderr}");
    }
}

/// An NMS that accepts connections and answers nothing (stopped, wedged) does not hang
/// `nms status`: it fails within its call limit, naming the deadline.
#[test]
fn status_of_a_silent_nms_fails_within_its_limit() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let t = std::time::Instant::now();
    let out = run(&["status", "--nms", &addr]);
    let took = t.elapsed();
    assert!(!out.status.success());
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    drop(silent);
}

/// Usage mistakes are errors, not silent successes: no subcommand, `--config` given to a
/// command it does not configure, `--print-default-config` with a subcommand. `--config`
/// alone checks the file.
#[test]
fn usage_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("nms.toml");
    std::fs::write(&good, run(&["--print-default-config"]).stdout).unwrap();
    let good = good.to_str().unwrap();
    for (args, says) in [
        (&[][..], "no subcommand"),
        (&["--config", good, "smf"][..], "configures `nms serve` only"),
        (&["--print-default-config", "status", "--nms", "x:1"][..], "takes no subcommand"),
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = run(&["--config", good]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("a valid configuration"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "dedupe_entries_per_volume = 0\n").unwrap();
    let out = run(&["--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dedupe_entries_per_volume"));
}
