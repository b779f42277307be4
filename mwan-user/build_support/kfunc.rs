//! Kernel functions (kfuncs) called by the datapath, in the object's
//! instructions.
//!
//! The compiler emits a call of an undefined function as a BPF-to-BPF call
//! with a relocation against its symbol; neither bpf-linker nor aya 0.14
//! turns it into a kfunc call. So the build rewrites each such call in the
//! object ([`mark_calls`]): a kfunc call (`src_reg` =
//! `BPF_PSEUDO_KFUNC_CALL`) whose immediate says which kfunc of [`KFUNCS`]
//! it is. aya leaves those instructions alone (their relocation names no
//! text symbol). At load time, [`resolve`] writes the running kernel's BTF
//! id of each kfunc in its place, and the offset of a field the datapath
//! reads through the kfunc's result; on a kernel that lacks them each call
//! becomes `r0 = 0`, which the datapath takes for "nothing found".
//!
//! Shared by `mwan-user/build.rs` and the datapath's loader (plain std,
//! no dependencies).

/// The kfuncs the datapath calls, by name; their index is in each call's
/// immediate.
pub const KFUNCS: [&str; 2] = ["bpf_skb_ct_lookup", "bpf_ct_release"];

/// `imm` of a marked call: this, plus the index in [`KFUNCS`].
pub const CALL_MARKER: i32 = 0x6d6b_0000;

const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const OP_CALL: u8 = 0x85;
/// `r0 = 0` (`BPF_ALU64 | BPF_MOV | BPF_K`, dst r0).
const OP_MOV64_IMM: u8 = 0xb7;
const INSN: usize = 8;

const SHT_SYMTAB: u32 = 2;
const SHT_REL: u32 = 9;
const SHF_EXECINSTR: u64 = 4;

/// One section header of an ELF64 little-endian object.
struct Section {
    kind: u32,
    flags: u64,
    offset: usize,
    size: usize,
    link: usize,
    info: usize,
    entsize: usize,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("ELF truncated at {at}"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("ELF truncated at {at}"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("ELF truncated at {at}"))
}

fn sections(elf: &[u8]) -> Result<Vec<Section>, String> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        return Err("not a little-endian ELF64 object".into());
    }
    let shoff = u64_at(elf, 0x28)? as usize;
    let shentsize = u16_at(elf, 0x3a)? as usize;
    let shnum = u16_at(elf, 0x3c)? as usize;
    (0..shnum)
        .map(|i| {
            let h = shoff + i * shentsize;
            Ok(Section {
                kind: u32_at(elf, h + 4)?,
                flags: u64_at(elf, h + 8)?,
                offset: u64_at(elf, h + 0x18)? as usize,
                size: u64_at(elf, h + 0x20)? as usize,
                link: u32_at(elf, h + 0x28)? as usize,
                info: u32_at(elf, h + 0x2c)? as usize,
                entsize: u64_at(elf, h + 0x38)? as usize,
            })
        })
        .collect()
}

/// The NUL-terminated name at `at` of a string table.
fn name_at<'a>(elf: &'a [u8], strtab: &Section, at: usize) -> Result<&'a str, String> {
    let start = strtab.offset + at;
    let rest = elf
        .get(start..strtab.offset + strtab.size)
        .ok_or("symbol name outside its string table")?;
    let len = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..len]).map_err(|_| "symbol name is not UTF-8".to_string())
}

