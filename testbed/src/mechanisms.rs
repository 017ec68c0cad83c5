//! `testbed mechanisms`: the service migration time (SMT) of the NMS, measured by each
//! mechanism this machine offers, for a cached volume of a given size:
//! - `wayside`: wayside's state migration between two NMSs (hottest blocks first, a short
//!   pause, the owner epoch raised in the PSS); SMT = the source's reported total time;
//! - `wayside-vm`: the same, between two NMS images booted on taps of one bridge
//!   ([`crate::vmroad`]), so the NMS runs in the same (TCG or KVM) guest as below;
//! - `qemu-live`: QEMU live migration of the NMS image (the paper's "Unikernel KVM" route);
//!   SMT = starting the destination QEMU to the NMS serving there;
//! - `cold-boot`: a cold boot of the image on the next RSU plus the refill of the volume's
//!   cached blocks from the PSS; SMT = QEMU start to the last block read through it.
//!
//! A mechanism that cannot run here (no QEMU, no kernel) is reported as not available with
//! the reason, and the others still run. Then Table III is printed with the measured times
//! beside the paper's, and Tables V-VII are recomputed with the measured SMTs by
//! [`crate::paper::compute`] (the same equations as `testbed paper` and the SMF). The
//! report (`report.md`), the figures (`mechanisms.json`) and a plot of SMT per mechanism
//! against each RSU's dwell time (`smt-vs-dwell.svg`) go to `--out`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use wayside_nms::smf::model;
use wayside_unikernel::kernel::{self, KernelTree};
use wayside_unikernel::vm::Accel;

use crate::bench::image as img;
use crate::paper::{self, Inputs, Mechanism, Report};

/// A migration mechanism `testbed mechanisms` can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// wayside's state migration between two NMSs (no VM needed).
    Wayside,
    /// wayside's state migration between two NMS images on taps of one bridge.
    WaysideVm,
    /// QEMU live migration of the NMS image.
    QemuLive,
    /// Cold boot of the NMS image on the next RSU, then refill from the PSS.
    ColdBoot,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Wayside, Kind::WaysideVm, Kind::QemuLive, Kind::ColdBoot];

    /// The column name in the recomputed Tables V-VII.
    pub fn column(self) -> &'static str {
        match self {
            Kind::Wayside => "wayside",
            Kind::WaysideVm => "wayside-VM",
            Kind::QemuLive => "QEMU-live",
            Kind::ColdBoot => "cold-boot",
        }
    }

    /// The paper's Table III row it corresponds to, if any.
    pub fn paper_row(self) -> Option<&'static str> {
        match self {
            Kind::QemuLive => Some("Unikernels"),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Wayside => "wayside state migration between two NMSs",
            Kind::WaysideVm => "wayside state migration between two NMS images (VMs on taps)",
            Kind::QemuLive => "QEMU live migration of the NMS image",
            Kind::ColdBoot => "cold boot of the NMS image + refill from the PSS",
        }
    }
}

/// `testbed mechanisms` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Mechanisms to measure (repeatable) [default: all four].
    #[arg(long = "mechanism", value_enum)]
    pub mechanisms: Vec<Kind>,
    /// Size of the vehicle's cached volume every mechanism moves, MiB (4 KiB blocks).
    #[arg(long, default_value_t = 16)]
    pub volume_mib: u64,
    /// Output folder for report.md, mechanisms.json and smt-vs-dwell.svg.
    #[arg(long, default_value = "out/mechanisms")]
    pub out: PathBuf,
    /// The nms binary put into the image [default: the `nms` beside this program].
    #[arg(long)]
    pub nms: Option<PathBuf>,
    /// Unpacked kernel package or the fetch-kernel cache [default: the cache].
    #[arg(long)]
    pub kernel_dir: Option<PathBuf>,
    /// Guest memory of each VM, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u32,
    /// KVM, TCG or auto (KVM when a 2 s probe shows it works).
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// How long one boot may take, in seconds.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout_s: u64,
    /// Rounds: every mechanism is measured this many times, the order rotated each round
    /// (so none always runs first, on a cold machine, or last), each run against a fresh
    /// PSS of its own; a mechanism's SMT is the median of its runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
}

