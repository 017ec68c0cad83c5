//! The `nms` subcommands for people: `serve`, the volume commands (`create`, `put`, `get`,
//! `flush`, `stat`) and the operator commands (`migrate`, `status`, `shutdown`).
//! `main.rs` only parses and dispatches here.

use crate::client::{ClientOptions, VolumeClient};
use crate::config::Config;
use anyhow::{bail, Context as _};
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;
use wayside_proto::pb;
use wayside_proto::token::{self, ClusterToken};
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};

/// `nms serve`: flags override the config file.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:7100 (0 as port: any free port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address vehicles and other NMSs use to reach this node (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// PSS node addresses, comma-separated: 127.0.0.1:7001,127.0.0.1:7002
    #[arg(long, value_delimiter = ',')]
    pub pss: Vec<String>,
    /// This node's name, recorded in the PSS as the owner of the volumes it serves.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Memory budget for cached blocks, in bytes.
    #[arg(long)]
    pub cache_capacity_bytes: Option<u64>,
    /// Block buffers faulted in at start for incoming blocks, in bytes (0: none).
    #[arg(long)]
    pub block_pool_bytes: Option<u64>,
    /// This node's certificate chain (PEM; overrides tls.cert): with --tls-key, serve
    /// vehicles, operators and other NMSs over TLS only (they present no certificate)
    /// and present it to the PSS.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of the certificate (PEM; overrides tls.key).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The road's CA certificate (PEM; overrides tls.ca): dial the PSS and other NMSs over
    /// TLS only, trusting servers it signed (needed with a certificate).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

/// Runs `nms serve` until SIGINT/SIGTERM or an admin Shutdown.
pub async fn serve(mut config: Config, a: ServeArgs) -> anyhow::Result<()> {
    if let Some(l) = a.listen {
        config.listen = l;
    }
    if let Some(x) = a.advertise {
        config.advertise = x;
    }
    if !a.pss.is_empty() {
        config.pss = a.pss;
    }
    if let Some(n) = a.node_id {
        config.node_id = n;
    }
    if let Some(c) = a.cache_capacity_bytes {
        config.cache_capacity_bytes = c;
    }
    if let Some(b) = a.block_pool_bytes {
        config.block_pool_bytes = b;
    }
    if let Some(c) = a.tls_cert {
        config.tls.cert = Some(c);
    }
    if let Some(k) = a.tls_key {
        config.tls.key = Some(k);
    }
    if let Some(c) = a.tls_ca {
        config.tls.ca = Some(c);
    }
    if let Some(t) = ClusterToken::from_env().map_err(anyhow::Error::msg)? {
        config.cluster_token = Some(t);
    }
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Tests and scripts read the bound port from this line.
    println!("listening on {}", listener.local_addr()?);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signals = {
        let s = shutdown.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = s.cancelled() => return anyhow::Ok(()),
            }
            tracing::info!("signal: shutting down");
            s.cancel();
            anyhow::Ok(())
        }
    };
    let (r, _) = tokio::join!(
        async {
            let r = crate::server::run(config, listener, shutdown.clone()).await;
            shutdown.cancel();
            r
        },
        signals
    );
    r
}

/// How a vehicle's or operator's command reaches the NMSs: over TLS with the road's CA.
/// (NMSs and the SMF ask callers for no certificate: a vehicle has none, and the volume's
/// credential or the cluster token authenticates the call, over the encrypted channel.)
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The road's CA certificate (PEM): dial NMSs over TLS only, trusting servers it signed
    /// (every address, redirects included, whatever its scheme). Unset: plaintext, and an
    /// https:// address is refused.
    #[arg(long, env = "WAYSIDE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS set-up to dial with (`None`: plaintext, said on stderr: the volume's
    /// credential and data then cross the network unencrypted).
    pub fn load(&self) -> anyhow::Result<Option<wayside_proto::tls::Tls>> {
        let files = wayside_proto::tls::TlsFiles { ca: self.tls_ca.clone(), ..Default::default() };
        let tls = wayside_proto::tls::Tls::load(&files).context("--tls-ca")?;
        if tls.is_none() {
            eprintln!(
                "warning: no --tls-ca (WAYSIDE_TLS_CA): dialling the NMS in plaintext; the \
                 volume's credential and data cross the network unencrypted"
            );
        }
        Ok(tls)
    }
}

