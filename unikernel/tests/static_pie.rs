//! The `nms` binary the image runs as /init is static-pie with no program interpreter
//! (issue 4), checked with the system's own tools as well as ours.

mod common;

use std::process::Command;

#[test]
fn nms_is_static_pie_without_interpreter() {
    let nms = common::nms_binary();
    match Command::new("file").arg("-b").arg(&nms).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("static-pie linked"), "file(1) says: {text}");
        }
        Err(e) => eprintln!("SKIP (file(1) part): {e}; install the `file` package"),
    }
    match Command::new("readelf").args(["-l", "-W"]).arg(&nms).output() {
        Ok(out) => {
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("DYN (Position-Independent Executable file)")
                    || text.contains("DYN (Shared object file)"),
                "{text}"
            );
            assert!(!text.contains("INTERP"), "nms has a program interpreter:\n{text}");
            assert!(!text.contains("Requesting program interpreter"), "{text}");
        }
        Err(e) => eprintln!("SKIP (readelf part): {e}; install binutils"),
    }
    let bytes = std::fs::read(&nms).unwrap();
    assert_eq!(
        wayside_unikernel::elf::exec_kind(&bytes).unwrap(),
        wayside_unikernel::elf::ExecKind::StaticPie
    );
}
