//! The two facts the testbed needs from ELF files: a kernel module's `.modinfo` strings and
//! whether an executable is statically linked.
#![forbid(unsafe_code)]

/// Errors of the ELF readers.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("the ELF {what} table lies outside the file ({len} bytes)")]
    Truncated { what: &'static str, len: usize },
    #[error("the module has no .modinfo section")]
    NoModinfo,
}

fn read<const N: usize>(bytes: &[u8], at: u64, what: &'static str) -> Result<[u8; N], ElfError> {
    let truncated = || ElfError::Truncated {
        what,
        len: bytes.len(),
    };
    let at = usize::try_from(at).map_err(|_| truncated())?;
    bytes
        .get(at..at.checked_add(N).ok_or_else(truncated)?)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(truncated)
}

fn u16_at(bytes: &[u8], at: u64, what: &'static str) -> Result<u16, ElfError> {
    read(bytes, at, what).map(u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], at: u64, what: &'static str) -> Result<u32, ElfError> {
    read(bytes, at, what).map(u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], at: u64, what: &'static str) -> Result<u64, ElfError> {
    read(bytes, at, what).map(u64::from_le_bytes)
}

fn check_header(bytes: &[u8]) -> Result<(), ElfError> {
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little endian.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(ElfError::NotElf64);
    }
    Ok(())
}

fn slice<'a>(
    bytes: &'a [u8],
    offset: u64,
    size: u64,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    let truncated = || ElfError::Truncated {
        what,
        len: bytes.len(),
    };
    let start = usize::try_from(offset).map_err(|_| truncated())?;
    let len = usize::try_from(size).map_err(|_| truncated())?;
    bytes
        .get(start..start.checked_add(len).ok_or_else(truncated)?)
        .ok_or_else(truncated)
}

/// The `key=value` strings of a kernel module's `.modinfo` section.
pub fn modinfo(bytes: &[u8]) -> Result<Vec<String>, ElfError> {
    check_header(bytes)?;
    let shoff = u64_at(bytes, 0x28, "section header")?;
    let shentsize = u64::from(u16_at(bytes, 0x3a, "section header")?);
    let shnum = u64::from(u16_at(bytes, 0x3c, "section header")?);
    let shstrndx = u64::from(u16_at(bytes, 0x3e, "section header")?);
    let header = |index: u64| shoff + index * shentsize;
    let names = slice(
        bytes,
        u64_at(bytes, header(shstrndx) + 24, "section header")?,
        u64_at(bytes, header(shstrndx) + 32, "section header")?,
        "section name",
    )?;
    for index in 0..shnum {
        let name_at = usize::try_from(u32_at(bytes, header(index), "section header")?)
            .map_err(|_| ElfError::NotElf64)?;
        let name = names
            .get(name_at..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = slice(
                bytes,
                u64_at(bytes, header(index) + 24, "section header")?,
                u64_at(bytes, header(index) + 32, "section header")?,
                ".modinfo",
            )?;
            return Ok(data
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }
    Err(ElfError::NoModinfo)
}

/// The modules a kernel module depends on (its `depends=` string), in the order listed.
pub fn module_depends(bytes: &[u8]) -> Result<Vec<String>, ElfError> {
    Ok(modinfo(bytes)?
        .iter()
        .filter_map(|entry| entry.strip_prefix("depends="))
        .flat_map(|list| list.split(','))
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Whether an ELF executable is statically linked (has no `PT_INTERP` program header).
pub fn is_static_executable(bytes: &[u8]) -> Result<bool, ElfError> {
    const PT_INTERP: u32 = 3;
    check_header(bytes)?;
    let phoff = u64_at(bytes, 0x20, "program header")?;
    let phentsize = u64::from(u16_at(bytes, 0x36, "program header")?);
    let phnum = u64::from(u16_at(bytes, 0x38, "program header")?);
    for index in 0..phnum {
        if u32_at(bytes, phoff + index * phentsize, "program header")? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file with a section-name table and one `.modinfo` section.
    fn module_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut file = vec![0u8; 64];
        file[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_at = file.len() as u64;
        file.extend_from_slice(names);
        let modinfo_at = file.len() as u64;
        file.extend_from_slice(modinfo);
        let shoff = file.len() as u64;
        // Section 0: null; 1: .shstrtab; 2: .modinfo.
        file.extend_from_slice(&[0u8; 64]);
        for (name, offset, size) in [
            (1u32, names_at, names.len() as u64),
            (11u32, modinfo_at, modinfo.len() as u64),
        ] {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&name.to_le_bytes());
            header[24..32].copy_from_slice(&offset.to_le_bytes());
            header[32..40].copy_from_slice(&size.to_le_bytes());
            file.extend_from_slice(&header);
        }
        file[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        file[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        file[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        file[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        file
    }

    #[test]
    fn reads_depends() {
        let module = module_with_modinfo(b"license=GPL\0depends=kvm,ccp\0name=kvm_amd\0");
        assert_eq!(module_depends(&module).unwrap(), ["kvm", "ccp"]);
        let module = module_with_modinfo(b"depends=\0name=irqbypass\0");
        assert!(module_depends(&module).unwrap().is_empty());
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert!(matches!(modinfo(b"hello"), Err(ElfError::NotElf64)));
        let mut module = module_with_modinfo(b"depends=a\0");
        // Cut the file inside the last section header (the .modinfo one), before its size.
        let len = module.len();
        module.truncate(len - 64 + 30);
        assert!(matches!(modinfo(&module), Err(ElfError::Truncated { .. })));
    }

    #[test]
    fn tells_static_from_dynamic() {
        let mut file = vec![0u8; 64 + 2 * 56];
        file[..6].copy_from_slice(b"\x7fELF\x02\x01");
        file[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        file[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        file[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        file[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert!(is_static_executable(&file).unwrap());
        file[120..124].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        assert!(!is_static_executable(&file).unwrap());
    }
}
