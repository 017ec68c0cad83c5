//! Just enough ELF64 reading for the image builder: is an executable static (no program
//! interpreter), and what does a kernel module's `.modinfo` section say (its `depends=`)?
//! Hand-written because it is a few header reads; no tool (`file`, `readelf`) is needed
//! at build time.

/// What kind of executable a file is, as far as running it as `/init` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecKind {
    /// `ET_DYN` with no `PT_INTERP`: static-pie (what wayside builds).
    StaticPie,
    /// `ET_EXEC` with no `PT_INTERP`: classic static.
    Static,
    /// Needs a dynamic loader (`PT_INTERP`), which the image does not have.
    Dynamic { interpreter: String },
}

/// Why a file could not be read as an x86-64 ELF executable or object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian x86-64 ELF file")]
    WrongClass,
    #[error("truncated or malformed ELF ({what})")]
    Malformed { what: &'static str },
    #[error("ELF type {e_type} is not an executable")]
    NotExecutable { e_type: u16 },
}

const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

/// `b[off..off + len]`, or `Malformed` naming `what` (no overflow on any offset).
fn slice<'a>(
    b: &'a [u8],
    off: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    off.checked_add(len).and_then(|end| b.get(off..end)).ok_or(ElfError::Malformed { what })
}

/// `base + i * size` without overflow.
fn entry_at(base: usize, i: usize, size: usize) -> Result<usize, ElfError> {
    i.checked_mul(size)
        .and_then(|d| base.checked_add(d))
        .ok_or(ElfError::Malformed { what: "table offset" })
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    slice(b, off, 2, "header").map(|s| u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    slice(b, off, 4, "header").map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}
fn u64_at(b: &[u8], off: usize) -> Result<usize, ElfError> {
    let v =
        slice(b, off, 8, "header").map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))?;
    usize::try_from(v).map_err(|_| ElfError::Malformed { what: "offset" })
}

fn check_header(b: &[u8]) -> Result<u16, ElfError> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
    if b[4] != 2 || b[5] != 1 || u16_at(b, 18)? != EM_X86_64 {
        return Err(ElfError::WrongClass);
    }
    u16_at(b, 16)
}

/// Classifies an x86-64 executable by its ELF type and program headers.
pub fn exec_kind(b: &[u8]) -> Result<ExecKind, ElfError> {
    let e_type = check_header(b)?;
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(ElfError::NotExecutable { e_type });
    }
    let phoff = u64_at(b, 32)?;
    let phentsize = usize::from(u16_at(b, 54)?);
    let phnum = usize::from(u16_at(b, 56)?);
    for i in 0..phnum {
        let ph = entry_at(phoff, i, phentsize)?;
        if u32_at(b, ph)? == PT_INTERP {
            let off = u64_at(b, entry_at(ph, 1, 8)?)?;
            let size = u64_at(b, entry_at(ph, 1, 32)?)?;
            let raw = slice(b, off, size, "PT_INTERP")?;
            let interpreter = String::from_utf8_lossy(raw).trim_end_matches('\0').to_string();
            return Ok(ExecKind::Dynamic { interpreter });
        }
    }
    Ok(if e_type == ET_DYN { ExecKind::StaticPie } else { ExecKind::Static })
}

/// The bytes of the section called `name`, if the file has one.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, ElfError> {
    check_header(b)?;
    let shoff = u64_at(b, 40)?;
    let shentsize = usize::from(u16_at(b, 58)?);
    let shnum = usize::from(u16_at(b, 60)?);
    let shstrndx = usize::from(u16_at(b, 62)?);
    let sh = |i: usize| -> Result<(u32, usize, usize), ElfError> {
        let h = entry_at(shoff, i, shentsize)?;
        Ok((u32_at(b, h)?, u64_at(b, entry_at(h, 1, 24)?)?, u64_at(b, entry_at(h, 1, 32)?)?))
    };
    let (_, str_off, str_size) = sh(shstrndx)?;
    let names = slice(b, str_off, str_size, "shstrtab")?;
    for i in 0..shnum {
        let (name_off, off, size) = sh(i)?;
        let name_off =
            usize::try_from(name_off).map_err(|_| ElfError::Malformed { what: "name" })?;
        let Some(rest) = names.get(name_off..) else { continue };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            let data = slice(b, off, size, "section")?;
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// A kernel module's `depends=` list from its `.modinfo` section.
pub fn module_depends(b: &[u8]) -> Result<Vec<String>, ElfError> {
    let Some(info) = section(b, ".modinfo")? else {
        return Err(ElfError::Malformed { what: "no .modinfo section: not a kernel module" });
    };
    for entry in info.split(|&c| c == 0) {
        if let Some(list) = entry.strip_prefix(b"depends=") {
            return Ok(String::from_utf8_lossy(list)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect());
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {

    /// Offsets near the top of the address space are malformed input, not a panic (an
    /// addition overflowed in debug builds).
    #[test]
    fn huge_offsets_are_malformed_not_a_panic() {
        let header = |e_type: u16| {
            let mut b = vec![0u8; 64];
            b[..4].copy_from_slice(b"\x7fELF");
            b[4] = 2;
            b[5] = 1;
            b[16..18].copy_from_slice(&e_type.to_le_bytes());
            b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
            b
        };
        let mut sections = header(1);
        sections[40..48].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        sections[58..60].copy_from_slice(&64u16.to_le_bytes());
        sections[60..62].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(section(&sections, ".modinfo"), Err(ElfError::Malformed { .. })));
        let mut programs = header(ET_DYN);
        programs[32..40].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        programs[54..56].copy_from_slice(&56u16.to_le_bytes());
        programs[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(exec_kind(&programs), Err(ElfError::Malformed { .. })));
    }
    use super::*;

    #[test]
    fn this_test_binary_is_static_pie() {
        // The workspace builds every artifact static-pie (.cargo/config.toml), tests included.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(exec_kind(&me).unwrap(), ExecKind::StaticPie);
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert_eq!(exec_kind(b"#!/bin/sh\necho hi\n"), Err(ElfError::NotElf));
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(exec_kind(&me[..80]).is_err());
    }

    #[test]
    fn finds_an_interpreter() {
        // /bin/sh on any Debian is dynamically linked.
        match std::fs::read("/bin/sh").map(|b| exec_kind(&b)) {
            Ok(Ok(ExecKind::Dynamic { interpreter })) => {
                assert!(interpreter.contains("ld-linux"), "{interpreter}")
            }
            other => panic!("/bin/sh should be dynamic: {other:?}"),
        }
    }
}
