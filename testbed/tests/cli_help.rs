//! `testbed --help` describes the subcommands that exist; bad usage is a clear error.

use std::process::Command;

fn testbed(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_testbed")).args(args).output().expect("runs testbed")
}

#[test]
fn help_lists_every_subcommand() {
    let out = testbed(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["bench", "paper", "drive", "mechanisms"] {
        assert!(text.contains(&format!("  {cmd}")), "`{cmd}` missing from --help:\n{text}");
    }
    let bench = String::from_utf8_lossy(&testbed(&["bench", "--help"]).stdout).to_string();
    for b in ["pss", "nms", "migration", "image", "fuse"] {
        assert!(bench.contains(&format!("  {b}")), "bench `{b}` missing:\n{bench}");
    }
}

#[test]
fn unknown_subcommand_is_named() {
    let out = testbed(&["fly"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fly"));
}