/// One mechanism's result.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub mechanism: Kind,
    pub column: String,
    /// The measured SMT in seconds; `None` when not available here.
    pub smt_s: Option<f64>,
    /// Why it could not be measured.
    pub not_available: Option<String>,
    /// How the SMT splits (e.g. QEMU downtime, boot vs refill), for the report.
    pub detail: String,
}

/// The whole result, as written to `mechanisms.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub volume_mib: u64,
    pub measurements: Vec<Measurement>,
    /// Tables IV-VII with the paper's four mechanisms and every measured one.
    pub tables: Report,
}

/// Why the image mechanisms cannot run here, if they cannot.
fn image_unavailable(args: &Args, nms: &Path) -> Option<String> {
    let qemu = wayside_unikernel::vm::qemu_binary();
    let ok = std::process::Command::new(&qemu)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Some(format!("{qemu} cannot be run (apt-get install qemu-system-x86)"));
    }
    let kdir = args.kernel_dir.clone().unwrap_or_else(kernel::default_cache_dir);
    if let Err(e) = KernelTree::locate(&kdir, None) {
        return Some(format!("no kernel ({e}); run `unikernel fetch-kernel`"));
    }
    if !nms.is_file() {
        return Some(format!(
            "no nms binary at {} (cargo build -p wayside-nms --bin nms, or --nms)",
            nms.display()
        ));
    }
    None
}

/// Measures the chosen mechanisms; one that fails or cannot run is reported, not fatal.
pub async fn measure(args: &Args) -> anyhow::Result<Vec<Measurement>> {
    anyhow::ensure!(args.volume_mib >= 1, "--volume-mib must be at least 1");
    let kinds: Vec<Kind> =
        if args.mechanisms.is_empty() { Kind::ALL.to_vec() } else { args.mechanisms.clone() };
    let work = tempfile::Builder::new().prefix("wayside-mechanisms").tempdir()?;
    let nms = args.nms.clone().unwrap_or_else(img::default_nms);
    let needs_image = kinds.iter().any(|k| *k != Kind::Wayside);
    let unavailable = if needs_image { image_unavailable(args, &nms) } else { None };
    let mut setup = None;
    if needs_image && unavailable.is_none() {
        let (image, manifest, t) =
            img::build(&nms, args.kernel_dir.as_deref(), &work.path().join("img"))?;
        println!(
            "image built in {} ms: {} bytes (kernel {})",
            t.as_millis(),
            manifest.image_bytes(),
            manifest.kernel_version
        );
        // The KVM probe boots a kernel for up to 2 s: once, off the runtime, for every VM.
        let accel = {
            let (a, k) = (args.accel, image.kernel_path());
            tokio::task::spawn_blocking(move || wayside_unikernel::vm::choose_accel(a, &k)).await?
        };
        println!("accelerator: {accel:?}");
        setup = Some(img::VmSetup {
            image,
            work: work.path().to_path_buf(),
            memory_mib: args.memory_mib,
            accel,
            // (Each run's own PSS port is set below.)
            pss_port: 0,
            boot_limit: Duration::from_secs(args.boot_timeout_s),
        });
    }
    let mut runs: Vec<Vec<anyhow::Result<(f64, String)>>> =
        kinds.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds as usize {
        for i in (0..kinds.len()).map(|i| (i + round) % kinds.len()) {
            let kind = kinds[i];
            println!(
                "round {}: measuring {} ({} MiB volume) ...",
                round + 1,
                kind.describe(),
                args.volume_mib
            );
            let dir = work.path().join(format!("run-{round}-{}", kind.column()));
            let result = measure_once(kind, args, &setup, &unavailable, &dir).await;
            match &result {
                Ok((smt_s, detail)) => println!("  SMT {smt_s:.3} s: {detail}"),
                Err(e) => println!("  not available: {e:#}"),
            }
            runs[i].push(result);
        }
    }
    let mut out = Vec::new();
    for (kind, results) in kinds.into_iter().zip(runs) {
        let mut ok: Vec<(f64, String)> = Vec::new();
        let mut failed = None;
        for r in results {
            match r {
                Ok(x) => ok.push(x),
                Err(e) => failed = Some(format!("{e:#}")),
            }
        }
        // A mechanism that failed in any round is reported as such: its median would
        // stand on fewer runs than the others'.
        let m = match failed {
            Some(why) => Measurement {
                mechanism: kind,
                column: kind.column().into(),
                smt_s: None,
                not_available: Some(why),
                detail: String::new(),
            },
            None => {
                let each: Vec<String> = ok.iter().map(|(v, _)| format!("{v:.3}")).collect();
                ok.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (smt_s, detail) = ok.swap_remove(ok.len() / 2);
                let detail = if each.len() > 1 {
                    format!(
                        "median of {} runs ({} s); that run: {detail}",
                        each.len(),
                        each.join(", ")
                    )
                } else {
                    detail
                };
                Measurement {
                    mechanism: kind,
                    column: kind.column().into(),
                    smt_s: Some(smt_s),
                    not_available: None,
                    detail,
                }
            }
        };
        out.push(m);
    }
    Ok(out)
}

