//! Which kernel modules the initramfs needs, in load order.
//!
//! Dependencies come from each module's own `.modinfo` section (`depends=`), read from the ELF
//! file, so an unpacked kernel package works without `depmod` having run (Debian's package
//! ships no `modules.dep`; it is made at install time). Modules built into the kernel
//! (`modules.builtin`) are skipped. Pure: the caller reads the files.

use std::collections::{BTreeMap, BTreeSet};

/// What the guest agent's boot needs: the virtio bus, disk, network and console (the simulated
/// PSP's channel), an entropy source, dm-crypt with AES-XTS (AES-NI; TCG emulates it with
/// `-cpu max`), the kernel crypto API's user interface libcryptsetup uses, and pvpanic, on PCI
/// (QEMU) and ISA (libvirt's `<panic model='pvpanic'/>`), so a failed boot ends the VM as
/// crashed.
pub const NEEDED: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "dm_crypt",
    "xts",
    "aesni_intel",
    "algif_skcipher",
    "algif_hash",
    "pvpanic_pci",
    "pvpanic_mmio",
];

/// Why the modules cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("module {0} is neither in the module folder nor built into the kernel")]
    Missing(String),
    #[error("{path}: not a 64-bit little-endian ELF module with a .modinfo section ({why})")]
    BadElf { path: String, why: &'static str },
    #[error("module dependencies form a cycle through {0}")]
    Cycle(String),
    #[error("cannot read module {path}: {why}")]
    Unreadable { path: String, why: String },
}

/// The canonical name of a module: `-` and `_` are the same to the kernel.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a `.ko` path (`kernel/drivers/md/dm-crypt.ko` → `dm_crypt`).
pub fn name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    file.strip_suffix(".ko").map(canonical)
}

/// The names in `modules.builtin` (one path per line).
pub fn builtin(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| name_of(l.trim())).collect()
}

fn u16le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64le(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The `depends=` of a module's `.modinfo` section (empty names dropped). Never panics.
pub fn depends(path: &str, elf: &[u8]) -> Result<Vec<String>, ModuleError> {
    let bad = |why| ModuleError::BadElf {
        path: path.to_string(),
        why,
    };
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(bad("no ELF magic"));
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(bad("not ELF64 little-endian"));
    }
    let shoff = u64le(elf, 0x28).ok_or(bad("truncated header"))? as usize;
    let shentsize = u16le(elf, 0x3a).ok_or(bad("truncated header"))? as usize;
    let shnum = u16le(elf, 0x3c).ok_or(bad("truncated header"))? as usize;
    let shstrndx = u16le(elf, 0x3e).ok_or(bad("truncated header"))? as usize;
    if shentsize < 0x40 {
        return Err(bad("section headers too small"));
    }
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32le(elf, at)?;
        let off = usize::try_from(u64le(elf, at.checked_add(0x18)?)?).ok()?;
        let size = usize::try_from(u64le(elf, at.checked_add(0x20)?)?).ok()?;
        Some((name, off, size))
    };
    let bytes = |off: usize, size: usize| elf.get(off..off.checked_add(size)?);
    let (_, stroff, strsize) = section(shstrndx).ok_or(bad("no section name table"))?;
    let names = bytes(stroff, strsize).ok_or(bad("section name table out of bounds"))?;
    for i in 0..shnum {
        let (name, off, size) = section(i).ok_or(bad("section header out of bounds"))?;
        let Some(rest) = names.get(name as usize..) else {
            continue;
        };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] != b".modinfo" {
            continue;
        }
        let info = bytes(off, size).ok_or(bad(".modinfo out of bounds"))?;
        let mut deps = Vec::new();
        for entry in info.split(|&c| c == 0) {
            if let Some(list) = entry.strip_prefix(b"depends=") {
                let list = String::from_utf8_lossy(list);
                deps.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|d| !d.is_empty())
                        .map(canonical),
                );
            }
        }
        return Ok(deps);
    }
    Err(bad("no .modinfo section"))
}

