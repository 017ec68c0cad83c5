//! Building the image: deterministic bytes, a truthful manifest, the right contents, and
//! clear errors for bad input before QEMU is ever started.

mod common;

use std::process::Command;

use sha2::Digest as _;
use wayside_nms::pid1::BootParams;
use wayside_unikernel::image::{self, Image};

#[test]
fn rebuild_gives_identical_bytes_and_the_manifest_is_true() {
    let Some(k) = common::kernel() else { return };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    // One copy of the binary for both builds: "the same inputs" (and no rebuild between).
    let input = tempfile::tempdir().unwrap();
    let nms = input.path().join("nms");
    std::fs::copy(common::nms_binary(), &nms).unwrap();
    let m1 = common::build_image_from(&nms, &k, a.path(), BootParams::default());
    let m2 = common::build_image_from(&nms, &k, b.path(), BootParams::default());
    let read = |d: &std::path::Path, f: &str| std::fs::read(d.join(f)).unwrap();
    for f in [image::INITRAMFS_FILE, image::MANIFEST_FILE, image::KERNEL_FILE] {
        let (x, y) = (read(a.path(), f), read(b.path(), f));
        let first_diff = x.iter().zip(&y).position(|(p, q)| p != q);
        assert!(
            x.len() == y.len() && first_diff.is_none(),
            "{f} differs: {} vs {} bytes, first difference at {first_diff:?}",
            x.len(),
            y.len()
        );
    }
    assert_eq!(m1, m2);

    // Sizes and digests in the manifest are those of the files.
    for part in [&m1.kernel, &m1.initramfs] {
        let data = read(a.path(), &part.file);
        assert_eq!(data.len() as u64, part.bytes);
        assert_eq!(hex::encode(sha2::Sha256::digest(&data)), part.sha256);
    }
    assert_eq!(m1.kernel_version, k.version);
    let img = Image::open(a.path(), true).unwrap();
    assert!(img.manifest.default_cmdline.contains("console=ttyS0"));
    BootParams::parse(&img.manifest.default_cmdline).unwrap();

    // The modules: virtio-net's whole dependency chain, dependencies first.
    let names: Vec<String> = m1
        .modules
        .iter()
        .map(|p| {
            p.file
                .rsplit('/')
                .next()
                .unwrap()
                .split_once('-')
                .unwrap()
                .1
                .trim_end_matches(".ko")
                .to_string()
        })
        .collect();
    let pos = |n: &str| {
        names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n} missing from {names:?}"))
    };
    for (before, after) in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_mmio"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio", "virtio_pci"),
    ] {
        assert!(pos(before) < pos(after), "{before} must load before {after}: {names:?}");
    }

    // A corrupted part is noticed.
    let mut bytes = read(a.path(), image::INITRAMFS_FILE);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(a.path().join(image::INITRAMFS_FILE), bytes).unwrap();
    let err = Image::open(a.path(), true).unwrap_err().to_string();
    assert!(err.contains("sha256"), "{err}");
}

#[test]
fn the_initramfs_holds_only_init_console_and_modules() {
    let Some(k) = common::kernel() else { return };
    let dir = tempfile::tempdir().unwrap();
    common::build_image(&k, dir.path(), BootParams::default());
    let Ok(out) = Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(dir.path().join(image::INITRAMFS_FILE))
        .output()
    else {
        eprintln!("SKIP: cpio(1) not installed");
        return;
    };
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    for line in listing.lines() {
        let ok = matches!(
            line,
            "init"
                | "dev"
                | "dev/console"
                | "proc"
                | "lib"
                | "lib/modules"
                | "lib/modules/load-order"
        ) || (line.starts_with("lib/modules/") && line.ends_with(".ko"));
        assert!(ok, "unexpected file {line:?} in the initramfs:\n{listing}");
    }
    assert!(listing.lines().any(|l| l == "init"));
    assert!(listing.lines().any(|l| l.ends_with("-virtio_net.ko")));
}

fn unikernel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_unikernel"))
        .args(args)
        .env("WAYSIDE_QEMU", "/nonexistent/qemu-must-not-start")
        .output()
        .unwrap()
}

#[test]
fn bad_input_fails_clearly_before_qemu_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("img");
    let out_s = out_dir.to_str().unwrap();
    let empty = dir.path().join("no-kernel");
    std::fs::create_dir_all(&empty).unwrap();
    let nms = common::nms_binary();
    let nms_s = nms.to_str().unwrap();

    // A missing kernel.
    let o = unikernel(&[
        "build",
        "--out",
        out_s,
        "--nms",
        nms_s,
        "--kernel-dir",
        empty.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no kernel in") && err.contains("fetch-kernel"), "{err}");

    // A dynamically linked /init.
    let o = unikernel(&[
        "build",
        "--out",
        out_s,
        "--nms",
        "/bin/sh",
        "--kernel-dir",
        empty.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("dynamically linked") && err.contains("ld-linux"), "{err}");

    // Bad addresses for the guest's command line, at build and at run time.
    let o = unikernel(&["build", "--out", out_s, "--nms", nms_s, "--pss", "10.0.2.2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--pss") && err.contains("10.0.2.2"), "{err}");

    let Some(k) = common::kernel() else { return };
    common::build_image(&k, &out_dir, BootParams::default());
    let state = dir.path().join("state");
    // No PSS anywhere: the NMS could not start; say so instead of booting.
    let o = unikernel(&["run", out_s, "--state-dir", state.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--pss"), "{err}");
    for (flag, value, want) in [
        ("--ip", "10.0.2.300/24", "not an IPv4 address"),
        ("--ip", "10.0.2.15", "ADDRESS/PREFIX"),
        ("--listen", "localhost:7000", "IP:PORT"),
        ("--gw", "gateway", "not an IPv4 address"),
    ] {
        let o = unikernel(&[
            "run",
            out_s,
            "--state-dir",
            state.to_str().unwrap(),
            "--pss",
            "10.0.2.2:5000",
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {value} was accepted");
        assert!(err.contains(flag) && err.contains(want), "{flag} {value}: {err}");
        // Refused before QEMU: it would have failed with "cannot start /nonexistent/...".
        assert!(!err.contains("cannot start"), "{err}");
    }
    // An image folder with its kernel gone.
    std::fs::remove_file(out_dir.join(image::KERNEL_FILE)).unwrap();
    let o = unikernel(&["run", out_s, "--state-dir", state.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("vmlinuz") && !err.contains("cannot start"), "{err}");
}
