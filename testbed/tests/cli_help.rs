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

/// `testbed drive` refuses what it cannot drive, naming the option, before it deploys
/// anything (values it used to clamp or ignore silently).
#[test]
fn drive_refuses_bad_options_by_name() {
    for (args, named) in [
        (&["--ops-per-s", "0"][..], "--ops-per-s"),
        (&["--ops-per-s", "NaN"], "--ops-per-s"),
        (&["--reports-per-s=-1"], "--reports-per-s"),
        (&["--blocks", "0"], "--blocks"),
        (&["--stall-ms=-5"], "--stall-ms"),
        // Two vehicles with one name would share one volume.
        (&["--speed-mph", "30", "--speed-mph", "30"], "30mph"),
        // Options that would be ignored.
        (&["--speed-mph", "30", "--fcd", "x.xml"], "--fcd"),
        (&["--rsu-count", "3", "--rsus", "x.csv"], "--rsus"),
        (&["--radio-delay-ms", "3"], "--netns"),
        (&["--vm-memory-mib", "256"], "--image"),
    ] {
        let mut all = vec!["drive", "--plaintext"];
        all.extend_from_slice(args);
        let out = testbed(&all);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(!err.contains("road ready"), "{args:?} deployed a road: {err}");
    }
}
