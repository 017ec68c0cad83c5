use anyhow::{bail, Context as _};
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

// glibc malloc spent ~10% of a loaded node in large-chunk bookkeeping (4 KiB blocks,
// multi-block Raft entries); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use wayside_proto::pb;
use wayside_proto::pb::pss_admin_client::PssAdminClient;
use wayside_proto::tls::{Tls, TlsFiles};
use wayside_proto::types::{Endpoint, RequestId, VolumeName};
use wayside_pss::client::{ClientOptions, PssClient};
use wayside_pss::config::{parse_peers, Config};

/// wayside's persistent storage service (PSS): a Raft-replicated block store on sled.
///
/// Start a 3-node cluster (one command per node, each with its own data dir):
///   pss serve --id 1 --listen 127.0.0.1:7401 --peers 1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403 --data-dir /var/lib/pss1
/// then talk to it:
///   pss --pss 127.0.0.1:7401,127.0.0.1:7402 status
///
/// With TLS (a `[tls]` config section, or --tls-cert/--tls-key/--tls-ca on `serve`) a node
/// serves over TLS only and requires every caller, its peers included, to present a
/// certificate signed by the road's CA; talk to it with a road certificate:
///   pss --tls-ca ca.pem --tls-cert operator.pem --tls-key operator.key --pss 127.0.0.1:7401 status
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Configuration file (TOML) for `serve`; flags override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    /// PSS nodes to talk to (client subcommands), comma-separated host:port.
    #[arg(
        long,
        global = true,
        env = "PSS_ENDPOINTS",
        default_value = "127.0.0.1:7400",
        value_delimiter = ','
    )]
    pss: Vec<String>,
    /// The road's CA certificate (PEM). Client subcommands: the PSS nodes' certificates are
    /// checked against it, and with it every node is dialled over TLS (whatever the scheme
    /// of --pss). `serve`: overrides the config file's tls.ca, what callers' and peers'
    /// certificates must be signed by (from the flag only: the environment variable is for
    /// the client subcommands and never changes what a node serves with).
    #[arg(long, global = true, env = "WAYSIDE_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// A certificate (PEM, leaf first) signed by the road's CA. Client subcommands: the one
    /// presented to the nodes (a PSS refuses callers without one); needs --tls-key and
    /// --tls-ca. add-node, remove-node, transfer-leader and compact-log need a PSS node's
    /// certificate (one naming a member's address); any road certificate reads and writes. `serve`: overrides tls.cert, what the node serves with and presents to its
    /// peers (from the flag only, as --tls-ca).
    #[arg(long, global = true, env = "WAYSIDE_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). `serve`: overrides
    /// tls.key (from the flag only, as --tls-ca).
    #[arg(long, global = true, env = "WAYSIDE_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a PSS node.
    Serve(ServeArgs),
    /// Show every reachable node's Raft status.
    Status,
    /// List the cluster's members.
    Members,
    /// Add a node: as a learner, then (unless --learner-only) as a voter once caught up.
    /// Start the new node first with `pss serve --join --id ID ...`.
    AddNode {
        /// The new node's id (> 0, unused).
        id: u64,
        /// The new node's gRPC address, host:port.
        address: String,
        /// Leave it a learner (it receives the log but does not vote).
        #[arg(long)]
        learner_only: bool,
    },
    /// Remove a node from the cluster.
    RemoveNode { id: u64 },
    /// Hand leadership to another voter.
    TransferLeader { id: u64 },
    /// Snapshot the state machine and compact the Raft log on every reachable node.
    CompactLog,
    /// Write FILE as block BLOCK of VOLUME (at most the volume's block size).
    Put {
        volume: String,
        block: u64,
        file: PathBuf,
        /// Owner epoch to write with (default: the volume's current epoch).
        #[arg(long)]
        epoch: Option<u64>,
        /// Create the volume with this block size in bytes if it does not exist.
        #[arg(long)]
        create_block_size: Option<u32>,
    },
    /// Print block BLOCK of VOLUME to stdout (or --out FILE).
    Get {
        volume: String,
        block: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// This node's Raft id (> 0).
    #[arg(long)]
    id: Option<u64>,
    /// gRPC listen address, host:port.
    #[arg(long)]
    listen: Option<String>,
    /// Initial members: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT (this node included).
    #[arg(long)]
    peers: Option<String>,
    /// Directory for the Raft log, snapshots and the state machine.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start empty and wait for `pss add-node` instead of bootstrapping from --peers.
    #[arg(long)]
    join: bool,
}