/// How an operator's command (migrate, status, shutdown) reaches an NMS: over TLS with the
/// road's CA, presenting an operator's road certificate (an NMS on TLS takes admin calls
/// only from callers that present one, as well as the cluster token).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OperatorTlsArgs {
    /// The road's CA certificate (PEM): dial over TLS only, trusting servers it signed.
    /// Unset: plaintext, and an https:// address is refused.
    #[arg(long, env = "WAYSIDE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The operator's certificate (PEM), signed by the road's CA: what an NMS on TLS
    /// requires of admin callers.
    #[arg(long, env = "WAYSIDE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "WAYSIDE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl OperatorTlsArgs {
    /// The TLS set-up to dial with (`None`: plaintext).
    pub fn load(&self) -> anyhow::Result<Option<wayside_proto::tls::Tls>> {
        let files = wayside_proto::tls::TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        let tls = wayside_proto::tls::Tls::load(&files).context("--tls-ca/--tls-cert/--tls-key")?;
        if tls.as_ref().is_some_and(|t| !t.has_ca()) {
            bail!("--tls-cert and --tls-key need --tls-ca (the road's CA) to dial over TLS");
        }
        Ok(tls)
    }
}

/// Which volume, where, with which secret.
#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    /// NMS addresses to try, comma-separated (first preferred).
    #[arg(long, value_delimiter = ',', env = "WAYSIDE_NMS", required = true)]
    pub nms: Vec<String>,
    /// Volume name ([A-Za-z0-9._-], up to 128 bytes).
    #[arg(long)]
    pub volume: String,
    /// The volume's secret (prefer the environment variable to keep it out of `ps`).
    #[arg(long, env = "WAYSIDE_CREDENTIAL", hide_env_values = true)]
    pub credential: String,
    /// Longest one operation may take (retries included), in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl VolumeArgs {
    fn options(&self) -> anyhow::Result<ClientOptions> {
        let nms = self
            .nms
            .iter()
            .map(|a| Endpoint::parse(a).with_context(|| format!("--nms {a:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let volume = VolumeName::new(&self.volume).context("--volume")?;
        let credential = Credential::new(&self.credential).context("--credential")?;
        let mut o = ClientOptions::new(nms, volume, credential);
        o.op_timeout = Duration::from_millis(self.timeout_ms);
        o.tls = self.tls.load()?;
        Ok(o)
    }
    async fn open(&self, create: Option<BlockSize>) -> anyhow::Result<VolumeClient> {
        let mut o = self.options()?;
        o.create_block_size = create;
        Ok(VolumeClient::open(o).await?)
    }
}

/// The volume commands.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (or attach to it if it exists with the same block size).
    Create {
        #[command(flatten)]
        v: VolumeArgs,
        /// Block size in bytes: a power of two from 4096 to 1048576.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
    },
    /// Write bytes (from --data, --file or stdin) starting at a block; long input fills
    /// consecutive blocks. Flushes before returning, so the data is persisted.
    Put {
        #[command(flatten)]
        v: VolumeArgs,
        #[arg(long)]
        block: u64,
        /// Byte offset inside the first block.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// The bytes to write, as text.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// A file to write.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Read a block (or part) to stdout.
    Get {
        #[command(flatten)]
        v: VolumeArgs,
        #[arg(long)]
        block: u64,
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Bytes to read (default: to the end of the block).
        #[arg(long)]
        len: Option<u32>,
    },
    /// Wait until every accepted write is persisted in the PSS.
    Flush {
        #[command(flatten)]
        v: VolumeArgs,
    },
    /// Print the volume's state on its NMS.
    Stat {
        #[command(flatten)]
        v: VolumeArgs,
    },
}

/// Runs a volume command.
pub async fn volume(cmd: VolumeCmd) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::Create { v, block_size } => {
            let bs = BlockSize::new(block_size).context("--block-size")?;
            let c = v.open(Some(bs)).await?;
            print_info(&c.stat().await?);
        }
        VolumeCmd::Put { v, block, offset, data, file } => {
            let bytes = match (data, file) {
                (Some(d), _) => d.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (None, None) => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
            };
            let c = v.open(None).await?;
            let bs = c.block_size().bytes() as usize;
            if offset as usize >= bs {
                bail!("--offset {offset} is outside a {bs}-byte block");
            }
            let (mut blk, mut off, mut rest) = (block, offset as usize, &bytes[..]);
            loop {
                let n = rest.len().min(bs - off);
                let ack = c.write(blk, u32::try_from(off)?, rest[..n].to_vec()).await?;
                println!("block {blk}: {n} bytes accepted at lsn {}", ack.lsn.0);
                rest = &rest[n..];
                if rest.is_empty() {
                    break;
                }
                blk += 1;
                off = 0;
            }
            println!("persisted through lsn {}", c.flush().await?.0);
        }
        VolumeCmd::Get { v, block, offset, len } => {
            let c = v.open(None).await?;
            match c.read(block, offset, len).await? {
                Some(d) => std::io::stdout().write_all(&d)?,
                None => bail!("block {block} was never written"),
            }
        }
        VolumeCmd::Flush { v } => {
            let c = v.open(None).await?;
            println!("persisted through lsn {}", c.flush().await?.0);
        }
        VolumeCmd::Stat { v } => {
            let c = v.open(None).await?;
            print_info(&c.stat().await?);
            println!("nms            {}", c.current_nms());
        }
    }
    Ok(())
}