/// One run of one mechanism, against a fresh single-node PSS in `dir`: its SMT in seconds
/// and how it splits.
async fn measure_once(
    kind: Kind,
    args: &Args,
    setup: &Option<img::VmSetup>,
    unavailable: &Option<String>,
    dir: &Path,
) -> anyhow::Result<(f64, String)> {
    let cluster = wayside_pss::testing::LocalCluster::start(1, &dir.join("pss")).await?;
    let pss = cluster.endpoints()[0].clone();
    let setup = match setup {
        Some(s) => Some(img::VmSetup {
            pss_port: img::port_of(&pss)?,
            work: dir.to_path_buf(),
            ..s.clone()
        }),
        None => None,
    };
    let result = measure_with(kind, args, &setup, unavailable, &pss).await;
    cluster.shutdown().await;
    result
}

async fn measure_with(
    kind: Kind,
    args: &Args,
    setup: &Option<img::VmSetup>,
    unavailable: &Option<String>,
    pss: &wayside_proto::types::Endpoint,
) -> anyhow::Result<(f64, String)> {
    match (kind, setup) {
        (Kind::Wayside, _) => img::wayside_migration(pss, args.volume_mib).await.map(|(w, wall)| {
            (
                wall.as_secs_f64(),
                wayside_move_detail(&w, wall, ""),
            )
        }),
        // (Between VMs on a bridge, with a PSS of its own there.)
        (Kind::WaysideVm, Some(s)) => wayside_between_vms(s, args.volume_mib).await,
        (_, None) => Err(anyhow::anyhow!(
            "{}",
            unavailable.clone().unwrap_or_else(|| "no image".into())
        )),
        (Kind::QemuLive, Some(s)) => img::qemu_live_migration(s, args.volume_mib).await.map(|q| {
            (
                q.wall_ms as f64 / 1e3,
                format!(
                    "{:?}: destination start to serving {} ms: QEMU total {} ms, downtime {} ms, {} MiB of {} MiB guest RAM moved, serving {} ms after completion",
                    s.accel,
                    q.wall_ms,
                    q.total_ms,
                    q.downtime_ms,
                    q.ram_transferred_bytes >> 20,
                    q.ram_total_bytes >> 20,
                    q.serving_after_ms
                ),
            )
        }),
        (Kind::ColdBoot, Some(s)) => img::cold_boot_refill(s, pss, args.volume_mib).await.map(|c| {
            let total = c.boot + c.refill;
            (
                total.as_secs_f64(),
                format!(
                    "{:?}: boot to health {} ms + refill of {} blocks from the PSS {} ms",
                    s.accel,
                    c.boot.as_millis(),
                    img::blocks_in(args.volume_mib),
                    c.refill.as_millis()
                ),
            )
        }),
    }
}

