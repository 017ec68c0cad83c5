//! `pss --help` describes the subcommands that exist; `--print-default-config` prints a
//! config that `--config` accepts back; an unknown key is an error that names it.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pss")).args(args).output().expect("runs pss")
}

#[test]
fn help_lists_every_subcommand() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "serve",
        "status",
        "members",
        "add-node",
        "remove-node",
        "transfer-leader",
        "compact-log",
        "put",
        "get",
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