fn print_info(i: &pb::VolumeInfo) {
    println!("volume         {}", i.volume);
    println!("block_size     {} bytes", i.block_size);
    println!("epoch          {}", i.epoch);
    println!("owner_node     {}", i.owner_node);
    println!("cached         {} blocks, {} bytes", i.cached_blocks, i.cached_bytes);
    println!("dirty          {} bytes", i.dirty_bytes);
    println!("accepted_lsn   {}", i.accepted_lsn);
    println!("persisted_lsn  {}", i.persisted_lsn);
    if !i.writeback_refused.is_empty() {
        println!("write-back     REFUSED by the PSS: {}", i.writeback_refused);
    }
}

/// `nms migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The volume to move.
    #[arg(long)]
    pub volume: String,
    /// The NMS that serves it now (admin address).
    #[arg(long)]
    pub from: String,
    /// The NMS to move it to.
    #[arg(long)]
    pub to: String,
    /// Most pre-copy rounds (0: the source's default).
    #[arg(long, default_value_t = 0)]
    pub max_rounds: u32,
    /// Switch once a round is below this many bytes (0: the source's default).
    #[arg(long, default_value_t = 0)]
    pub switch_below_bytes: u64,
    /// Give up waiting for the source's report after this long, in milliseconds (the move
    /// itself ends by the source's own limits: migration_timeout_ms and the PSS's).
    #[arg(long, default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub tls: OperatorTlsArgs,
}

/// The cluster token the operator commands present: `WAYSIDE_CLUSTER_TOKEN`, if set.
fn operator_token() -> anyhow::Result<Option<ClusterToken>> {
    ClusterToken::from_env().map_err(anyhow::Error::msg)
}

/// An admin call's failure for people: its status, what caused it here (a status made
/// from a transport error carries the cause) and, for a plaintext caller whose connection
/// the NMS dropped, the likely reason.
fn admin_failed(s: tonic::Status, tls: Option<&wayside_proto::tls::Tls>) -> anyhow::Error {
    let mut text = format!("{}: {}", s.code(), s.message());
    if let Some(cause) = crate::client::status_cause(&s) {
        text = format!("{text}: {cause}");
        if tls.is_none() {
            text.push_str(
                " (if the NMS serves TLS, give the road's CA: --tls-ca or WAYSIDE_TLS_CA)",
            );
        }
    }
    anyhow::anyhow!(text)
}

/// An admin client for the NMS at `addr` (`host:port` or a URI), connected (3 s limit),
/// in plaintext.
pub async fn admin(
    addr: &str,
) -> anyhow::Result<pb::nms_admin_client::NmsAdminClient<tonic::transport::Channel>> {
    admin_over(addr, None).await
}

/// How long an operator's status or shutdown call may take (an NMS that accepts
/// connections but answers nothing, stopped or wedged, must not hang the command).
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// [`admin`] over TLS when `tls` is given (whatever scheme `addr` has); each call within
/// [`ADMIN_CALL_TIMEOUT`].
pub async fn admin_over(
    addr: &str,
    tls: Option<&wayside_proto::tls::Tls>,
) -> anyhow::Result<pb::nms_admin_client::NmsAdminClient<tonic::transport::Channel>> {
    admin_within(addr, tls, ADMIN_CALL_TIMEOUT).await
}

/// [`admin_over`], each call within `timeout`.
pub async fn admin_within(
    addr: &str,
    tls: Option<&wayside_proto::tls::Tls>,
    timeout: Duration,
) -> anyhow::Result<pb::nms_admin_client::NmsAdminClient<tonic::transport::Channel>> {
    let ep = Endpoint::parse(addr).with_context(|| format!("address {addr:?}"))?;
    let ch = wayside_proto::client::endpoint(&ep, tls)
        .map_err(|e| anyhow::anyhow!("{e} (give the road's CA: --tls-ca or WAYSIDE_TLS_CA)"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| {
            let why = crate::client::connect_failure(&e).text;
            let dialled = match tls {
                Some(_) => ep.https().to_string(),
                None => ep.to_string(),
            };
            anyhow::anyhow!("cannot reach NMS at {dialled}: {why}")
        })?;
    Ok(pb::nms_admin_client::NmsAdminClient::new(ch))
}

/// Runs a migration and prints its timeline.
pub async fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    VolumeName::new(&a.volume).context("--volume")?;
    let to = Endpoint::parse(&a.to).context("--to")?;
    let token = operator_token()?;
    let tls = a.tls.load()?;
    let mut c = admin_within(&a.from, tls.as_ref(), Duration::from_millis(a.timeout_ms))
        .await
        .context("--from")?;
    let req = pb::StartMigrationRequest {
        volume: a.volume.clone(),
        target_address: to.uri().to_owned(),
        max_rounds: a.max_rounds,
        switch_below_bytes: a.switch_below_bytes,
    };
    let r = c
        .start_migration(token::request(token.as_ref(), req))
        .await
        .map_err(|s| admin_failed(s, tls.as_ref()))?
        .into_inner();
    print!("{}", render_report(&r));
    if r.outcome != pb::MigrationOutcome::Completed as i32 {
        bail!("migration aborted: {}", r.error);
    }
    Ok(())
}