/// The paper's inputs (Table IV RSUs, 30 and 50 mph, h = 4 s) with the paper's four Table III
/// mechanisms followed by every measured one.
pub fn inputs_with(measured: &[Measurement]) -> Inputs {
    let mut inputs = Inputs::paper();
    inputs.mechanisms.extend(
        measured
            .iter()
            .filter_map(|m| m.smt_s.map(|s| Mechanism { name: m.column.clone(), smt_s: s })),
    );
    inputs
}

/// Tables IV-VII recomputed with the measured SMTs (beside the paper's mechanisms).
pub fn tables(measured: &[Measurement]) -> Report {
    paper::compute(&inputs_with(measured))
}

/// Table III: the paper's SMT per mechanism and what was measured here.
pub fn render_table_iii(measured: &[Measurement], volume_mib: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| Mechanism | Paper SMT (s) | Measured SMT here (s) | Notes |");
    let _ = writeln!(s, "| --- | ---: | ---: | --- |");
    let find = |k: Kind| measured.iter().find(|m| m.mechanism == k);
    let cell = |m: Option<&Measurement>| match m {
        Some(Measurement { smt_s: Some(v), .. }) => format!("{v:.3}"),
        Some(Measurement { not_available: Some(_), .. }) => "not available".into(),
        _ => "not run".into(),
    };
    for (name, smt) in paper::TABLE_III {
        let (here, note) = match name {
            "Unikernels" => {
                let m = find(Kind::QemuLive);
                (
                    cell(m),
                    format!(
                        "QEMU live migration of wayside's NMS image ({volume_mib} MiB volume cached). {}",
                        m.map(|m| m.not_available.clone().unwrap_or(m.detail.clone()))
                            .unwrap_or_default()
                    ),
                )
            }
            "LXD" => (
                "not measured".into(),
                "CRIU 3.17 fails on this kernel (\"Failed to fill self vdso symtable\")".into(),
            ),
            "Docker" => ("not measured".into(), "no Docker engine on this machine".into()),
            _ => (
                "not measured".into(),
                "a full KVM guest with its virtual disk is not part of wayside".into(),
            ),
        };
        let _ = writeln!(s, "| {name} | {smt:.2} | {here} | {note} |");
    }
    for k in [Kind::Wayside, Kind::WaysideVm, Kind::ColdBoot] {
        let m = find(k);
        let note =
            m.map(|m| m.not_available.clone().unwrap_or(m.detail.clone())).unwrap_or_default();
        let _ = writeln!(s, "| {} (`{}`) | - | {} | {note} |", k.describe(), k.column(), cell(m));
    }
    s
}

const COLORS: [&str; 6] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// The SVG plot: each RSU's dwell time N = NDD/v at every speed (bars) against the SMT of each
/// mechanism (horizontal lines: measured solid, the paper's dashed), on a log time axis.
/// A migration fits reactively where its line is below the bar (eq. 6).
pub fn render_svg(measured: &[Measurement], inputs: &Inputs) -> String {
    let (w, h) = (900.0, 480.0);
    let (left, right, top, bottom) = (60.0, 260.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let (lo, hi) = (-2.0f64, 3.0f64); // 10 ms .. 1000 s
    let y = |s: f64| top + ph * (1.0 - ((s.max(1e-2).log10() - lo) / (hi - lo)).clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"20\" font-size=\"14\">NMS service migration time per mechanism vs RSU dwell time (Table IV RSUs)</text>"
    );
    for e in -2..=3 {
        let v = 10f64.powi(e);
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{} s</text>",
            left + pw,
            left - 4.0,
            yy + 4.0,
            if e < 0 { format!("{v:.2}") } else { format!("{v:.0}") }
        );
    }
    let groups = inputs.rsus.len().max(1) as f64;
    let gw = pw / groups;
    let speeds = inputs.speeds.len().max(1) as f64;
    let bw = gw * 0.7 / speeds;
    let greys = ["#9ecae1", "#3182bd", "#6baed6", "#08519c"];
    for (i, rsu) in inputs.rsus.iter().enumerate() {
        let gx = left + gw * i as f64 + gw * 0.15;
        for (j, v) in inputs.speeds.iter().enumerate() {
            let n = model::dwell_time_s(rsu.ndd_m, v.speed);
            let (x, yy) = (gx + bw * j as f64, y(n));
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} at {}: N = {n:.2} s</title></rect>",
                bw - 1.0,
                top + ph - yy,
                greys[j % greys.len()],
                rsu.name,
                v.label
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} ({} m)</text>",
            left + gw * (i as f64 + 0.5),
            top + ph + 16.0,
            rsu.name,
            rsu.ndd_m
        );
    }
    let mut legend_y = top + 10.0;
    for (j, v) in inputs.speeds.iter().enumerate() {
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">dwell time N at {}</text>",
            left + pw + 15.0,
            legend_y - 9.0,
            greys[j % greys.len()],
            left + pw + 32.0,
            legend_y,
            v.label
        );
        legend_y += 16.0;
    }
    let mut lines: Vec<(String, f64, bool)> =
        paper::TABLE_III.iter().map(|(n, v)| (format!("paper: {n}"), *v, false)).collect();
    lines.extend(
        measured
            .iter()
            .filter_map(|m| m.smt_s.map(|v| (format!("measured: {}", m.column), v, true))),
    );
    for (k, (name, v, measured)) in lines.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let yy = y(*v);
        let dash = if *measured { "" } else { " stroke-dasharray=\"6,4\"" };
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
            left + pw
        );
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{name}: {v:.3} s</text>",
            left + pw + 15.0,
            legend_y - 4.0,
            left + pw + 28.0,
            legend_y - 4.0,
            left + pw + 32.0,
            legend_y
        );
        legend_y += 16.0;
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{:.1}\">log scale; a mechanism fits reactively at an RSU where its line is below the bar (eq. 6, window = N)</text>",
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}

