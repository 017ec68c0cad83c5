//! Shared by the integration tests that run other packages' binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace binaries `names` (e.g. `["nms", "pss"]`): `$WAYSIDE_<NAME>_BIN` when it names
/// a file (CI builds the workspace first), else cargo builds them (a no-op when up to date).
/// Integration tests cannot name another package's binaries (`CARGO_BIN_EXE_*` is per package).
pub fn wayside_binaries<const N: usize>(names: [&str; N]) -> [PathBuf; N] {
    let given = names.map(|n| {
        std::env::var_os(format!("WAYSIDE_{}_BIN", n.to_ascii_uppercase()))
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    });
    if given.iter().all(Option::is_some) {
        return given.map(|p| p.expect("checked"));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.arg("build").current_dir(root);
    for n in names {
        cargo.args(["-p", &format!("wayside-{n}"), "--bin", n]);
    }
    let out = cargo.arg("--message-format=json").output().expect("running cargo");
    assert!(out.status.success(), "cargo build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let built = |name: &str| {
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
            .and_then(|v| v["executable"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| panic!("cargo named no {name} executable"))
    };
    let mut i = 0;
    given.map(|p| {
        let name = names[i];
        i += 1;
        p.unwrap_or_else(|| built(name))
    })
}