/// A migration report as a timeline for people.
pub fn render_report(r: &pb::MigrationReport) -> String {
    let mut s =
        format!("migration of {} from {} to {}\n", r.volume, r.source_node, r.target_address);
    if r.setup_us > 0 {
        s += &format!(
            "  target ready (connected, volume checked in the PSS): {:.3} ms\n",
            r.setup_us as f64 / 1e3
        );
    }
    // t: time since the move started.
    let mut t = r.setup_us;
    for x in &r.rounds {
        t += x.duration_us;
        s += &format!(
            "  round {:>2}: {:>7} blocks {:>11} bytes {:>9.3} ms (t={:.3} ms){}\n",
            x.round,
            x.blocks,
            x.bytes,
            x.duration_us as f64 / 1e3,
            t as f64 / 1e3,
            if x.unfinished {
                " unfinished: queued for the target when the move ended"
            } else {
                ""
            }
        );
    }
    if r.writeback_drain_us > 0 {
        s += &format!(
            "  write-back in flight committed before the switch: {:.3} ms\n",
            r.writeback_drain_us as f64 / 1e3
        );
    }
    if r.claim_us > 0 {
        s += &format!(
            "  the target raised the epoch before the switch (Claim): {:.3} ms\n",
            r.claim_us as f64 / 1e3
        );
    }
    let outcome = pb::MigrationOutcome::try_from(r.outcome).map_or("?", |o| o.as_str_name());
    s += &format!(
        "  outcome {outcome}; total {:.3} ms; pause {:.3} ms; {} blocks, {} bytes moved; new epoch {}\n",
        r.total_us as f64 / 1e3,
        r.pause_us as f64 / 1e3,
        r.blocks_moved,
        r.bytes_moved,
        r.new_epoch
    );
    if !r.error.is_empty() {
        s += &format!("  error: {}\n", r.error);
    }
    s
}

/// Prints a node's status.
pub async fn status(addr: &str, tls: &OperatorTlsArgs) -> anyhow::Result<()> {
    let req = token::request(operator_token()?.as_ref(), pb::NodeStatusRequest {});
    let tls = tls.load()?;
    let r = admin_over(addr, tls.as_ref())
        .await?
        .node_status(req)
        .await
        .map_err(|s| admin_failed(s, tls.as_ref()))?
        .into_inner();
    println!(
        "node {} at {}: {} volumes ({} idle ones unloaded to make room), {} / {} bytes \
         cached, {} / {} bytes dirty, {} bytes of block buffers ready{}, up {} ms",
        r.node,
        r.advertise_address,
        r.volumes,
        r.volumes_unloaded,
        r.cached_bytes,
        r.cache_capacity_bytes,
        r.dirty_bytes,
        r.dirty_limit_bytes,
        r.block_pool_free_bytes,
        if r.block_pool_filling { " (filling)" } else { "" },
        r.uptime_ms
    );
    for v in &r.volume_info {
        println!(
            "  {} epoch {} cached {} B dirty {} B accepted {} persisted {}",
            v.volume, v.epoch, v.cached_bytes, v.dirty_bytes, v.accepted_lsn, v.persisted_lsn
        );
        if !v.writeback_refused.is_empty() {
            println!("    write-back REFUSED by the PSS: {}", v.writeback_refused);
        }
    }
    Ok(())
}

/// Asks a node to drain, flush and exit.
pub async fn shutdown(addr: &str, tls: &OperatorTlsArgs) -> anyhow::Result<()> {
    let req = token::request(operator_token()?.as_ref(), pb::ShutdownRequest {});
    let tls = tls.load()?;
    admin_over(addr, tls.as_ref())
        .await?
        .shutdown(req)
        .await
        .map_err(|s| admin_failed(s, tls.as_ref()))?;
    println!("shutdown requested");
    Ok(())
}