/// The Markdown report.
pub fn render_report(o: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# NMS service migration time per mechanism\n");
    let _ = writeln!(
        s,
        "Every mechanism moves the same vehicle volume: {} MiB of 4 KiB blocks written through the \
         client library and flushed to a real PSS (cached, clean). SMT definitions, each on this \
         harness's clock from the move issued to the volume served on the next RSU: wayside and \
         wayside-VM = the move's admin call to the vehicle's next read answered by the target NMS; \
         QEMU-live = starting the destination QEMU to its NMS answering health checks (the \
         source QEMU's exit afterwards is not counted); cold-boot = QEMU start on the next RSU \
         to the last block refilled from the PSS. The measured rows move a {} MiB volume over \
         loopback (or a host bridge between VMs), not the paper's whole VMs and containers \
         over 1 Gbit/s links: compare them with each other, and with the paper's rows only as \
         another workload.\n",
        o.volume_mib,
        o.volume_mib
    );
    let _ = writeln!(s, "## Table III, measured beside the paper's\n");
    s.push_str(&render_table_iii(&o.measurements, o.volume_mib));
    s.push('\n');
    let _ = writeln!(s, "![SMT per mechanism vs dwell time](smt-vs-dwell.svg)\n");
    // The paper module's report, its headings moved one level down.
    let tables = paper::render_markdown(&o.tables);
    let tables = tables.replacen("# ", "## ", 1).replace("\n## ", "\n### ");
    s.push_str(&tables);
    s
}

/// `testbed mechanisms`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // On Ctrl-C the measuring future is dropped: its VMs are killed, its PSS stopped and its
    // bridge and taps removed by their Drop impls, before the process exits.
    let measurements = tokio::select! {
        m = measure(&args) => m?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; every VM, tap and bridge of this run was removed"),
    };
    let tables = tables(&measurements);
    let outcome = Outcome { volume_mib: args.volume_mib, measurements, tables };
    println!("\nTable III (SMT, s):\n{}", render_table_iii(&outcome.measurements, args.volume_mib));
    let report = render_report(&outcome);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(args.out.join("report.md"), &report)?;
    std::fs::write(
        args.out.join("smt-vs-dwell.svg"),
        render_svg(&outcome.measurements, &outcome.tables.inputs),
    )?;
    std::fs::write(args.out.join("mechanisms.json"), serde_json::to_string_pretty(&outcome)?)?;
    // Tables V-VII at the paper's speed, measured mechanisms only, on the terminal.
    let measured: Vec<&str> = outcome
        .measurements
        .iter()
        .filter(|m| m.smt_s.is_some())
        .map(|m| m.column.as_str())
        .collect();
    let speed = format!("{} mph", paper::TABLES_V_TO_VII_MPH);
    for table in ["V", "VI", "VII"] {
        println!("Table {table} at {speed} (window N = NDD/v), measured SMTs:");
        print!("| RSU |");
        for m in &measured {
            print!(" {m} |");
        }
        println!();
        for rsu in &outcome.tables.inputs.rsus {
            print!("| {} |", rsu.name);
            for m in &measured {
                let c = outcome.tables.cells.iter().find(|c| {
                    c.table == table && c.rsu == rsu.name && c.column == *m && c.speed == speed
                });
                print!(" {} |", c.map(|c| c.published_convention.as_str()).unwrap_or("?"));
            }
            println!();
        }
        println!();
    }
    println!("wrote {}/report.md, smt-vs-dwell.svg, mechanisms.json", args.out.display());
    Ok(())
}