fn main() -> anyhow::Result<()> {
    let purge_delay_ms = wayside_pss::alloc::tune();
    wayside_proto::telemetry::init();
    tracing::debug!(purge_delay_ms, "mimalloc");
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `serve` takes TLS files from its flags only (see --tls-ca's help).
    let flagged = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let serve_tls = TlsFiles {
        cert: cli.tls_cert.clone().filter(|_| flagged("tls_cert")),
        key: cli.tls_key.clone().filter(|_| flagged("tls_key")),
        ca: cli.tls_ca.clone().filter(|_| flagged("tls_ca")),
    };
    let client_tls =
        TlsFiles { cert: cli.tls_cert.clone(), key: cli.tls_key.clone(), ca: cli.tls_ca.clone() };
    if cli.print_default_config {
        print!("{}", wayside_proto::config::render(&Config::default()));
        return Ok(());
    }
    let Some(command) = cli.command else {
        bail!("no subcommand given; try `pss --help`");
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match command {
            Command::Serve(args) => {
                let env_ignored = serve_tls != client_tls;
                if env_ignored {
                    tracing::warn!(
                        "WAYSIDE_TLS_* ignored by `pss serve`: it takes its TLS files from its \
                         config file's [tls] and --tls-* flags"
                    );
                }
                serve(cli.config, args, serve_tls, env_ignored).await
            }
            other => {
                let tls = load_client_tls(&client_tls)?;
                let endpoints = cli
                    .pss
                    .iter()
                    .map(|a| Endpoint::parse(a).with_context(|| format!("--pss {a:?}")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                client_command(endpoints, tls, other).await
            }
        }
    })
}

/// The client subcommands' TLS set-up from --tls-* (or WAYSIDE_TLS_*): `None`, plaintext,
/// when none is given.
fn load_client_tls(files: &TlsFiles) -> anyhow::Result<Option<Tls>> {
    let tls = Tls::load(files).context("TLS files (--tls-cert, --tls-key, --tls-ca)")?;
    if let Some(t) = &tls {
        if !t.has_ca() {
            bail!(
                "--tls-ca (or WAYSIDE_TLS_CA) is needed with --tls-cert: the road's CA \
                 certificate, which the PSS nodes' certificates are checked against"
            );
        }
        if !t.has_identity() {
            eprintln!(
                "warning: no --tls-cert/--tls-key: a PSS refuses callers without a \
                 certificate signed by the road's CA"
            );
        }
    }
    Ok(tls)
}

/// `env_ignored`: WAYSIDE_TLS_* was set (and ignored): a node that would then serve
/// plaintext refuses to start rather than surprise whoever set it.
async fn serve(
    config: Option<PathBuf>,
    args: ServeArgs,
    tls: TlsFiles,
    env_ignored: bool,
) -> anyhow::Result<()> {
    let mut cfg: Config = wayside_proto::config::load(config.as_deref())?;
    if let Some(id) = args.id {
        cfg.id = id;
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(p) = args.peers {
        cfg.peers = parse_peers(&p).context("--peers")?;
    }
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    cfg.join |= args.join;
    // Each flag overrides its own file; the rest stay as the config file has them.
    if let Some(c) = tls.cert {
        cfg.tls.cert = Some(c);
    }
    if let Some(k) = tls.key {
        cfg.tls.key = Some(k);
    }
    if let Some(ca) = tls.ca {
        cfg.tls.ca = Some(ca);
    }
    if env_ignored && cfg.tls.is_empty() {
        bail!(
            "WAYSIDE_TLS_* is set, but `pss serve` takes its TLS files only from its config's \
             [tls] or the --tls-cert/--tls-key/--tls-ca flags, and has none: it would serve \
             plaintext. Pass the flags (or unset WAYSIDE_TLS_* to serve plaintext)"
        );
    }
    cfg.validate().context("invalid configuration")?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let signals = tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            _ = token.cancelled() => {}
        }
        token.cancel();
    });
    let r = wayside_pss::server::run(cfg, listener, shutdown.clone()).await;
    shutdown.cancel();
    let _ = signals.await;
    r
}

async fn admin(
    ep: &Endpoint,
    tls: Option<&Tls>,
) -> anyhow::Result<PssAdminClient<tonic::transport::Channel>> {
    let ch = wayside_proto::client::endpoint(ep, tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {ep}"))?;
    Ok(PssAdminClient::new(ch))
}

fn role_name(role: i32) -> &'static str {
    match pb::RaftRole::try_from(role) {
        Ok(pb::RaftRole::Leader) => "leader",
        Ok(pb::RaftRole::Follower) => "follower",
        Ok(pb::RaftRole::Candidate) => "candidate",
        Ok(pb::RaftRole::PreCandidate) => "pre-candidate",
        _ => "unknown",
    }
}

fn print_members(m: &[pb::Member]) {
    println!("{:<6} {:<8} ADDRESS", "ID", "ROLE");
    for m in m {
        let role = if m.role == pb::MemberRole::Learner as i32 { "learner" } else { "voter" };
        println!("{:<6} {:<8} {}", m.id, role, m.address);
    }
}

