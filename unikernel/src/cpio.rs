//! A deterministic cpio "newc" archive writer (the format the Linux kernel unpacks as an
//! initramfs). Same entries in, same bytes out: entries are sorted by path, parent
//! directories are added implicitly, and every header field that could vary between
//! builds (mtime, uid, gid, inode number, device) is fixed.

use std::collections::BTreeMap;

/// One file-system object in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
    },
    /// A character device node (`/dev/console` is needed before devtmpfs exists: the
    /// kernel opens it as process 1's stdin/stdout/stderr).
    CharDev {
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Bad archive content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("archive path {path:?} must be relative, without `.`/`..` or empty components")]
    BadPath { path: String },
    #[error("archive path {path:?} is used both as a directory and a file")]
    Conflict { path: String },
    #[error("archive member {path:?} is {bytes} bytes; newc limits a member to 4 GiB")]
    TooBig { path: String, bytes: usize },
}

/// An archive under construction (paths without a leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an entry; missing parent directories are added with mode 0755.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        let bad = || CpioError::BadPath { path: path.into() };
        if path.is_empty() || path.starts_with('/') {
            return Err(bad());
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Err(bad());
        }
        if let Entry::File { data, .. } = &entry {
            if u32::try_from(data.len()).is_err() {
                return Err(CpioError::TooBig { path: path.into(), bytes: data.len() });
            }
        }
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent, Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => return Err(CpioError::Conflict { path: parent }),
            }
        }
        if matches!(entry, Entry::Dir { .. }) {
            if let Some(e) = self.entries.get(path) {
                if !matches!(e, Entry::Dir { .. }) {
                    return Err(CpioError::Conflict { path: path.into() });
                }
            }
        } else if matches!(self.entries.get(path), Some(Entry::Dir { .. })) {
            return Err(CpioError::Conflict { path: path.into() });
        }
        self.entries.insert(path.into(), entry);
        Ok(())
    }

    /// Paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The archive's bytes. BTreeMap order puts every directory before its contents
    /// ("a" < "a/b"), which the kernel's unpacker needs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { mode } => (S_IFDIR | (mode & 0o7777), 2, &[], (0, 0)),
                Entry::File { mode, data } => (S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
                Entry::CharDev { mode, major, minor } => {
                    (S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor))
                }
            };
            write_member(&mut out, ino, mode, nlink, rdev, path, data);
        }
        write_member(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn write_member(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    // Checked in `add`; the trailer and directories are empty.
    let size = u32::try_from(data.len()).expect("member size checked in add");
    let namesize = u32::try_from(name.len() + 1).expect("path length fits u32");
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(order: &[&str]) -> Archive {
        let mut a = Archive::new();
        for p in order {
            a.add(p, Entry::File { mode: 0o644, data: p.as_bytes().to_vec() }).unwrap();
        }
        a.add("dev/console", Entry::CharDev { mode: 0o600, major: 5, minor: 1 }).unwrap();
        a
    }

    #[test]
    fn same_entries_in_any_order_give_the_same_bytes() {
        let a = sample(&["init", "lib/modules/b.ko", "lib/modules/a.ko"]).to_bytes();
        let b = sample(&["lib/modules/a.ko", "init", "lib/modules/b.ko"]).to_bytes();
        assert_eq!(a, b);
        let c = sample(&["lib/modules/a.ko", "init"]).to_bytes();
        assert_ne!(a, c);
    }

    #[test]
    fn parents_come_first_and_the_layout_is_newc() {
        let a = sample(&["lib/modules/a.ko"]);
        let paths: Vec<_> = a.paths().collect();
        assert_eq!(paths, ["dev", "dev/console", "lib", "lib/modules", "lib/modules/a.ko"]);
        let bytes = a.to_bytes();
        assert_eq!(&bytes[..6], b"070701");
        assert!(bytes.len().is_multiple_of(4));
        // The first member is the directory "dev": mode 040755, name "dev\0".
        assert_eq!(&bytes[14..22], b"000041ed");
        assert_eq!(&bytes[110..114], b"dev\0");
        assert!(bytes.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }

    #[test]
    fn the_system_cpio_tool_reads_it() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("SKIP: cpio(1) is not installed; the format checks above still ran");
            return;
        };
        assert!(out.status.success());
        let bytes = sample(&["init", "lib/modules/x.ko"]).to_bytes();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("lib/modules/x.ko"), "{listing}");
        assert!(
            listing.lines().any(|l| l.starts_with("crw-------") && l.contains("dev/console")),
            "{listing}"
        );
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut a = Archive::new();
        for p in ["/init", "a//b", "../x", "", "a/./b"] {
            assert!(
                matches!(a.add(p, Entry::Dir { mode: 0o755 }), Err(CpioError::BadPath { .. })),
                "{p}"
            );
        }
        a.add("f", Entry::File { mode: 0o644, data: vec![] }).unwrap();
        assert!(matches!(
            a.add("f/g", Entry::File { mode: 0o644, data: vec![] }),
            Err(CpioError::Conflict { .. })
        ));
        assert!(matches!(a.add("f", Entry::Dir { mode: 0o755 }), Err(CpioError::Conflict { .. })));
    }
}
