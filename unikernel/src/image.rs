//! The image folder: `vmlinuz` (the stock kernel, copied), `initramfs.cpio` (written here:
//! the static `nms` as `/init`, `/dev/console`, the virtio-net modules and their load
//! order) and `manifest.json` (versions, sizes, sha256 of every part, default command
//! line). Deterministic: the same inputs give byte-identical files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use wayside_nms::pid1::BootParams;

use crate::cpio::{Archive, Entry};
use crate::elf::ExecKind;
use crate::kernel::KernelTree;

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Where modules go inside the image.
pub const IMAGE_MODULE_DIR: &str = "lib/modules";
/// The kernel's own words of the default command line: serial console, reboot instead
/// of hanging on a panic (with QEMU's -no-reboot the VM then exits), little boot noise.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 panic=-1 quiet";

/// Problems building or opening an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path} is not a usable /init: {reason}")]
    BadInit { path: PathBuf, reason: String },
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error(transparent)]
    Archive(#[from] crate::cpio::CpioError),
    #[error(transparent)]
    BootParams(#[from] wayside_nms::pid1::BootParamError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an image folder: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("`strip` failed on {path}: {detail}")]
    Strip { path: PathBuf, detail: String },
    #[error("the NMS config {path} cannot go into the image: {reason}")]
    BadConfig { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

/// One file of the image, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

impl Part {
    fn of(file: &str, data: &[u8]) -> Self {
        Self {
            file: file.into(),
            bytes: data.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(data)),
        }
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Bumped when the layout changes.
    pub format: u32,
    pub kernel_version: String,
    pub kernel: Part,
    pub initramfs: Part,
    /// The `/init` binary inside the initramfs.
    pub init: Part,
    /// Modules inside the initramfs, in load order.
    pub modules: Vec<Part>,
    /// The baked-in NMS configuration file, if any.
    #[serde(default)]
    pub nms_config: Option<Part>,
    /// The kernel's own words of the default command line.
    pub kernel_args: String,
    /// The default `wayside.*` words (see `wayside_nms::pid1::BootParams`).
    pub boot_params: String,
    /// `kernel_args` + `boot_params`: what `unikernel run` passes without overrides.
    pub default_cmdline: String,
}

impl Manifest {
    pub const FORMAT: u32 = 1;

    /// Total bytes of the bootable parts (kernel + initramfs).
    pub fn image_bytes(&self) -> u64 {
        self.kernel.bytes + self.initramfs.bytes
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub kernel: KernelTree,
    /// The `nms` binary (must be static).
    pub nms: PathBuf,
    pub out_dir: PathBuf,
    /// Module names to include (dependencies are added).
    pub modules: Vec<String>,
    /// Default `wayside.*` settings.
    pub boot: BootParams,
    /// An NMS configuration file to bake in as `/etc/wayside/nms.toml`.
    pub nms_config: Option<PathBuf>,
    /// Drop debug info from `/init` (binutils `strip --strip-debug`): a debug build's
    /// 80 MB binary becomes ~20 MB, which boots and live-migrates faster.
    pub strip: bool,
}

/// Checks that `path` can run as `/init`: an x86-64 ELF with no program interpreter.
pub fn check_init(path: &Path) -> Result<Vec<u8>, ImageError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let bad = |reason: String| ImageError::BadInit { path: path.into(), reason };
    match crate::elf::exec_kind(&bytes) {
        Ok(ExecKind::StaticPie | ExecKind::Static) => Ok(bytes),
        Ok(ExecKind::Dynamic { interpreter }) => Err(bad(format!(
            "it is dynamically linked (needs {interpreter}, and the image has no loader or libraries); \
             build it static, as the workspace's .cargo/config.toml does (+crt-static)"
        ))),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn stripped(path: &Path) -> Result<Vec<u8>, ImageError> {
    let tmp = tempfile::NamedTempFile::new().map_err(io(path))?;
    let out = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(tmp.path())
        .arg(path)
        .output()
        .map_err(|e| ImageError::Strip { path: path.into(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(ImageError::Strip {
            path: path.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    std::fs::read(tmp.path()).map_err(io(tmp.path()))
}

/// Builds the image folder and returns its manifest.
pub fn build(opts: &BuildOptions) -> Result<Manifest, ImageError> {
    let mut init = check_init(&opts.nms)?;
    if opts.strip {
        init = stripped(&opts.nms)?;
    }
    let names: Vec<&str> = opts.modules.iter().map(String::as_str).collect();
    let modules = opts.kernel.resolve_modules(&names)?;

    let mut archive = Archive::new();
    archive.add("init", Entry::File { mode: 0o755, data: init.clone() })?;
    archive.add("dev/console", Entry::CharDev { mode: 0o600, major: 5, minor: 1 })?;
    archive.add("proc", Entry::Dir { mode: 0o555 })?;
    let mut order = String::new();
    let mut module_parts = Vec::new();
    for (i, (name, path)) in modules.iter().enumerate() {
        let data = std::fs::read(path).map_err(io(path))?;
        let ext = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split_once('.'))
            .map_or("ko", |(_, e)| e);
        // A numbered name keeps the load order visible in a listing too.
        let file = format!("{IMAGE_MODULE_DIR}/{:02}-{name}.{ext}", i + 1);
        order.push_str(&format!("/{file}\n"));
        module_parts.push(Part::of(&file, &data));
        archive.add(&file, Entry::File { mode: 0o644, data })?;
    }
    archive.add(
        wayside_nms::pid1::MODULE_ORDER_FILE.trim_start_matches('/'),
        Entry::File { mode: 0o644, data: order.into_bytes() },
    )?;
    let mut config_part = None;
    if let Some(cfg) = &opts.nms_config {
        let data = std::fs::read(cfg).map_err(io(cfg))?;
        check_baked_config(cfg, &data)?;
        config_part = Some(Part::of(wayside_nms::pid1::CONFIG_FILE, &data));
        archive.add(
            wayside_nms::pid1::CONFIG_FILE.trim_start_matches('/'),
            Entry::File { mode: 0o644, data },
        )?;
    }
    let initramfs = archive.to_bytes();
    let kernel = std::fs::read(&opts.kernel.vmlinuz).map_err(io(&opts.kernel.vmlinuz))?;

    std::fs::create_dir_all(&opts.out_dir).map_err(io(&opts.out_dir))?;
    let write = |name: &str, data: &[u8]| {
        let p = opts.out_dir.join(name);
        std::fs::write(&p, data).map_err(io(&p))
    };
    write(KERNEL_FILE, &kernel)?;
    write(INITRAMFS_FILE, &initramfs)?;
    let boot_params = opts.boot.render();
    let manifest = Manifest {
        format: Manifest::FORMAT,
        kernel_version: opts.kernel.version.clone(),
        kernel: Part::of(KERNEL_FILE, &kernel),
        initramfs: Part::of(INITRAMFS_FILE, &initramfs),
        init: Part::of("init", &init),
        modules: module_parts,
        nms_config: config_part,
        kernel_args: DEFAULT_KERNEL_ARGS.into(),
        default_cmdline: format!("{DEFAULT_KERNEL_ARGS} {boot_params}"),
        boot_params,
    };
    let mut json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    json.push('\n');
    write(MANIFEST_FILE, json.as_bytes())?;
    Ok(manifest)
}

/// An image folder on disk.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// Opens an image folder and checks its parts against the manifest (sizes always;
    /// sha256 too when `verify` is set).
    pub fn open(dir: &Path, verify: bool) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::BadImage { path: dir.into(), reason };
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath).map_err(|e| {
            bad(format!("cannot read {MANIFEST_FILE}: {e} (build one with `unikernel build`)"))
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| bad(format!("{MANIFEST_FILE}: {e}")))?;
        if manifest.format != Manifest::FORMAT {
            return Err(bad(format!(
                "manifest format {} (this tool reads {})",
                manifest.format,
                Manifest::FORMAT
            )));
        }
        // The parts are the folder's own files (an absolute or `..` name in the manifest
        // would boot something from elsewhere, its checksum checked against itself).
        for (part, name) in [(&manifest.kernel, KERNEL_FILE), (&manifest.initramfs, INITRAMFS_FILE)]
        {
            if part.file != name {
                return Err(bad(format!(
                    "the manifest names {:?} where the image's {name} must be",
                    part.file
                )));
            }
        }
        for part in [&manifest.kernel, &manifest.initramfs] {
            let p = dir.join(&part.file);
            let meta = std::fs::metadata(&p).map_err(|e| bad(format!("{}: {e}", part.file)))?;
            if meta.len() != part.bytes {
                return Err(bad(format!(
                    "{} is {} bytes, the manifest says {}",
                    part.file,
                    meta.len(),
                    part.bytes
                )));
            }
            if verify {
                let data = std::fs::read(&p).map_err(io(&p))?;
                let sum = hex::encode(sha2::Sha256::digest(&data));
                if sum != part.sha256 {
                    return Err(bad(format!(
                        "{} has sha256 {sum}, the manifest says {}",
                        part.file, part.sha256
                    )));
                }
            }
        }
        Ok(Self { dir: dir.into(), manifest })
    }

    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.file)
    }

    pub fn initramfs_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.initramfs.file)
    }

    /// The image's default boot parameters.
    pub fn boot_params(&self) -> Result<BootParams, ImageError> {
        Ok(BootParams::parse(&self.manifest.boot_params)?)
    }
}
/// A config baked into the image must parse as the NMS's, and hold no secret: the image's
/// files are readable by whoever can read the image. The cluster token and TLS files go
/// to the guest at launch, through fw_cfg (`unikernel run`'s options).
fn check_baked_config(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let bad = |reason: String| ImageError::BadConfig { path: path.to_owned(), reason };
    let text = std::str::from_utf8(data).map_err(|e| bad(e.to_string()))?;
    let cfg: wayside_nms::config::Config =
        wayside_proto::config::parse(text).map_err(|e| bad(e.message().to_owned()))?;
    if cfg.cluster_token.is_some() {
        return Err(bad("it holds a cluster_token, which the image would show to anyone who \
                        can read it: give it at launch (WAYSIDE_CLUSTER_TOKEN with `unikernel \
                        run`), which hands it to the guest through fw_cfg"
            .into()));
    }
    let t = &cfg.tls;
    if t.cert.is_some() || t.key.is_some() || t.ca.is_some() {
        return Err(bad("it names [tls] files, which the guest cannot read: give them at \
                        launch (`unikernel run --tls-cert/--tls-key/--tls-ca`)"
            .into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest naming a file outside the image folder (its checksum checked against
    /// itself) is refused; the image's own files are taken.
    #[test]
    fn a_manifest_naming_files_elsewhere_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("img");
        std::fs::create_dir(&dir).unwrap();
        let k = b"kernel".to_vec();
        std::fs::write(dir.join(KERNEL_FILE), &k).unwrap();
        std::fs::write(root.path().join("k"), &k).unwrap();
        std::fs::write(dir.join(INITRAMFS_FILE), b"cpio").unwrap();
        let mut m = Manifest {
            format: Manifest::FORMAT,
            kernel_version: "9".into(),
            kernel: Part::of(KERNEL_FILE, &k),
            initramfs: Part::of(INITRAMFS_FILE, b"cpio"),
            init: Part::of("init", b""),
            modules: Vec::new(),
            nms_config: None,
            kernel_args: String::new(),
            boot_params: String::new(),
            default_cmdline: String::new(),
        };
        let write = |m: &Manifest| {
            std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_string(m).unwrap()).unwrap()
        };
        write(&m);
        Image::open(&dir, true).unwrap();
        m.kernel = Part::of("../k", &k);
        write(&m);
        let Err(e) = Image::open(&dir, true) else { panic!("a manifest naming ../k was taken") };
        let e = e.to_string();
        assert!(e.contains("../k"), "{e}");
    }

    #[test]
    fn a_baked_config_holding_a_secret_is_refused() {
        let p = Path::new("nms.toml");
        check_baked_config(p, b"pss = [\"10.0.2.2:7400\"]\n").unwrap();
        let e = check_baked_config(p, b"cluster_token = \"0123456789abcdef0123\"\n").unwrap_err();
        assert!(e.to_string().contains("cluster_token"), "{e}");
        assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
        let e = check_baked_config(p, b"[tls]\nkey = \"/etc/k.pem\"\n").unwrap_err();
        assert!(e.to_string().contains("[tls]"), "{e}");
        let e = check_baked_config(p, b"bogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
