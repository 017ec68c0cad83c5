//! Two RSUs whose NMSs run as the unikernel image on taps of one bridge (the `--image`
//! road): a volume written through VM1 is moved by VM1's NMS (the NMS migrate API: real
//! wayside state migration between the VMs over the bridge) to VM2, and every acknowledged
//! write reads back from VM2. Heavy: boots two VMs (in parallel) under TCG.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_proto::pb::nms_admin_client::NmsAdminClient;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
use wayside_testbed::vmroad::{BridgePss, VmRoad, VmRoadOptions};
use wayside_unikernel::vm::StopOutcome;

const BLOCK: usize = 4096;

fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (seed as usize * 17 + i * 3) as u8).collect()
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !wayside_unikernel::tap::tun_available() {
        return Some("/dev/net/tun is missing: no tap devices".into());
    }
    let qemu = Command::new(wayside_unikernel::vm::qemu_binary()).arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    let kdir = wayside_unikernel::kernel::default_cache_dir();
    if wayside_unikernel::kernel::KernelTree::locate(&kdir, None).is_err() {
        wayside_unikernel::kernel::fetch(&kdir, None)
            .err()
            .map(|e| format!("Debian's kernel is unobtainable ({e}); run `unikernel fetch-kernel`"))
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_moves_between_two_nms_vms_over_taps_losing_nothing() {
    if let Some(why) = missing() {
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = VmRoad::network().unwrap();
    let pss = BridgePss::start(net.pss_bind_ip(), 1, &dir.path().join("pss")).await.unwrap();
    let names = vec!["rsu-1".to_string(), "rsu-2".to_string()];
    let opts = VmRoadOptions {
        nms_bin: common::wayside_binaries(["nms"]).into_iter().next(),
        boot_timeout: Duration::from_secs(240),
        ..VmRoadOptions::default()
    };
    // Bad input is refused before anything boots.
    let err = VmRoad::start_with(
        VmRoad::network().unwrap(),
        &names,
        &["127.0.0.1:1".to_string()],
        None,
        &opts,
    )
    .await
    .err()
    .expect("a loopback PSS is refused");
    assert!(err.to_string().contains("not on the bridge address"), "{err}");

    let t = Instant::now();
    let road = VmRoad::start_with(net, &names, &pss.endpoints(), None, &opts).await.unwrap();
    eprintln!("2 VMs serving after {} ms (parallel boots)", t.elapsed().as_millis());
    let addrs = road.addresses();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0], addrs[1]);
    let bridge_ip = road.pss_bind_ip().to_string();
    assert!(addrs.iter().all(|a| a.starts_with(&bridge_ip[..bridge_ip.len() - 1])), "{addrs:?}");

    // Write through VM1: some blocks flushed (clean in the cache), some left dirty.
    let mut copts = ClientOptions::new(
        vec![Endpoint::parse(&addrs[0]).unwrap()],
        VolumeName::new("vehicle-road").unwrap(),
        Credential::new("secret-road").unwrap(),
    );
    copts.create_block_size = Some(BlockSize::new(BLOCK as u32).unwrap());
    copts.op_timeout = Duration::from_secs(60);
    let c = VolumeClient::open(copts).await.unwrap();
    let mut acked = std::collections::BTreeMap::new();
    for b in 0..64u64 {
        c.write(b, 0, block(b)).await.unwrap();
        acked.insert(b, b);
    }
    c.flush().await.unwrap();
    for b in 32..96u64 {
        c.write(b, 0, block(b + 500)).await.unwrap();
        acked.insert(b, b + 500);
    }

    // VM1's NMS moves the volume to VM2's NMS, VM to VM over the bridge.
    let mut admin = NmsAdminClient::connect(format!("http://{}", addrs[0])).await.unwrap();
    let report = admin
        .start_migration(wayside_proto::pb::StartMigrationRequest {
            volume: "vehicle-road".into(),
            target_address: format!("http://{}", addrs[1]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "moved: total {} ms, pause {} ms, {} blocks, {} bytes",
        report.total_us / 1000,
        report.pause_us / 1000,
        report.blocks_moved,
        report.bytes_moved
    );
    assert_eq!(report.outcome(), wayside_proto::pb::MigrationOutcome::Completed, "{report:?}");
    assert!(report.blocks_moved >= 96, "the cached blocks moved: {report:?}");

    // Every acknowledged write reads back, now from VM2 (the client follows the redirect).
    for (b, seed) in &acked {
        assert_eq!(c.read(*b, 0, None).await.unwrap(), Some(block(*seed)), "block {b}");
    }
    assert_eq!(c.current_nms().authority(), addrs[1], "the client is served by VM2");
    let mut admin2 = NmsAdminClient::connect(format!("http://{}", addrs[1])).await.unwrap();
    let st =
        admin2.node_status(wayside_proto::pb::NodeStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.node, "rsu-2");
    assert!(st.volume_info.iter().any(|v| v.volume == "vehicle-road"), "{st:?}");
    c.flush().await.unwrap();

    let bridge = road.pss_bind_ip();
    let outcomes = road.shutdown().await.unwrap();
    assert_eq!(outcomes, vec![StopOutcome::Clean, StopOutcome::Clean]);
    let left = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!(" {bridge}/")),
        "the bridge was not removed"
    );
    pss.shutdown().await;
}

/// `testbed drive --image`: the SMF moves a driving vehicle's volume through three RSUs
/// whose NMSs are VMs booted from the image; nothing acknowledged is lost and every VM
/// stops cleanly (each NMS flushes to the PSS and powers off).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drive_on_unikernel_rsus_moves_twice_and_loses_nothing() {
    use tokio_util::sync::CancellationToken;
    use wayside_testbed::drive::{self, Deployment, Scenario};
    use wayside_testbed::mobility::a41_rsus;
    if let Some(why) = missing() {
        eprintln!("SKIP: {why}");
        return;
    }
    let sc = Scenario::short(a41_rsus()[..3].to_vec(), 50.0).unwrap();
    let deployment = Deployment::Image {
        image: None,
        options: VmRoadOptions {
            nms_bin: common::wayside_binaries(["nms"]).into_iter().next(),
            ..Default::default()
        },
    };
    let out = drive::run_scenario_on(sc.clone(), &deployment, CancellationToken::new())
        .await
        .expect("the drive runs");
    let summary = drive::summary(&sc, &out);
    eprintln!("{summary}\n{}", out.deployment);
    let ok: Vec<_> = out.moves.iter().filter(|m| m.ok).map(|m| (&m.from_rsu, &m.to_rsu)).collect();
    assert!(ok.len() >= 2, "{summary}\n{:#?}", out.moves);
    assert_eq!((ok[0].0.as_str(), ok[0].1.as_str()), ("RSU1", "RSU2"), "{:#?}", out.moves);
    assert_eq!((ok[1].0.as_str(), ok[1].1.as_str()), ("RSU2", "RSU3"), "{:#?}", out.moves);
    assert!(out.checked > 0, "{summary}");
    assert_eq!(out.lost, 0, "{summary}");
    assert_eq!(out.read_mismatches, 0, "{summary}");
    assert_eq!(out.unpersisted, 0, "{summary}");
    assert_eq!(drive::verdict(&out), Ok(()), "{summary}");
    assert!(out.deployment.contains("unikernel images"), "{}", out.deployment);
    assert!(out.deployment.contains("[Clean, Clean, Clean]"), "{}", out.deployment);
}