async fn client_command(
    endpoints: Vec<Endpoint>,
    tls: Option<Tls>,
    command: Command,
) -> anyhow::Result<()> {
    let client =
        PssClient::new(endpoints.clone(), ClientOptions { tls: tls.clone(), ..Default::default() });
    match command {
        Command::Serve(_) => unreachable!("handled by main"),
        Command::Status => {
            println!(
                "{:<24} {:<4} {:<13} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9}",
                "NODE", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "FIRST", "LAST"
            );
            let mut any = false;
            for ep in &endpoints {
                let st = match admin(ep, tls.as_ref()).await {
                    Ok(mut c) => c.status(pb::StatusRequest {}).await.map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                match st {
                    Ok(st) => {
                        any = true;
                        let s = st.into_inner();
                        println!(
                            "{:<24} {:<4} {:<13} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9}",
                            ep.authority(),
                            s.id,
                            role_name(s.role),
                            s.term,
                            s.leader_id,
                            s.commit_index,
                            s.applied_index,
                            s.first_index,
                            s.last_index
                        );
                    }
                    Err(e) => println!("{:<24} unreachable: {e:#}", ep.authority()),
                }
            }
            if !any {
                bail!("no PSS node answered");
            }
        }
        Command::Members => {
            print_members(&client.members().await?.members);
        }
        // Membership changes wait for the cluster (a learner catching up, an election),
        // and follow the leader if it changes meanwhile.
        Command::AddNode { id, address, learner_only } => {
            let r = admin_client(endpoints, tls).add_node(id, &address, learner_only).await?;
            println!("node {id} added");
            print_members(&r.members);
        }
        Command::RemoveNode { id } => {
            let r = admin_client(endpoints, tls).remove_node(id).await?;
            println!("node {id} removed");
            print_members(&r.members);
        }
        Command::TransferLeader { id } => {
            let r = admin_client(endpoints, tls).transfer_leader(id).await?;
            println!("leader is now node {}", r.leader_id);
        }
        Command::CompactLog => {
            for ep in &endpoints {
                let mut c = admin(ep, tls.as_ref()).await?;
                let s = c.compact_log(pb::CompactLogRequest {}).await?.into_inner();
                println!("{}: log compacted up to index {}", ep.authority(), s.snapshot_index);
            }
        }
        Command::Put { volume, block, file, epoch, create_block_size } => {
            let name = VolumeName::new(volume.as_str()).context("VOLUME")?;
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let epoch = match (epoch, create_block_size) {
                (Some(e), _) => e,
                (None, create) => match client.get_volume(&name).await {
                    Ok(m) => m.epoch,
                    Err(wayside_pss::client::PssError::NotFound(_)) if create.is_some() => {
                        let req = pb::AcquireVolumeRequest {
                            volume: volume.clone(),
                            owner_node: "pss-cli".into(),
                            owner_address: String::new(),
                            owner_session: 0,
                            expected_epoch: 0,
                            create: Some(pb::CreateSpec {
                                block_size: create.unwrap_or_default(),
                                credential_hash: Vec::new(),
                            }),
                            request_id: Some((&cli_request_id()?).into()),
                        };
                        let r = client.acquire_volume(req).await?;
                        r.meta.map(|m| m.epoch).unwrap_or_default()
                    }
                    Err(e) => return Err(e).context("reading the volume's epoch"),
                },
            };
            let req = pb::WriteBatchRequest {
                volume,
                epoch,
                request_id: Some((&cli_request_id()?).into()),
                ops: vec![pb::PssBlockOp { block, data, delete: false, version: 0 }],
                persisted_lsn: 0,
            };
            let r = client.write_batch(req).await?;
            println!("block {block} written at raft index {} (epoch {epoch})", r.raft_index);
        }
        Command::Get { volume, block, out } => {
            let name = VolumeName::new(volume.as_str()).context("VOLUME")?;
            let b = client.get_blocks(&name, &[block]).await?;
            let Some(b) = b.into_iter().next().filter(|b| b.found) else {
                bail!("block {block} of volume {volume} has never been written");
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, &b.data)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "block {block} (version {}, {} bytes) -> {}",
                        b.version,
                        b.data.len(),
                        path.display()
                    );
                }
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&b.data)?;
                }
            }
        }
    }
    Ok(())
}

/// A client whose attempts may take as long as a membership change does.
fn admin_client(endpoints: Vec<Endpoint>, tls: Option<Tls>) -> PssClient {
    let opts = ClientOptions {
        tls,
        rpc_timeout: Duration::from_secs(60),
        deadline: Duration::from_secs(90),
        ..Default::default()
    };
    PssClient::new(endpoints, opts)
}

/// A request id unique to this CLI invocation.
fn cli_request_id() -> anyhow::Result<RequestId> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    Ok(RequestId::new(format!("pss-cli-{}-{nanos}", std::process::id()), 1)?)
}