/// wayside's state migration between two NMS VMs on a [`VmRoad`](crate::vmroad::VmRoad)
/// (PSS on the bridge's host address): SMT = the source's reported move time.
async fn wayside_between_vms(
    setup: &img::VmSetup,
    volume_mib: u64,
) -> anyhow::Result<(f64, String)> {
    use crate::vmroad::{BridgePss, VmRoad, VmRoadOptions};
    anyhow::ensure!(
        wayside_unikernel::tap::tun_available(),
        "/dev/net/tun is missing: no tap devices here"
    );
    let net = VmRoad::network()?;
    let dir = tempfile::Builder::new().prefix("wayside-mech-pss").tempdir()?;
    let pss = BridgePss::start(net.pss_bind_ip(), 1, dir.path()).await?;
    let opts = VmRoadOptions {
        memory_mib: setup.memory_mib,
        accel: setup.accel,
        boot_timeout: setup.boot_limit,
        ..VmRoadOptions::default()
    };
    let names = ["rsu-a".to_string(), "rsu-b".to_string()];
    let road =
        VmRoad::start_with(net, &names, &pss.endpoints(), Some(setup.image.dir.clone()), &opts)
            .await?;
    let addrs = road.addresses();
    let moved = async {
        let c = img::client(&addrs[0], "vehicle-wayside-vm").await?;
        img::fill(&c, volume_mib).await?;
        let mut admin = wayside_proto::pb::nms_admin_client::NmsAdminClient::connect(format!(
            "http://{}",
            addrs[0]
        ))
        .await?;
        let t = std::time::Instant::now();
        let w = admin
            .start_migration(wayside_proto::pb::StartMigrationRequest {
                volume: "vehicle-wayside-vm".into(),
                target_address: format!("http://{}", addrs[1]),
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            w.outcome() == wayside_proto::pb::MigrationOutcome::Completed,
            "wayside migration between VMs aborted: {}",
            w.error
        );
        c.read(0, 0, None).await?;
        let wall = t.elapsed();
        anyhow::ensure!(c.current_nms().authority() == addrs[1], "the client was not redirected");
        Ok((w, wall))
    }
    .await;
    road.shutdown().await?;
    pss.shutdown().await;
    let (w, wall) = moved?;
    let detail = wayside_move_detail(&w, wall, " VM to VM over the bridge");
    Ok((wall.as_secs_f64(), format!("{:?}: {detail}", setup.accel)))
}

/// The report line of a wayside move: the vehicle's wall time, the source's timeline, the
/// pause and what moved (`how`: where it went, appended to "moved").
fn wayside_move_detail(
    w: &wayside_proto::pb::MigrationReport,
    wall: Duration,
    how: &str,
) -> String {
    format!(
        "move issued to the vehicle's next read answered by the target {} ms (the source's own \
         timeline {} ms), vehicle pause {} ms, {} blocks / {} bytes moved{how} in {} rounds",
        wall.as_millis(),
        w.total_us / 1000,
        w.pause_us / 1000,
        w.blocks_moved,
        w.bytes_moved,
        w.rounds.len()
    )
}