/// Build time: marks every call of a function of [`KFUNCS`] as a kfunc
/// call (see the module documentation). Returns how many were marked.
pub fn mark_calls(elf: &mut [u8]) -> Result<usize, String> {
    let secs = sections(elf)?;
    let mut patches = Vec::new();
    for rel in secs.iter().filter(|s| s.kind == SHT_REL) {
        let (Some(target), Some(symtab)) = (secs.get(rel.info), secs.get(rel.link)) else {
            continue;
        };
        if target.flags & SHF_EXECINSTR == 0 || symtab.kind != SHT_SYMTAB {
            continue;
        }
        let strtab = secs
            .get(symtab.link)
            .ok_or("symbol table without strings")?;
        let entsize = if rel.entsize == 0 { 16 } else { rel.entsize };
        for i in 0..rel.size / entsize {
            let r = rel.offset + i * entsize;
            let (offset, info) = (u64_at(elf, r)? as usize, u64_at(elf, r + 8)?);
            let sym = symtab.offset + (info >> 32) as usize * 24;
            let name = name_at(elf, strtab, u32_at(elf, sym)? as usize)?;
            let shndx = u16_at(elf, sym + 6)?;
            if let Some(k) = KFUNCS.iter().position(|f| *f == name) {
                if shndx != 0 {
                    return Err(format!("{name} is defined in the object: not a kfunc"));
                }
                patches.push((target.offset + offset, k));
            }
        }
    }
    for &(at, k) in &patches {
        if elf.get(at) != Some(&OP_CALL) {
            return Err(format!("relocation of {} on a non-call at {at}", KFUNCS[k]));
        }
        elf[at + 1] = (elf[at + 1] & 0x0f) | (BPF_PSEUDO_KFUNC_CALL << 4);
        elf[at + 4..at + 8].copy_from_slice(&(CALL_MARKER + k as i32).to_le_bytes());
    }
    Ok(patches.len())
}

/// What [`resolve`] writes in.
pub struct Resolved<'a> {
    /// The BTF id of each of [`KFUNCS`]; `None`: the kernel lacks one of
    /// them (each call becomes `r0 = 0`).
    pub ids: Option<[i32; KFUNCS.len()]>,
    /// Each marked field offset of the program's loads (`off` of a load
    /// instruction) and what to put in its place.
    pub offsets: &'a [(i16, i16)],
}

/// Load time: writes the kernel's kfunc ids (or `r0 = 0`) in place of the
/// marked calls, and the field offsets in place of the marked ones, in
/// every executable section. Returns the calls and loads it changed.
pub fn resolve(elf: &mut [u8], r: &Resolved) -> Result<(usize, usize), String> {
    let secs = sections(elf)?;
    let (mut calls, mut loads) = (0, 0);
    for s in secs.iter().filter(|s| s.flags & SHF_EXECINSTR != 0) {
        for at in (s.offset..s.offset + s.size).step_by(INSN) {
            let insn = elf
                .get(at..at + INSN)
                .ok_or("instruction past the object")?;
            let imm = i32::from_le_bytes(insn[4..8].try_into().expect("4 bytes"));
            let off = i16::from_le_bytes([insn[2], insn[3]]);
            let kfunc = insn[0] == OP_CALL && insn[1] >> 4 == BPF_PSEUDO_KFUNC_CALL;
            if kfunc {
                let k = imm.wrapping_sub(CALL_MARKER);
                if !(0..KFUNCS.len() as i32).contains(&k) {
                    // Resolved already.
                    continue;
                }
                let new = match r.ids {
                    Some(ids) => [OP_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, 0]
                        .into_iter()
                        .chain(ids[k as usize].to_le_bytes())
                        .collect::<Vec<u8>>(),
                    None => vec![OP_MOV64_IMM, 0, 0, 0, 0, 0, 0, 0],
                };
                elf[at..at + INSN].copy_from_slice(&new);
                calls += 1;
                continue;
            }
            // A load (`BPF_LDX | BPF_MEM`) at a marked offset.
            let is_load = insn[0] & 0x07 == 0x01 && insn[0] & 0xe0 == 0x60;
            if let Some((_, real)) = r.offsets.iter().find(|(m, _)| is_load && *m == off) {
                elf[at + 2..at + 4].copy_from_slice(&real.to_le_bytes());
                loads += 1;
            }
        }
    }
    Ok((calls, loads))
}
