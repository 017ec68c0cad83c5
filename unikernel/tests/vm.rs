//! The image under real QEMU (TCG in CI, KVM when the probe says it works): it boots to a
//! serving NMS, answers over QMP, and stops.

mod common;

use std::time::{Duration, Instant};

use wayside_nms::pid1::BootParams;
use wayside_unikernel::image::Image;
use wayside_unikernel::vm::{self, Accel, Machine, Net, StopOutcome, Vm, VmOptions};

pub const BOOT_LIMIT: Duration = Duration::from_secs(120);

fn options(image: Image, state_dir: &std::path::Path, boot: BootParams) -> VmOptions {
    VmOptions {
        image,
        state_dir: state_dir.to_path_buf(),
        memory_mib: 512,
        cpus: 1,
        accel: Accel::Auto,
        machine: Machine::Microvm,
        net: Net::User { host_port: vm::free_port().unwrap() },
        boot,
        incoming: None,
        cluster_token: None,
        tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_to_the_health_check_answers_qmp_and_stops() {
    let (Some(k), true) = (common::kernel(), common::qemu()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let img_dir = dir.path().join("img");
    common::build_image(&k, &img_dir, BootParams::default());
    let image = Image::open(&img_dir, true).unwrap();
    // The NMS needs a PSS address to start; nothing is written here, so an unreachable
    // one will do (the data path has its own test, vm_data.rs).
    let boot = BootParams {
        pss: vec![wayside_proto::types::Endpoint::parse("10.0.2.2:9").unwrap()],
        ..BootParams::default()
    };
    let mut opts = options(image, &dir.path().join("vm"), boot);
    // The guest's NMS gets its cluster token through fw_cfg (not the command line).
    let token = wayside_proto::token::ClusterToken::new("vm-test-token-0123456789").unwrap();
    opts.cluster_token = Some(token.clone());
    // And its TLS files the same way: a road CA and a certificate for the forwarded
    // address (127.0.0.1).
    let ca = wayside_proto::tls::pki::Ca::new("vm test road").unwrap();
    let (names, ips) = wayside_proto::tls::pki::loopback();
    opts.tls = Some(ca.write_road(&dir.path().join("tls"), &names, &ips).unwrap());

    let started = Instant::now();
    let mut vm = Vm::launch(&opts, false).await.unwrap();
    vm.wait_serving(BOOT_LIMIT).await.unwrap();
    eprintln!("boot to serving: {} ms ({:?})", started.elapsed().as_millis(), vm.state.accel);

    // The guest really is our PID 1: the console shows the init's own messages.
    let serial = std::fs::read_to_string(&vm.state.serial_log).unwrap();
    assert!(serial.contains("wayside-init"), "serial log:\n{serial}");
    // The token came through fw_cfg, and the driver that read it is gone again.
    assert!(serial.contains("cluster token from fw_cfg"), "serial log:\n{serial}");
    assert!(!serial.contains("could not unload"), "serial log:\n{serial}");
    assert!(serial.contains("TLS files from fw_cfg"), "serial log:\n{serial}");
    // It serves TLS only: the health check above went over TLS (trusting the road's CA);
    // a plaintext one is refused.
    assert!(vm.state.nms_endpoint.starts_with("https://"), "{}", vm.state.nms_endpoint);
    let plain = vm.state.nms_endpoint.replace("https://", "http://");
    assert!(!vm::health_check(&plain, None, Duration::from_secs(2)).await, "plaintext answered");
    assert!(!vm.state.argv.iter().any(|a| a.contains("PRIVATE KEY")), "the key is in no argument");

    let status = vm.status().await.unwrap();
    assert!(status.running && status.nms_serving, "{status:?}");
    // A second VM on the same state folder is refused: it would orphan this one.
    let again = Vm::launch(&opts, false).await.err().expect("refused");
    assert!(again.to_string().contains("still runs"), "{again}");
    assert!(vm.status().await.unwrap().nms_serving, "the first VM is untouched");
    assert!(!vm.state.cmdline.contains("vm-test-token"), "the token is not on the command line");
    assert!(!vm.state.argv.iter().any(|a| a.contains("vm-test-token")), "nor QEMU's");

    // The guest's NMS requires the token: without it an admin call is refused, with it
    // answered.
    let tls = vm.tls().unwrap().expect("the VM's CA and certificate");
    let admin = || async {
        let ep = wayside_proto::types::Endpoint::parse(&vm.state.nms_endpoint).unwrap();
        let ch = wayside_proto::client::endpoint(&ep, Some(&tls)).unwrap().connect().await.unwrap();
        wayside_proto::pb::nms_admin_client::NmsAdminClient::new(ch)
    };
    let refused = admin().await.node_status(wayside_proto::pb::NodeStatusRequest {}).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    // The token without a road certificate (a vehicle that learned it) is refused too.
    let ca_only = wayside_proto::tls::Tls::load(&wayside_proto::tls::TlsFiles {
        ca: tls.files().ca.clone(),
        ..Default::default()
    })
    .unwrap()
    .unwrap();
    let ep = wayside_proto::types::Endpoint::parse(&vm.state.nms_endpoint).unwrap();
    let ch = wayside_proto::client::endpoint(&ep, Some(&ca_only)).unwrap().connect().await.unwrap();
    let uncertified = wayside_proto::pb::nms_admin_client::NmsAdminClient::new(ch)
        .node_status(token.request(wayside_proto::pb::NodeStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(uncertified.code(), tonic::Code::Unauthenticated);
    assert!(uncertified.message().contains("road certificate"), "{uncertified:?}");
    let answered =
        admin().await.node_status(token.request(wayside_proto::pb::NodeStatusRequest {})).await;
    assert!(answered.is_ok(), "{answered:?}");
    assert_eq!(status.qemu_status, "running");

    // A state-folder handle (what the CLI uses) sees the same VM.
    let mut attached = Vm::attach(&vm.state_dir).unwrap();
    assert!(attached.status().await.unwrap().nms_serving);

    // NmsAdmin.Shutdown -> the NMS stops -> PID 1 powers the VM off -> QEMU exits.
    assert_eq!(vm.stop(Duration::from_secs(60), false).await.unwrap(), StopOutcome::Clean);
    let serial = std::fs::read_to_string(&vm.state.serial_log).unwrap();
    assert!(serial.contains("stopped cleanly; powering off"), "serial log:\n{serial}");
    assert!(!vm.is_alive());
    assert!(
        !vm::health_check(&vm.state.nms_endpoint, Some(&tls), Duration::from_millis(300)).await
    );
    assert_eq!(vm.stop(Duration::ZERO, false).await.unwrap(), StopOutcome::AlreadyStopped);
}

#[test]
fn the_accelerator_probe_is_bounded_and_refuses_nonsense() {
    let (Some(k), true) = (common::kernel(), common::qemu()) else { return };
    // Whatever KVM does here (nested KVM hangs or aborts on these machines), the probe
    // answers within its limit plus QEMU's start-up.
    let t = Instant::now();
    let kvm = vm::probe_accel("kvm", &k.vmlinuz, vm::KVM_PROBE_TIMEOUT);
    let took = t.elapsed();
    eprintln!("kvm probe: works={kvm} in {} ms", took.as_millis());
    assert!(took < vm::KVM_PROBE_TIMEOUT + Duration::from_secs(5), "{took:?}");
    if kvm {
        assert!(std::path::Path::new("/dev/kvm").exists());
    }
    // An accelerator QEMU does not know is reported as not working rather than hanging.
    assert!(!vm::probe_accel("bogus", &k.vmlinuz, Duration::from_secs(5)));
}
