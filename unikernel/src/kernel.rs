//! Debian's stock kernel: fetched with the distro's own tools without installing it
//! (`apt-cache depends linux-image-amd64` names the versioned package, `apt-get download`
//! fetches the .deb, `dpkg-deb -x` unpacks it into a cache folder), then located and
//! searched for the modules the image needs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage whose dependency names the current kernel package.
pub const METAPACKAGE: &str = "linux-image-amd64";

/// The modules the image loads: for virtio networking the microvm transport (virtio_mmio),
/// the PCI transport for other machine types (virtio_pci) and the NIC driver; and QEMU's
/// fw_cfg driver, which shows the cluster token a launcher passes (`pid1`). Their
/// dependencies (virtio, virtio_ring, failover, net_failover, ...) are added from each
/// module's `.modinfo`.
pub const DEFAULT_MODULES: &[&str] = &["virtio_mmio", "virtio_pci", "virtio_net", "qemu_fw_cfg"];

/// Problems with the kernel or its modules.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no kernel in {dir}: expected boot/vmlinuz-VERSION and lib/modules/VERSION/ (run `unikernel fetch-kernel`, or pass --kernel-dir to an unpacked linux-image package)")]
    NotFound { dir: PathBuf },
    #[error(
        "{dir} holds several kernels ({versions:?}); pass the one to use with --kernel-version"
    )]
    Ambiguous { dir: PathBuf, versions: Vec<String> },
    #[error("kernel module {name} is not in {dir}")]
    MissingModule { name: String, dir: PathBuf },
    #[error("kernel module {path}: {source}")]
    BadModule { path: PathBuf, source: crate::elf::ElfError },
    #[error("`{command}` failed: {detail}")]
    Tool { command: String, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io { path: path.to_path_buf(), source }
}

