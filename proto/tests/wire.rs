//! Encode/decode round trips of every message family, and wire -> domain conversion
//! with invalid inputs rejected by a clear error.

use prost::Message;
use wayside_proto::convert::{self, ConvertError};
use wayside_proto::pb;
use wayside_proto::types::{
    BlockChange, BlockSize, Credential, DeleteOp, Epoch, Fault, ReadOp, RequestId, WriteOp,
};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: M) {
    let bytes = m.encode_to_vec();
    let back = M::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(back, m);
}

fn rid(seq: u64) -> Option<pb::RequestId> {
    Some(pb::RequestId { client_id: "car-7".into(), seq })
}

fn auth() -> Option<pb::VolumeAuth> {
    Some(pb::VolumeAuth {
        volume: "car-7.home".into(),
        credential: "s3cret".into(),
        nms_session: 0,
        volume_incarnation: 2,
    })
}

#[test]
fn vehicle_api_messages_round_trip() {
    round_trip(pb::CreateVolumeRequest { auth: auth(), block_size: 4096, take_over: true });
    round_trip(pb::AttachRequest { auth: auth(), client_id: "car-7".into(), take_over: true });
    round_trip(pb::WriteRequest {
        auth: auth(),
        op: Some(pb::WriteOp {
            block: 9,
            offset: 12,
            data: vec![1, 2, 3].into(),
            request_id: rid(4),
        }),
    });
    round_trip(pb::ReadReply {
        found: true,
        data: vec![7; 4096].into(),
        version: 3,
        persisted_lsn: 2,
    });
    round_trip(pb::WriteReply { lsn: 5, version: 2, persisted_lsn: 4, duplicate: true });
    round_trip(pb::ListReply {
        blocks: vec![pb::BlockMeta { block: 1, version: 2, length: 4096 }],
        more: true,
        next_block: 2,
    });
    round_trip(pb::StreamRequest {
        auth: auth(),
        tag: 77,
        op: Some(pb::stream_request::Op::Read(pb::ReadOp { block: 1, offset: 0, length: 0 })),
    });
    round_trip(pb::StreamReply {
        tag: 77,
        result: Some(pb::stream_reply::Result::Error(pb::StreamError {
            code: tonic::Code::Unavailable as i32,
            message: "moved".into(),
            detail: Some(
                Fault::Moved { to: "http://10.0.0.2:7000".into(), epoch: Epoch(3) }.into(),
            ),
        })),
    });
    round_trip(pb::VolumeReply {
        info: Some(pb::VolumeInfo {
            volume: "v".into(),
            block_size: 4096,
            epoch: 2,
            owner_node: "rsu-1".into(),
            cached_blocks: 1,
            cached_bytes: 4096,
            dirty_bytes: 0,
            accepted_lsn: 9,
            persisted_lsn: 9,
            stored_blocks: 1,
            nms_session: 7,
            writeback_refused: "max_blocks".into(),
            migrating_out: true,
            incarnation: 3,
            predecessor_session: 5,
            predecessor_incarnation: 2,
            predecessor_through_lsn: 8,
            ancestors: vec![pb::CopyRef { session: 4, incarnation: 1, through_lsn: 6 }],
        }),
    });
}

