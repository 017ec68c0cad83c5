//! The NMS image on tap networking, through the CLI (`unikernel run --tap`, `unikernel
//! migrate --to-tap`, `unikernel stop`): the host side is a bridge with its own /24, the
//! guest gets an address on it from the kernel command line, the PSS listens on the
//! bridge's host address, and a vehicle client talks to the NMS in the VM at the guest's
//! own address. A live migration to a second tap keeps the client's reads and writes going
//! with nothing lost; one to a missing tap fails before QEMU starts and the source keeps
//! serving. Devices are removed by the `Bridge`'s Drop, QEMU by `QemuGuard`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::pid1::BootParams;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
use wayside_unikernel::tap::{self, Bridge};
use wayside_unikernel::vm::Vm;

const BLOCK: usize = 4096;

fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (seed as usize * 13 + i * 5) as u8).collect()
}

fn unikernel(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_unikernel"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running unikernel");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "unikernel {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn client(nms: &str) -> VolumeClient {
    let mut opts = ClientOptions::new(
        vec![Endpoint::parse(nms).unwrap()],
        VolumeName::new("vehicle-tap").unwrap(),
        Credential::new("secret-tap").unwrap(),
    );
    opts.create_block_size = Some(BlockSize::new(BLOCK as u32).unwrap());
    // TCG guests on a busy machine are slow; the migration switch breaks connections.
    opts.op_timeout = Duration::from_secs(60);
    VolumeClient::open(opts).await.expect("client attaches over the tap")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_run_serves_and_live_migrates_to_another_tap_losing_nothing() {
    if !tap::tun_available() {
        eprintln!("SKIP: /dev/net/tun is missing: no tap devices here");
        return;
    }
    let (Some(k), true) = (common::kernel(), common::qemu()) else { return };
    let bridge = Bridge::create().expect("bridge");
    let (tap0, tap1) = (bridge.add_tap().unwrap(), bridge.add_tap().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let pss = common::BridgePss::start(bridge.host_ip(), &dir.path().join("pss")).await;
    let img = dir.path().join("img");
    common::build_image(&k, &img, BootParams::default());
    let (st1, st2) = (dir.path().join("vm1"), dir.path().join("vm2"));
    std::fs::create_dir_all(&st2).unwrap();
    let _qemus = common::QemuGuard(vec![st1.clone(), st2.clone()]);
    let guest = bridge.guest_cidr(0).unwrap();

    // 1. Boot on tap0 with an address on the bridge's subnet; the PSS is on the host side.
    let t = Instant::now();
    let out = unikernel(&[
        "run",
        s(&img),
        "--state-dir",
        s(&st1),
        "--tap",
        &tap0,
        "--ip",
        &guest.to_string(),
        "--gw",
        &bridge.host_ip().to_string(),
        "--pss",
        pss.endpoint.authority(),
        "--node",
        "rsu-tap",
    ]);
    let nms = format!("{}:7000", guest.addr);
    assert!(out.contains(&format!("NMS serving at http://{nms}")), "{out}");
    eprintln!("booted on {tap0} in {} ms: {}", t.elapsed().as_millis(), out.trim());
    let vm = Vm::attach(&st1).unwrap();
    assert!(vm.state.cmdline.contains(&format!("wayside.advertise={nms}")), "{}", vm.state.cmdline);

    // 2. Blocks written and read over the tap, persisted in the PSS on the bridge address.
    let c = client(&nms).await;
    for b in 0..16u64 {
        c.write(b, 0, block(b)).await.unwrap();
    }
    for b in 0..16u64 {
        assert_eq!(c.read(b, 0, None).await.unwrap(), Some(block(b)), "block {b}");
    }
    c.flush().await.unwrap();
    let stat = c.stat().await.unwrap();
    assert!(stat.persisted_lsn > 0, "nothing persisted in the PSS over the bridge: {stat:?}");

    // 3. A migration to a tap that does not exist fails before any QEMU starts, and the
    //    source keeps serving (QEMU as root would otherwise create an unbridged tap).
    let missing = format!("{tap1}x");
    let out = Command::new(env!("CARGO_BIN_EXE_unikernel"))
        .args(["migrate", "--state-dir", s(&st1), "--to-state-dir", s(&st2), "--to-tap", &missing])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a migration to a missing tap succeeded");
    assert!(err.contains(&missing) && err.contains("does not exist"), "{err}");
    assert!(Vm::attach(&st1).unwrap().is_alive(), "the source must keep running");
    assert_eq!(c.read(3, 0, None).await.unwrap(), Some(block(3)), "the source still serves");

    // 4. Live migration to tap1 while the client keeps writing and reading.
    let acked: Arc<Mutex<u64>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                let (b, seed) = (100 + (i % 32), 1000 + i);
                c.write(b, 0, block(seed)).await.expect("write during migration");
                assert_eq!(
                    c.read(b, 0, None).await.expect("read during migration"),
                    Some(block(seed)),
                    "block {b} read back during migration"
                );
                i += 1;
                *acked.lock().await = i;
            }
            i
        })
    };
    let wait_for = |n: u64| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while *acked.lock().await < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            *acked.lock().await
        }
    };
    wait_for(5).await;
    let out = tokio::task::spawn_blocking({
        let (st1, st2, tap1) = (st1.clone(), st2.clone(), tap1.clone());
        move || {
            unikernel(&[
                "migrate",
                "--state-dir",
                s(&st1),
                "--to-state-dir",
                s(&st2),
                "--to-tap",
                &tap1,
            ])
        }
    })
    .await
    .unwrap();
    eprintln!("migrate --to-tap {tap1}: {out}");
    let report: serde_json::Value =
        serde_json::from_str(out.split("now running").next().unwrap().trim()).unwrap();
    assert!(report["ram_transferred_bytes"].as_u64().unwrap() > 0, "{report}");
    let dest = Vm::attach(&st2).unwrap();
    assert_eq!(
        dest.state.net,
        wayside_unikernel::vm::Net::Tap { ifname: tap1.clone() },
        "the destination runs on the second tap"
    );
    assert!(!Vm::attach(&st1).unwrap().is_alive(), "the source QEMU is gone");
    let before = *acked.lock().await;
    let after = wait_for(before + 5).await;
    stop.cancel();
    let writes = worker.await.unwrap();
    assert!(after >= before + 5, "no progress after the migration ({before} -> {after})");

    // 5. Nothing lost: the last write of every block, and the first 16, read back.
    let mut last = BTreeMap::new();
    for i in 0..writes {
        last.insert(100 + (i % 32), 1000 + i);
    }
    for (b, seed) in &last {
        assert_eq!(c.read(*b, 0, None).await.unwrap(), Some(block(*seed)), "block {b}");
    }
    for b in 0..16u64 {
        assert_eq!(c.read(b, 0, None).await.unwrap(), Some(block(b)), "block {b}");
    }
    c.flush().await.unwrap();

    // 6. Clean stop (flush, power off) through the CLI.
    let out = unikernel(&["stop", "--state-dir", s(&st2)]);
    assert!(out.contains("Clean"), "{out}");
    pss.shutdown().await;
    let (br, taps) = (bridge.name().to_string(), bridge.taps());
    drop(bridge);
    for dev in taps.iter().chain([&br]) {
        let gone =
            !Command::new("ip").args(["link", "show", dev]).output().unwrap().status.success();
        assert!(gone, "{dev} left behind");
    }
}
