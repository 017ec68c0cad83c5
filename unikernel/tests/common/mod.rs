//! Shared by the unikernel integration tests: the `nms` binary, Debian's kernel, QEMU.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use wayside_unikernel::kernel::{self, KernelTree};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Builds (if needed) and returns the `nms` binary. Integration tests cannot name another
/// package's binary (`CARGO_BIN_EXE_*` is per package), so ask cargo, which is a no-op
/// when it is up to date (CI builds the workspace before testing).
pub fn nms_binary() -> PathBuf {
    // CI builds the whole workspace first and names the binary, so no nested build runs.
    if let Some(bin) = std::env::var_os("WAYSIDE_NMS_BIN").map(PathBuf::from) {
        assert!(bin.is_file(), "WAYSIDE_NMS_BIN={} is not a file", bin.display());
        return bin;
    }
    let out = Command::new(env!("CARGO"))
        .args(["build", "-p", "wayside-nms", "--bin", "nms", "--message-format=json"])
        .current_dir(workspace_root())
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "cargo build nms failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "nms" {
            if let Some(exe) = v["executable"].as_str() {
                return PathBuf::from(exe);
            }
        }
    }
    panic!("cargo did not report the nms executable");
}

/// Debian's kernel from the cache, fetched with apt-get if missing. `None` (after saying
/// SKIP) only when it really cannot be had (no apt-get, no network).
pub fn kernel() -> Option<KernelTree> {
    let dir = kernel::default_cache_dir();
    if let Ok(k) = KernelTree::locate(&dir, None) {
        return Some(k);
    }
    match kernel::fetch(&dir, None) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!(
                "SKIP: Debian's kernel is unobtainable here ({e}); run `unikernel fetch-kernel`"
            );
            None
        }
    }
}

/// Whether QEMU can be started at all.
pub fn qemu() -> bool {
    let ok = Command::new(wayside_unikernel::vm::qemu_binary())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
    }
    ok
}

/// A built image in `dir` with the default modules, stripped `/init`.
pub fn build_image(
    k: &KernelTree,
    dir: &Path,
    boot: wayside_nms::pid1::BootParams,
) -> wayside_unikernel::image::Manifest {
    build_image_from(&nms_binary(), k, dir, boot)
}

/// Like [`build_image`], from a given `nms` binary.
pub fn build_image_from(
    nms: &Path,
    k: &KernelTree,
    dir: &Path,
    boot: wayside_nms::pid1::BootParams,
) -> wayside_unikernel::image::Manifest {
    wayside_unikernel::image::build(&wayside_unikernel::image::BuildOptions {
        kernel: k.clone(),
        nms: nms.to_path_buf(),
        out_dir: dir.to_path_buf(),
        modules: kernel::DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
        boot,
        nms_config: None,
        strip: true,
    })
    .expect("image builds")
}

/// A one-node PSS (real Raft, gRPC, disk) listening on `ip` (a tap bridge's host address,
/// which guests on the bridge reach; `LocalCluster` binds loopback only). Stops on drop.
pub struct BridgePss {
    pub endpoint: wayside_proto::types::Endpoint,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl BridgePss {
    pub async fn start(ip: std::net::Ipv4Addr, dir: &Path) -> BridgePss {
        use wayside_proto::pb::pss_admin_client::PssAdminClient;
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind on the bridge");
        let addr = listener.local_addr().unwrap().to_string();
        let peers = vec![wayside_pss::config::Peer { id: 1, address: addr.clone() }];
        let config = wayside_pss::testing::test_config(1, peers, dir.to_path_buf());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(wayside_pss::server::run(config, listener, stop.clone()));
        let endpoint = wayside_proto::types::Endpoint::parse(&addr).unwrap();
        // Poll its status until it is leader (a deadline, not a blind wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let status = async {
                let mut c = PssAdminClient::connect(endpoint.uri().to_owned()).await.ok()?;
                c.status(wayside_proto::pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
            };
            if let Ok(Some(s)) =
                tokio::time::timeout(std::time::Duration::from_secs(1), status).await
            {
                if s.role == wayside_proto::pb::RaftRole::Leader as i32 {
                    break;
                }
            }
            assert!(std::time::Instant::now() < deadline, "the PSS on {addr} elected no leader");
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        BridgePss { endpoint, stop, task: Some(task) }
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for BridgePss {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Kills (SIGKILL) the QEMU of every state folder given, if still running, when dropped:
/// VMs started through the CLI are detached and would outlive a failed test otherwise.
pub struct QemuGuard(pub Vec<PathBuf>);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Ok(mut vm) = wayside_unikernel::vm::Vm::attach(dir) {
                if vm.is_alive() {
                    let pid = vm.state.pid as libc::pid_t;
                    // SAFETY: signalling the QEMU process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}