#[test]
fn admin_and_migration_messages_round_trip() {
    round_trip(pb::MigrationReport {
        volume: "v".into(),
        source_node: "rsu-1".into(),
        target_address: "http://127.0.0.1:1".into(),
        new_epoch: 4,
        rounds: vec![pb::RoundReport {
            round: 1,
            blocks: 10,
            bytes: 40960,
            duration_us: 90,
            unfinished: true,
        }],
        total_us: 1000,
        pause_us: 80,
        bytes_moved: 40960,
        blocks_moved: 10,
        outcome: pb::MigrationOutcome::Completed as i32,
        error: String::new(),
        started_unix_ms: 1,
        writeback_drain_us: 30,
        claim_us: 2000,
        setup_us: 500,
    });
    for frame in [
        pb::migration_frame::Frame::Begin(pb::MigrationBegin {
            migration_id: 1,
            volume: "v".into(),
            block_size: 4096,
            source_epoch: 2,
            source_node: "a".into(),
            source_address: "http://127.0.0.1:2".into(),
            credential_hash: vec![0; 32],
            cached_bytes: 1 << 20,
            source_session: 7,
            source_incarnation: 3,
            source_lineage: vec![pb::CopyRef { session: 5, incarnation: 2, through_lsn: 8 }],
        }),
        pb::migration_frame::Frame::Blocks(pb::MigrationBlocks {
            round: 1,
            blocks: vec![
                pb::MigratedBlock {
                    block: 3,
                    data: vec![1; 10].into(),
                    version: 2,
                    dirty: true,
                    deleted: false,
                    lsn: 8,
                    heat: 5,
                    forget: false,
                },
                pb::MigratedBlock { block: 4, forget: true, ..Default::default() },
            ],
        }),
        pb::migration_frame::Frame::RequestIds(pb::RequestIds {
            round: 1,
            runs: vec![pb::AppliedRun {
                client_id: "d".into(),
                seq: vec![1, 2],
                lsn: vec![2, 3],
                version: vec![7, 1],
            }],
        }),
        pb::migration_frame::Frame::RoundEnd(pb::RoundEnd { round: 1, blocks: 1, bytes: 10 }),
        pb::migration_frame::Frame::SwitchOver(pb::SwitchOver {
            accepted_lsn: 9,
            persisted_lsn: 7,
            applied: vec![pb::AppliedRun {
                client_id: "c".into(),
                seq: vec![3],
                lsn: vec![9],
                version: vec![4],
            }],
            expected_epoch: 2,
        }),
        pb::migration_frame::Frame::Abort(pb::MigrationAbort { reason: "target full".into() }),
        pb::migration_frame::Frame::Claim(pb::Claim { expected_epoch: 2 }),
    ] {
        round_trip(pb::MigrationFrame { frame: Some(frame) });
    }
    for ack in [
        pb::migration_ack::Ack::Ready(pb::MigrationReady { target_node: "b".into() }),
        pb::migration_ack::Ack::Claimed(pb::Claimed { new_epoch: 3 }),
    ] {
        round_trip(pb::MigrationAck { ack: Some(ack) });
    }
    round_trip(pb::MigrationAck {
        ack: Some(pb::migration_ack::Ack::Switched(pb::Switched {
            new_epoch: 3,
            target_address: "http://127.0.0.1:3".into(),
        })),
    });
}

#[test]
fn pss_messages_round_trip() {
    round_trip(pb::AcquireVolumeRequest {
        volume: "v".into(),
        owner_node: "rsu-2".into(),
        owner_address: "http://127.0.0.1:4".into(),
        owner_session: 0,
        expected_epoch: 3,
        create: Some(pb::CreateSpec { block_size: 65536, credential_hash: vec![9; 32] }),
        request_id: rid(1),
    });
    round_trip(pb::WriteBatchRequest {
        volume: "v".into(),
        epoch: 3,
        request_id: rid(2),
        ops: vec![
            BlockChange::Put { block: 1, data: vec![5; 100], version: 2 }.into(),
            BlockChange::Delete { block: 2, version: 3 }.into(),
        ],
        persisted_lsn: 11,
    });
    round_trip(pb::GetBlocksReply {
        blocks: vec![pb::PssBlock { block: 1, found: true, data: vec![1], version: 1 }],
    });
    round_trip(pb::StatusReply {
        id: 1,
        role: pb::RaftRole::Leader as i32,
        term: 4,
        leader_id: 1,
        leader_address: "http://127.0.0.1:5".into(),
        commit_index: 10,
        applied_index: 10,
        first_index: 1,
        last_index: 10,
        snapshot_index: 0,
        members: vec![pb::Member {
            id: 2,
            address: "http://127.0.0.1:6".into(),
            role: pb::MemberRole::Learner as i32,
        }],
        pipeline_messages: 3,
        pipeline_requests: 40,
        snapshot_failures: 2,
    });
    round_trip(pb::PipelineRequests {
        requests: vec![pb::PipelineRequest {
            tag: 9,
            request: Some(pb::pipeline_request::Request::Get(pb::GetBlocksRequest {
                volume: "car-1".into(),
                blocks: vec![1, 2],
                consistency: 0,
            })),
        }],
    });
    round_trip(pb::PipelineReplies {
        replies: vec![pb::PipelineReply {
            tag: 9,
            result: Some(pb::pipeline_reply::Result::Error(pb::StreamError {
                code: 5,
                message: "volume car-1 does not exist".into(),
                detail: None,
            })),
        }],
    });
    round_trip(pb::RaftEnvelope { from: 1, to: 2, messages: vec![vec![1, 2], vec![]] });
    round_trip(pb::SnapshotChunk {
        from: 1,
        to: 3,
        message: vec![1],
        data: vec![2; 64],
        last: true,
    });
}

