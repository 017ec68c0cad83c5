//! An fsx-style random-operation checker: a seeded generator of file system operations, an
//! in-memory model of the expected tree, and a [`Target`] trait that the real thing implements
//! (the core through [`super::fs::Fs`] in unit tests, a real FUSE mount through `std::fs` in
//! integration tests). Every step's outcome (data or errno) is compared with the model, and the
//! whole tree is compared after every remount.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the model expects at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
}

/// The thing under test. Paths are relative to the file system's root, `/`-separated; errors
/// are errno values.
pub trait Target {
    fn create(&mut self, path: &str) -> Result<(), i32>;
    fn mkdir(&mut self, path: &str) -> Result<(), i32>;
    fn symlink(&mut self, target: &[u8], path: &str) -> Result<(), i32>;
    fn readlink(&mut self, path: &str) -> Result<Vec<u8>, i32>;
    fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), i32>;
    fn truncate(&mut self, path: &str, size: u64) -> Result<(), i32>;
    fn read_all(&mut self, path: &str) -> Result<Vec<u8>, i32>;
    fn read_at(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, i32>;
    fn rename(&mut self, from: &str, to: &str) -> Result<(), i32>;
    fn unlink(&mut self, path: &str) -> Result<(), i32>;
    fn rmdir(&mut self, path: &str) -> Result<(), i32>;
    /// Names in a directory, sorted, without `.` and `..`.
    fn list(&mut self, path: &str) -> Result<Vec<String>, i32>;
    /// Whether `path` is a directory, a file or a symlink (without following it).
    fn kind(&mut self, path: &str) -> Result<NodeKind, i32>;
    fn fsync(&mut self, path: &str) -> Result<(), i32>;
    /// Unmounts and mounts again (or reopens the core from its device).
    fn remount(&mut self) -> Result<(), String>;
}

/// The kind of a node, as `lstat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
}

/// Knobs of one run.
#[derive(Clone, Copy, Debug)]
pub struct FsxConfig {
    pub seed: u64,
    pub steps: usize,
    /// Largest offset + length a write or truncate reaches.
    pub max_file_bytes: u64,
    /// Largest single write.
    pub max_write_bytes: usize,
    /// Remount (and verify the whole tree) every this many steps; 0 never.
    pub remount_every: usize,
}

/// The model: path -> node (the root "" is implicit).
#[derive(Debug, Default)]
pub struct Model {
    pub nodes: BTreeMap<String, Node>,
}