/// The `.ko` files to load, dependencies first, for `wanted`: `index` maps each module name to
/// its path, `deps` reads a module's dependencies (from its file), `builtin` is skipped.
pub fn load_order(
    wanted: &[&str],
    index: &BTreeMap<String, String>,
    builtin: &BTreeSet<String>,
    mut deps: impl FnMut(&str) -> Result<Vec<String>, ModuleError>,
) -> Result<Vec<String>, ModuleError> {
    fn visit(
        name: &str,
        index: &BTreeMap<String, String>,
        builtin: &BTreeSet<String>,
        deps: &mut dyn FnMut(&str) -> Result<Vec<String>, ModuleError>,
        on_path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), ModuleError> {
        let name = canonical(name);
        if builtin.contains(&name) {
            return Ok(());
        }
        let path = index
            .get(&name)
            .ok_or_else(|| ModuleError::Missing(name.clone()))?;
        if out.contains(path) {
            return Ok(());
        }
        if on_path.contains(&name) {
            return Err(ModuleError::Cycle(name));
        }
        on_path.push(name.clone());
        for d in deps(path)? {
            visit(&d, index, builtin, deps, on_path, out)?;
        }
        on_path.pop();
        out.push(path.clone());
        Ok(())
    }
    let mut out = Vec::new();
    for w in wanted {
        visit(w, index, builtin, &mut deps, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with a section name table and a `.modinfo` holding `info`.
    pub fn fake_module(info: &[u8]) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 0x40];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let names_off = elf.len();
        elf.extend_from_slice(names);
        let info_off = elf.len();
        elf.extend_from_slice(info);
        let shoff = elf.len();
        // Section 0: null; 1: .shstrtab; 2: .modinfo.
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 0x40];
            s[..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&s);
        };
        sh(0, 0, 0);
        sh(1, names_off, names.len());
        sh(11, info_off, info.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn depends_is_read_from_modinfo() {
        let m = fake_module(b"license=GPL\0depends=dm-mod,dm-bufio\0name=dm_crypt\0");
        assert_eq!(depends("x.ko", &m).unwrap(), ["dm_mod", "dm_bufio"]);
        let m = fake_module(b"depends=\0");
        assert!(depends("x.ko", &m).unwrap().is_empty());
        assert!(depends("x.ko", b"not elf").is_err());
        assert!(depends("x.ko", &m[..0x30]).is_err());
    }

    #[test]
    fn dependencies_load_first_once_and_builtins_are_skipped() {
        let index: BTreeMap<String, String> = [
            ("dm_crypt", "md/dm-crypt.ko"),
            ("dm_mod", "md/dm-mod.ko"),
            ("dm_bufio", "md/dm-bufio.ko"),
            ("xts", "crypto/xts.ko"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let builtin = builtin("kernel/fs/ext4/ext4.ko\nkernel/crypto/ecb.ko\n");
        let deps = |p: &str| {
            Ok(match p {
                "md/dm-crypt.ko" => vec!["dm_mod".into(), "dm_bufio".into()],
                "md/dm-bufio.ko" => vec!["dm_mod".into()],
                "crypto/xts.ko" => vec!["ecb".into()],
                _ => vec![],
            })
        };
        let order = load_order(
            &["dm-crypt", "xts", "ext4", "dm_mod"],
            &index,
            &builtin,
            deps,
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "md/dm-mod.ko",
                "md/dm-bufio.ko",
                "md/dm-crypt.ko",
                "crypto/xts.ko"
            ]
        );
        assert_eq!(
            load_order(&["nope"], &index, &builtin, |_| Ok(vec![])),
            Err(ModuleError::Missing("nope".into()))
        );
        let cyclic = |p: &str| {
            Ok(match p {
                "md/dm-mod.ko" => vec!["dm_bufio".into()],
                "md/dm-bufio.ko" => vec!["dm_mod".into()],
                _ => vec![],
            })
        };
        assert!(matches!(
            load_order(&["dm_mod"], &index, &builtin, cyclic),
            Err(ModuleError::Cycle(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn depends_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = depends("fuzz.ko", &bytes);
            let mut elf = fake_module(b"depends=a\0");
            let n = elf.len();
            for (i, b) in bytes.iter().enumerate().take(n) {
                elf[(i * 7) % n] ^= b;
            }
            let _ = depends("fuzz.ko", &elf);
        }
    }
}