#[test]
fn smf_messages_round_trip() {
    round_trip(pb::Road {
        rsus: vec![pb::Rsu {
            name: "RSU 5".into(),
            position_m: 1200.0,
            coverage_radius_m: 487.0,
            nms_address: "http://127.0.0.1:7".into(),
        }],
        handover_execution_s: 1.0,
        time_to_handover_s: 4.0,
    });
    round_trip(pb::MoveDecision {
        kind: pb::MoveKind::Proactive as i32,
        from_rsu: "RSU 4".into(),
        to_rsu: "RSU 5".into(),
        handover_at_s: 30.5,
        start_at_s: 24.0,
        proactive_x_s: 6.5,
        predicted_smt_s: 0.08,
        dwell_s: 22.4,
        reason: String::new(),
    });
    round_trip(pb::ListMovesReply {
        moves: vec![pb::MoveRecord { vehicle: "car".into(), ok: true, ..Default::default() }],
    });
}

#[test]
fn vehicle_ops_convert_and_reject_bad_input() {
    let (v, c) = convert::volume_auth(auth()).unwrap();
    assert_eq!(v.as_str(), "car-7.home");
    assert_eq!(c.expose(), "s3cret");

    assert_eq!(convert::volume_auth(None), Err(ConvertError::Missing("auth")));
    let bad_name =
        pb::VolumeAuth { volume: "../etc".into(), credential: "x".into(), ..Default::default() };
    let err = convert::volume_auth(Some(bad_name)).unwrap_err();
    assert!(err.to_string().contains("volume"), "{err}");
    let no_cred =
        pb::VolumeAuth { volume: "v".into(), credential: String::new(), ..Default::default() };
    assert!(convert::volume_auth(Some(no_cred)).unwrap_err().to_string().contains("credential"));

    let w: WriteOp = convert::required_op(
        "op",
        Some(pb::WriteOp { block: 1, offset: 4, data: vec![1; 8].into(), request_id: rid(9) }),
    )
    .unwrap();
    assert_eq!(w.request_id, Some(RequestId::new("car-7", 9).unwrap()));
    assert_eq!(pb::WriteOp::from(&w).offset, 4);

    let oversized =
        pb::WriteOp { block: 1, offset: 0, data: vec![0; (1 << 20) + 1].into(), request_id: None };
    let err = WriteOp::try_from(oversized).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    let zero_seq = pb::WriteOp { block: 1, offset: 0, data: vec![1].into(), request_id: rid(0) };
    assert!(WriteOp::try_from(zero_seq).unwrap_err().to_string().contains("request_id"));
    assert_eq!(
        convert::required_op::<pb::ReadOp, ReadOp>("op", None),
        Err(ConvertError::Missing("op"))
    );
    let r: ReadOp = pb::ReadOp { block: 2, offset: 0, length: 0 }.try_into().unwrap();
    assert_eq!(r.len, None);
    let d: DeleteOp = pb::DeleteOp { block: 3, request_id: None }.try_into().unwrap();
    assert_eq!(d.block, 3);

    let status: tonic::Status = err_status();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

fn err_status() -> tonic::Status {
    convert::volume_name("").unwrap_err().into()
}

#[test]
fn block_sizes_and_pss_ops_are_checked() {
    for ok in [4096, 65536, 1 << 20] {
        convert::block_size(ok).unwrap();
    }
    for bad in [0, 1000, 4095, 2048, 3 << 12, 2 << 20] {
        assert!(convert::block_size(bad).is_err(), "{bad} accepted");
    }
    let bs = BlockSize::new(4096).unwrap();
    let put = pb::PssBlockOp { block: 1, data: vec![0; 4097], delete: false, version: 1 };
    assert!(BlockChange::from_pb(put, bs).unwrap_err().to_string().contains("4096-byte"));
    let del = pb::PssBlockOp { block: 1, data: vec![], delete: true, version: 2 };
    assert_eq!(
        BlockChange::from_pb(del, bs).unwrap(),
        BlockChange::Delete { block: 1, version: 2 }
    );
}

#[test]
fn endpoints_normalise_and_reject_garbage() {
    let e = convert::endpoint("pss", "127.0.0.1:7000").unwrap();
    assert_eq!(e.uri(), "http://127.0.0.1:7000");
    assert_eq!(e.authority(), "127.0.0.1:7000");
    assert_eq!(convert::endpoint("pss", "https://[::1]:9/").unwrap().uri(), "https://[::1]:9");
    for bad in ["", "host", "host:0", "host:99999", "ftp://h:1", ":80", "a/b:1"] {
        assert!(convert::endpoint("pss", bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn credentials_hash_and_compare() {
    let c = Credential::new("s3cret").unwrap();
    let h = c.hash();
    assert!(h.matches(&c));
    assert!(!h.matches(&Credential::new("s3creT").unwrap()));
    assert_eq!(convert::credential_hash(&h.0).unwrap(), h);
    assert!(convert::credential_hash(&[1, 2]).is_err());
    assert_eq!(format!("{c:?}"), "Credential(***)");
}

#[test]
fn faults_travel_in_status_details() {
    use wayside_proto::error::{fault_of, fault_status, status_of_stream_error, stream_error};
    let faults = [
        Fault::Moved { to: "http://127.0.0.1:9000".into(), epoch: Epoch(7) },
        Fault::NotOwner {
            owner_node: "rsu-3".into(),
            owner_address: "http://a:1".into(),
            epoch: Epoch(2),
        },
        Fault::NotLeader {
            leader_id: Some(2),
            leader_address: Some("http://127.0.0.1:7001".into()),
        },
        Fault::NotLeader { leader_id: None, leader_address: None },
        Fault::StaleEpoch { presented: Epoch(1), current: Epoch(2) },
        Fault::LimitExceeded {
            limit: "dirty_bytes_per_volume".into(),
            unit: "bytes".into(),
            value: 9,
            max: 8,
        },
    ];
    for f in faults {
        let status = fault_status(f.clone(), "because");
        assert_eq!(status.message(), "because");
        assert_eq!(fault_of(&status), Some(f.clone()));
        let via_stream = status_of_stream_error(stream_error(&status));
        assert_eq!(via_stream.code(), status.code());
        assert_eq!(fault_of(&via_stream), Some(f));
    }
    assert_eq!(fault_of(&tonic::Status::unavailable("plain")), None);
    let garbage =
        tonic::Status::with_details(tonic::Code::Unavailable, "x", vec![0xff, 0xff].into());
    assert_eq!(fault_of(&garbage), None);
    let empty = pb::ErrorDetail { kind: None };
    assert_eq!(Fault::try_from(empty), Err(ConvertError::EmptyDetail));
    let bad_redirect = pb::ErrorDetail {
        kind: Some(pb::error_detail::Kind::Moved(pb::Redirect {
            address: "nowhere".into(),
            epoch: 1,
        })),
    };
    assert!(Fault::try_from(bad_redirect).is_err());
}