fn parent_of(path: &str) -> &str {
    path.rfind('/').map(|i| &path[..i]).unwrap_or("")
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Model {
    fn is_dir(&self, path: &str) -> bool {
        path.is_empty() || matches!(self.nodes.get(path), Some(Node::Dir))
    }

    fn children(&self, dir: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .nodes
            .keys()
            .filter(|p| parent_of(p) == dir && !p.is_empty())
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
            .collect();
        out.sort();
        out
    }

    /// What rename(from, to) does per POSIX: Ok or the errno.
    fn rename(&mut self, from: &str, to: &str) -> Result<(), i32> {
        let src = self.nodes.get(from).cloned().ok_or(libc::ENOENT)?;
        if !self.is_dir(parent_of(to)) {
            return Err(libc::ENOENT);
        }
        if from == to {
            return Ok(());
        }
        if src == Node::Dir && (to.starts_with(&format!("{from}/"))) {
            return Err(libc::EINVAL);
        }
        if from.starts_with(&format!("{to}/")) {
            return Err(libc::ENOTEMPTY);
        }
        if let Some(dst) = self.nodes.get(to) {
            match (&src, dst) {
                (Node::Dir, Node::Dir) if !self.children(to).is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                (Node::Dir, Node::Dir) => {}
                (Node::Dir, _) => return Err(libc::ENOTDIR),
                (_, Node::Dir) => return Err(libc::EISDIR),
                _ => {}
            }
        }
        let moved: Vec<(String, Node)> = self
            .nodes
            .iter()
            .filter(|(p, _)| *p == from || p.starts_with(&format!("{from}/")))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        self.nodes.remove(to);
        for (p, _) in &moved {
            self.nodes.remove(p);
        }
        for (p, n) in moved {
            self.nodes.insert(format!("{to}{}", &p[from.len()..]), n);
        }
        Ok(())
    }
}

fn check<T: PartialEq + std::fmt::Debug>(
    step: usize,
    what: &str,
    got: Result<T, i32>,
    want: Result<T, i32>,
) -> Result<(), String> {
    if got != want {
        return Err(format!("step {step}: {what}: got {got:?}, model expects {want:?}"));
    }
    Ok(())
}

fn short<T: std::fmt::Debug>(r: &Result<Vec<u8>, T>) -> String {
    match r {
        Ok(v) => format!("{} bytes", v.len()),
        Err(e) => format!("{e:?}"),
    }
}

/// Compares the whole tree with the model.
pub fn verify_tree(target: &mut impl Target, model: &Model, step: usize) -> Result<(), String> {
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        check(step, &format!("list {dir:?}"), target.list(&dir), Ok(model.children(&dir)))?;
        for name in model.children(&dir) {
            let path = join(&dir, &name);
            match &model.nodes[&path] {
                Node::Dir => {
                    check(step, &format!("kind {path}"), target.kind(&path), Ok(NodeKind::Dir))?;
                    dirs.push(path);
                }
                Node::File(data) => {
                    let got = target.read_all(&path);
                    if got.as_ref() != Ok(data) {
                        return Err(format!(
                            "step {step}: content of {path}: got {}, model has {} bytes (first difference at {:?})",
                            short(&got),
                            data.len(),
                            got.as_ref().ok().and_then(|g| g.iter().zip(data).position(|(a, b)| a != b))
                        ));
                    }
                }
                Node::Symlink(t) => {
                    check(
                        step,
                        &format!("readlink {path}"),
                        target.readlink(&path),
                        Ok(t.clone()),
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// Runs `cfg.steps` random operations against `target`, checking each against the model.
/// Returns the model (the expected tree) on success, or a description of the first divergence.
pub fn run(target: &mut impl Target, cfg: FsxConfig) -> Result<Model, String> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut model = Model::default();
    let names = ["a", "b", "c", "d", "e", "f", "long-name-with-some-length-to-it"];
    for step in 0..cfg.steps {
        // Pick a random existing directory and a random name in it.
        let dirs: Vec<String> = std::iter::once(String::new())
            .chain(model.nodes.iter().filter(|(_, n)| **n == Node::Dir).map(|(p, _)| p.clone()))
            .collect();
        let dir = dirs[rng.gen_range(0..dirs.len())].clone();
        let path = join(&dir, names[rng.gen_range(0..names.len())]);
        let files: Vec<String> = model
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::File(_)))
            .map(|(p, _)| p.clone())
            .collect();
        let any_file = (!files.is_empty()).then(|| files[rng.gen_range(0..files.len())].clone());
        match rng.gen_range(0..100) {
            0..=9 => {
                let want = if model.nodes.contains_key(&path) {
                    Err(libc::EEXIST)
                } else {
                    model.nodes.insert(path.clone(), Node::File(Vec::new()));
                    Ok(())
                };
                check(step, &format!("create {path}"), target.create(&path), want)?;
            }
            10..=14 => {
                let want = if model.nodes.contains_key(&path) {
                    Err(libc::EEXIST)
                } else {
                    model.nodes.insert(path.clone(), Node::Dir);
                    Ok(())
                };
                check(step, &format!("mkdir {path}"), target.mkdir(&path), want)?;
            }
            15..=44 => {
                let Some(file) = any_file else { continue };
                let Some(Node::File(data)) = model.nodes.get_mut(&file) else { unreachable!() };
                let cap = if rng.gen_bool(0.2) {
                    cfg.max_write_bytes
                } else {
                    cfg.max_write_bytes.min(5000)
                };
                let len = rng.gen_range(1..=cap) as u64;
                let offset =
                    rng.gen_range(0..=(data.len() as u64 + 9000).min(cfg.max_file_bytes - len));
                let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let end = (offset + len) as usize;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset as usize..end].copy_from_slice(&bytes);
                check(
                    step,
                    &format!("write {file} @{offset}+{len}"),
                    target.write(&file, offset, &bytes),
                    Ok(()),
                )?;
            }
            45..=54 => {
                let Some(file) = any_file else { continue };
                let Some(Node::File(data)) = model.nodes.get_mut(&file) else { unreachable!() };
                let size =
                    rng.gen_range(0..=(data.len() as u64 * 2 + 5000).min(cfg.max_file_bytes));
                data.resize(size as usize, 0);
                check(
                    step,
                    &format!("truncate {file} to {size}"),
                    target.truncate(&file, size),
                    Ok(()),
                )?;
            }
            55..=69 => {
                let Some(file) = any_file else { continue };
                let Some(Node::File(data)) = model.nodes.get(&file) else { unreachable!() };
                let offset = rng.gen_range(0..=data.len() as u64 + 100);
                let len = rng.gen_range(1..=cfg.max_write_bytes);
                let from = (offset as usize).min(data.len());
                let to = (from + len).min(data.len());
                let want = data[from..to].to_vec();
                let got = target.read_at(&file, offset, len);
                if got.as_ref() != Ok(&want) {
                    return Err(format!(
                        "step {step}: read {file} @{offset}+{len}: got {}, model expects {} bytes",
                        short(&got),
                        want.len()
                    ));
                }
            }
            70..=77 => {
                let all: Vec<String> = model.nodes.keys().cloned().collect();
                if all.is_empty() {
                    continue;
                }
                let from = all[rng.gen_range(0..all.len())].clone();
                let want = model.rename(&from, &path);
                check(
                    step,
                    &format!("rename {from} -> {path}"),
                    target.rename(&from, &path),
                    want,
                )?;
            }
            78..=83 => {
                let want = match model.nodes.get(&path) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(_) => {
                        model.nodes.remove(&path);
                        Ok(())
                    }
                };
                check(step, &format!("unlink {path}"), target.unlink(&path), want)?;
            }
            84..=88 => {
                let want = match model.nodes.get(&path) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) if !model.children(&path).is_empty() => Err(libc::ENOTEMPTY),
                    Some(Node::Dir) => {
                        model.nodes.remove(&path);
                        Ok(())
                    }
                    Some(_) => Err(libc::ENOTDIR),
                };
                check(step, &format!("rmdir {path}"), target.rmdir(&path), want)?;
            }
            89..=91 => {
                let t: Vec<u8> = format!("../target-{}", rng.gen_range(0..1000)).into_bytes();
                let want = if model.nodes.contains_key(&path) {
                    Err(libc::EEXIST)
                } else {
                    model.nodes.insert(path.clone(), Node::Symlink(t.clone()));
                    Ok(())
                };
                check(step, &format!("symlink {path}"), target.symlink(&t, &path), want)?;
            }
            92..=95 => {
                let want =
                    if model.is_dir(&dir) { Ok(model.children(&dir)) } else { Err(libc::ENOENT) };
                check(step, &format!("list {dir:?}"), target.list(&dir), want)?;
            }
            _ => {
                let Some(file) = any_file else { continue };
                check(step, &format!("fsync {file}"), target.fsync(&file), Ok(()))?;
            }
        }
        if cfg.remount_every > 0 && (step + 1) % cfg.remount_every == 0 {
            target.remount().map_err(|e| format!("step {step}: remount: {e}"))?;
            verify_tree(target, &model, step)?;
        }
    }
    verify_tree(target, &model, cfg.steps)?;
    Ok(model)
}
