//! The vehicle's data through the NMS in the VM, written back to a real PSS on the host:
//! it survives a stop and a fresh boot (served again from the PSS), and a QEMU live
//! migration while a client keeps writing and reading loses nothing.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::pid1::BootParams;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
use wayside_unikernel::image::Image;
use wayside_unikernel::vm::{self, Accel, Machine, Net, StopOutcome, Vm, VmOptions};

const BOOT_LIMIT: Duration = Duration::from_secs(180);
const BLOCK: usize = 4096;

fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (seed as usize * 31 + i * 7) as u8).collect()
}

async fn client(host_port: u16) -> VolumeClient {
    let mut opts = ClientOptions::new(
        vec![Endpoint::parse(&format!("127.0.0.1:{host_port}")).unwrap()],
        VolumeName::new("vehicle-vm").unwrap(),
        Credential::new("secret-vm").unwrap(),
    );
    opts.create_block_size = Some(BlockSize::new(BLOCK as u32).unwrap());
    // TCG guests on a busy machine are slow; a migration switch breaks connections.
    opts.op_timeout = Duration::from_secs(60);
    VolumeClient::open(opts).await.expect("client attaches")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_survives_a_fresh_boot_and_a_live_migration() {
    let (Some(k), true) = (common::kernel(), common::qemu()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cluster =
        wayside_pss::testing::LocalCluster::start(1, &dir.path().join("pss")).await.unwrap();
    // The PSS listens on host 127.0.0.1:P; user-mode networking shows the host's loopback
    // to the guest as 10.0.2.2. One node: no leader hints naming host-only addresses.
    let pss_port = cluster.endpoints()[0].authority().rsplit_once(':').unwrap().1.to_string();
    let boot = BootParams {
        pss: vec![Endpoint::parse(&format!("10.0.2.2:{pss_port}")).unwrap()],
        node: Some("rsu-vm".into()),
        ..BootParams::default()
    };
    let img_dir = dir.path().join("img");
    common::build_image(&k, &img_dir, BootParams::default());
    let image = Image::open(&img_dir, true).unwrap();
    let host_port = vm::free_port().unwrap();
    let opts = |state: &str| VmOptions {
        image: image.clone(),
        state_dir: dir.path().join(state),
        memory_mib: 512,
        cpus: 1,
        accel: Accel::Auto,
        machine: Machine::Microvm,
        net: Net::User { host_port },
        boot: boot.clone(),
        incoming: None,
        cluster_token: None,
        tls: None,
    };

    // 1. Boot; write through the NMS in the VM; flush (persisted in the PSS).
    let t = Instant::now();
    let mut vm1 = Vm::launch(&opts("vm1"), false).await.unwrap();
    vm1.wait_serving(BOOT_LIMIT).await.unwrap();
    eprintln!("vm1 serving after {} ms ({:?})", t.elapsed().as_millis(), vm1.state.accel);
    let c = client(host_port).await;
    for b in 0..16u64 {
        c.write(b, 0, block(b)).await.unwrap();
    }
    for b in 0..16u64 {
        assert_eq!(c.read(b, 0, None).await.unwrap(), Some(block(b)), "block {b}");
    }
    c.flush().await.unwrap();

    // 2. Stop: the clean path (NmsAdmin.Shutdown -> flush -> power off).
    assert_eq!(vm1.stop(Duration::from_secs(60), false).await.unwrap(), StopOutcome::Clean);
    assert!(!vm1.is_alive());
    drop(vm1);

    // 3. A fresh VM, empty cache: the data is served again, from the PSS.
    let mut vm2 = Vm::launch(&opts("vm2"), false).await.unwrap();
    vm2.wait_serving(BOOT_LIMIT).await.unwrap();
    let c = client(host_port).await;
    for b in 0..16u64 {
        assert_eq!(
            c.read(b, 0, None).await.unwrap(),
            Some(block(b)),
            "block {b} after a fresh boot"
        );
    }

    // 4. Live-migrate while the client keeps writing and reading.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                let b = 100 + (i % 64);
                let seed = 1000 + i;
                c.write(b, 0, block(seed)).await.expect("write during migration");
                assert_eq!(
                    c.read(b, 0, None).await.expect("read during migration"),
                    Some(block(seed))
                );
                acked.lock().await.push(i);
                i += 1;
            }
            i
        })
    };
    // Let some traffic flow first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().await.len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut vm3, report) = vm2.migrate(&dir.path().join("vm3"), None).await.unwrap();
    eprintln!("migration: {report:?}");
    assert!(report.ram_transferred_bytes > 0);
    // Traffic continues on the destination.
    let before = acked.lock().await.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().await.len() < before + 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let writes = worker.await.unwrap();
    assert!(
        acked.lock().await.len() >= before + 5,
        "the client made no progress after the migration"
    );
    // Nothing lost: the last write of every block reads back, and so do the first 16.
    let mut last = std::collections::BTreeMap::new();
    for i in 0..writes {
        last.insert(100 + (i % 64), 1000 + i);
    }
    for (b, seed) in &last {
        assert_eq!(
            c.read(*b, 0, None).await.unwrap(),
            Some(block(*seed)),
            "block {b} after migration"
        );
    }
    for b in 0..16u64 {
        assert_eq!(c.read(b, 0, None).await.unwrap(), Some(block(b)));
    }
    c.flush().await.unwrap();
    assert_eq!(vm3.stop(Duration::from_secs(60), false).await.unwrap(), StopOutcome::Clean);
    drop(vm2);
    cluster.shutdown().await;
}