/// An unpacked kernel package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTree {
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/VERSION`.
    pub modules_dir: PathBuf,
}

impl KernelTree {
    /// Finds the kernel in an unpacked package (`DIR/boot/vmlinuz-V` + `DIR/lib/modules/V`,
    /// or `usr/lib/modules` on merged-/usr layouts), or in a cache folder holding one
    /// unpacked package per version (`DIR/V/...`).
    pub fn locate(dir: &Path, version: Option<&str>) -> Result<Self, KernelError> {
        let mut found = Vec::new();
        let mut candidates = vec![dir.to_path_buf()];
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut subs: Vec<PathBuf> =
                rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
            subs.sort();
            candidates.extend(subs);
        }
        for root in candidates {
            let Ok(rd) = std::fs::read_dir(root.join("boot")) else { continue };
            let mut names: Vec<String> =
                rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
            names.sort();
            for name in names {
                let Some(v) = name.strip_prefix("vmlinuz-") else { continue };
                let modules = ["lib/modules", "usr/lib/modules"]
                    .iter()
                    .map(|m| root.join(m).join(v))
                    .find(|p| p.is_dir());
                if let Some(modules_dir) = modules {
                    found.push(KernelTree {
                        version: v.to_string(),
                        vmlinuz: root.join("boot").join(&name),
                        modules_dir,
                    });
                }
            }
        }
        if let Some(want) = version {
            found.retain(|k| k.version == want);
        }
        found.dedup_by(|a, b| a.version == b.version);
        match found.len() {
            0 => Err(KernelError::NotFound { dir: dir.into() }),
            1 => Ok(found.remove(0)),
            _ => Err(KernelError::Ambiguous {
                dir: dir.into(),
                versions: found.into_iter().map(|k| k.version).collect(),
            }),
        }
    }

    /// Every module file in the tree by module name (`virtio_net` -> path).
    pub fn module_index(&self) -> Result<BTreeMap<String, PathBuf>, KernelError> {
        let mut index = BTreeMap::new();
        let mut stack = vec![self.modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
                let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                    .iter()
                    .find_map(|ext| name.strip_suffix(ext));
                if let Some(stem) = stem {
                    index.insert(stem.replace('-', "_"), path);
                }
            }
        }
        Ok(index)
    }

    /// The modules to load for `wanted`, dependencies first, each once (a deterministic
    /// topological order: depth-first, in the order given).
    pub fn resolve_modules(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, KernelError> {
        let index = self.module_index()?;
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            let mut on_path = BTreeSet::new();
            self.visit(&index, &name.replace('-', "_"), &mut done, &mut on_path, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        index: &BTreeMap<String, PathBuf>,
        name: &str,
        done: &mut BTreeSet<String>,
        on_path: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), KernelError> {
        if done.contains(name) {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| KernelError::MissingModule {
            name: name.into(),
            dir: self.modules_dir.clone(),
        })?;
        // Module dependency chains are short; a cycle would be a broken package (found at
        // once: a module met again on the path it is being resolved along).
        if depth > 32 || !on_path.insert(name.to_owned()) {
            return Err(KernelError::BadModule {
                path: path.clone(),
                source: crate::elf::ElfError::Malformed { what: "dependency cycle" },
            });
        }
        // A compressed module (newer Debian kernels ship `.ko.xz`) is read through its
        // decompressor: its dependencies went unread, and a build "succeeded" with an
        // image whose network driver could not load.
        let bytes = match path.extension().and_then(|e| e.to_str()) {
            Some("ko") => std::fs::read(path).map_err(io(path))?,
            Some(ext) => {
                let tool = match ext {
                    "xz" => "xz",
                    "zst" => "zstd",
                    "gz" => "gzip",
                    _ => {
                        return Err(KernelError::Tool {
                            command: format!("decompressing {}", path.display()),
                            detail: format!("no decompressor known for .{ext}"),
                        })
                    }
                };
                run_tool_bytes(Command::new(tool).arg("-dc").arg(path))?
            }
            None => std::fs::read(path).map_err(io(path))?,
        };
        let deps = crate::elf::module_depends(&bytes)
            .map_err(|source| KernelError::BadModule { path: path.clone(), source })?;
        for dep in deps {
            self.visit(index, &dep.replace('-', "_"), done, on_path, order, depth + 1)?;
        }
        on_path.remove(name);
        done.insert(name.into());
        order.push((name.into(), path.clone()));
        Ok(())
    }
}

/// A tool's standard output, as bytes.
fn run_tool_bytes(cmd: &mut Command) -> Result<Vec<u8>, KernelError> {
    let command = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| KernelError::Tool { command: command.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(KernelError::Tool {
            command,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(out.stdout)
}

fn run_tool(cmd: &mut Command) -> Result<String, KernelError> {
    run_tool_bytes(cmd).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// The versioned kernel package the metapackage depends on (`linux-image-6.1.0-56-amd64`).
pub fn resolve_package() -> Result<String, KernelError> {
    let text = run_tool(Command::new("apt-cache").args(["depends", METAPACKAGE]))?;
    parse_depends(&text).ok_or_else(|| KernelError::Tool {
        command: format!("apt-cache depends {METAPACKAGE}"),
        detail: format!("no linux-image-* dependency in its output:\n{text}"),
    })
}

/// The first `Depends: linux-image-...` line of `apt-cache depends` output.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        (dep.starts_with("linux-image-") && dep != METAPACKAGE).then(|| dep.to_string())
    })
}

/// The default kernel cache: `$WAYSIDE_KERNEL_DIR`, else `$XDG_CACHE_HOME/wayside/kernel`,
/// else `~/.cache/wayside/kernel`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WAYSIDE_KERNEL_DIR") {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("wayside").join("kernel")
}

/// Downloads (unless already cached) and unpacks the kernel package into
/// `cache_dir/PACKAGE/`. Nothing is installed. `package` defaults to the metapackage's
/// current dependency.
pub fn fetch(cache_dir: &Path, package: Option<&str>) -> Result<KernelTree, KernelError> {
    let package = match package {
        Some(p) => p.to_string(),
        None => resolve_package()?,
    };
    let dest = cache_dir.join(&package);
    if let Ok(tree) = KernelTree::locate(&dest, None) {
        return Ok(tree);
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let work =
        tempfile::Builder::new().prefix(".fetch-").tempdir_in(cache_dir).map_err(io(cache_dir))?;
    run_tool(Command::new("apt-get").args(["download", "-q", &package]).current_dir(work.path()))?;
    let deb = std::fs::read_dir(work.path())
        .map_err(io(work.path()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| KernelError::Tool {
            command: format!("apt-get download {package}"),
            detail: "no .deb file was written".into(),
        })?;
    let unpack = work.path().join("root");
    run_tool(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    // Rename into place last, so a half-finished fetch never looks like a kernel. A
    // concurrent fetch may have won the race; its result is as good as ours.
    if let Err(e) = std::fs::rename(&unpack, &dest) {
        return KernelTree::locate(&dest, None)
            .map_err(|_| KernelError::Io { path: dest.clone(), source: e });
    }
    KernelTree::locate(&dest, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_depends(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn locate_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = KernelTree::locate(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("fetch-kernel"), "{err}");
        // A package layout is found, one level down too.
        let root = dir.path().join("linux-image-9.9.9-amd64");
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot/vmlinuz-9.9.9-amd64"), b"k").unwrap();
        std::fs::create_dir_all(root.join("lib/modules/9.9.9-amd64/kernel")).unwrap();
        let k = KernelTree::locate(dir.path(), None).unwrap();
        assert_eq!(k.version, "9.9.9-amd64");
        let err = k.resolve_modules(&["virtio_net"]).unwrap_err();
        assert!(matches!(err, KernelError::MissingModule { .. }), "{err}");
    }

    /// A compressed module is read through its decompressor (its dependencies went
    /// unread, and the build went on without them): one that is no module, or that does
    /// not decompress, fails the build, naming it.
    #[test]
    fn a_compressed_module_is_read_not_taken_blind() {
        if Command::new("xz").arg("--version").output().is_err() {
            eprintln!("SKIP: xz is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("linux-image-9.9.9-amd64");
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot/vmlinuz-9.9.9-amd64"), b"k").unwrap();
        let mods = root.join("lib/modules/9.9.9-amd64/kernel/drivers");
        std::fs::create_dir_all(&mods).unwrap();
        // An ELF that is no module (this test binary), compressed.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let mut xz = Command::new("xz")
            .args(["-c", "-0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = xz.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            std::io::Write::write_all(&mut stdin, &me).unwrap();
        });
        let out = xz.wait_with_output().unwrap();
        writer.join().unwrap();
        std::fs::write(mods.join("fake.ko.xz"), out.stdout).unwrap();
        std::fs::write(mods.join("junk.ko.xz"), b"not xz at all").unwrap();
        let k = KernelTree::locate(dir.path(), None).unwrap();
        let err = k.resolve_modules(&["fake"]).unwrap_err();
        assert!(err.to_string().contains(".modinfo"), "read, and found no module: {err}");
        let err = k.resolve_modules(&["junk"]).unwrap_err();
        assert!(matches!(err, KernelError::Tool { .. }), "{err}");
    }
}
