//! The kernel functions the datapath calls, resolved for the running
//! kernel before the object is loaded (`build_support/kfunc.rs` marks the
//! calls at build time).
//!
//! The classifier asks conntrack for a connection its flow map does not
//! know (`bpf_skb_ct_lookup`, `bpf_ct_release`, and `struct nf_conn`'s
//! `mark`): a lost pin is made again from the WAN the connection records.
//! The kfuncs and the struct are found in the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). A kernel without them (before 5.18,
//! without BTF, or with conntrack built as a module, whose kfuncs aya
//! cannot reach) gets calls that find nothing, and mwan's nftables table
//! then restores the recorded mark of every LAN packet itself
//! ([`ConntrackAccess::Nftables`]).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use mwan_common::CT_MARK_OFFSET_MARKER;

#[path = "../../build_support/kfunc.rs"]
#[allow(dead_code)] // the build's half (marking the calls)
mod marks;

pub use marks::KFUNCS;

/// How the datapath reads a connection's recorded WAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConntrackAccess {
    /// The classifier reads it itself, for flows its map does not know.
    Kfuncs,
    /// It cannot: nftables restores it for every packet from the LAN.
    Nftables,
}

/// What the kernel's BTF says of the kfuncs: their ids, and the byte
/// offset of `nf_conn.mark`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSupport {
    pub ids: [i32; KFUNCS.len()],
    pub ct_mark_offset: i16,
}

/// Reads the support from the kernel's BTF at `path`; `None` with the
/// reason when something is missing.
pub fn kernel_support(path: &Path) -> std::result::Result<KernelSupport, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let btf = Btf::parse(&data).map_err(|e| format!("{}: {e:#}", path.display()))?;
    let mut ids = [0i32; KFUNCS.len()];
    for (i, name) in KFUNCS.iter().enumerate() {
        ids[i] = btf
            .find(BTF_KIND_FUNC, name)
            .ok_or_else(|| format!("no kfunc {name} in the kernel's BTF"))? as i32;
    }
    let nf_conn = btf
        .find(BTF_KIND_STRUCT, "nf_conn")
        .ok_or("no struct nf_conn in the kernel's BTF (conntrack built as a module?)")?;
    let bits = btf
        .member_bit_offset(nf_conn, "mark")
        .ok_or("struct nf_conn has no mark (CONFIG_NF_CONNTRACK_MARK off?)")?;
    if bits % 32 != 0 {
        return Err(format!("nf_conn.mark at bit {bits}, not a whole word"));
    }
    let ct_mark_offset = i16::try_from(bits / 8)
        .map_err(|_| format!("nf_conn.mark at byte {} is too far", bits / 8))?;
    Ok(KernelSupport {
        ids,
        ct_mark_offset,
    })
}

/// The object ready to load: kfunc ids and offsets written in (`support`)
/// or, without them, the calls turned into "nothing found".
pub fn resolve(obj: &[u8], support: Option<&KernelSupport>) -> Result<Vec<u8>> {
    let (bytes, calls, loads) = resolve_any(obj, support)?;
    if calls == 0 || loads == 0 {
        bail!("the datapath object has no marked kfunc calls ({calls}) or loads ({loads}): was it built by mwan-user's build script?");
    }
    Ok(bytes)
}

/// [`resolve`] for any object (one of another revision may have no kfunc
/// calls: it is returned as it is), with the calls and loads changed.
pub fn resolve_any(obj: &[u8], support: Option<&KernelSupport>) -> Result<(Vec<u8>, usize, usize)> {
    let mut bytes = obj.to_vec();
    let offsets = [(
        CT_MARK_OFFSET_MARKER,
        support.map_or(0, |s| s.ct_mark_offset),
    )];
    let r = marks::Resolved {
        ids: support.map(|s| s.ids),
        offsets: &offsets,
    };
    let (calls, loads) = marks::resolve(&mut bytes, &r)
        .map_err(|e| anyhow!("resolving the datapath's kfunc calls: {e}"))?;
    Ok((bytes, calls, loads))
}

/// `obj` (the embedded object, or one of another revision) resolved for
/// the running kernel, for tools that load it alone.
pub fn resolve_for_this_kernel(obj: &[u8]) -> Result<Vec<u8>> {
    let support = kernel_support(Path::new("/sys/kernel/btf/vmlinux")).ok();
    Ok(resolve_any(obj, support.as_ref())?.0)
}

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_KIND_STRUCT: u32 = 4;
const BTF_KIND_FUNC: u32 = 12;

/// Enough of a BTF blob to find a type by kind and name and a struct's
/// member.
struct Btf<'a> {
    strings: &'a [u8],
    /// Each type's header offset in `types` (type id = index + 1).
    types: Vec<usize>,
    data: &'a [u8],
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Btf<'a>> {
        let u16_at = |at: usize| -> Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(at..at + 2).context("BTF truncated")?.try_into()?,
            ))
        };
        let u32_at = |at: usize| -> Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(at..at + 4).context("BTF truncated")?.try_into()?,
            ))
        };
        if u16_at(0)? != BTF_MAGIC {
            bail!("not BTF (or not little-endian)");
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_at = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF strings truncated")?;
        let mut types = Vec::new();
        let mut at = types_at;
        while at < types_at + type_len {
            types.push(at);
            let info = u32_at(at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            at += 12
                + match kind {
                    1 | 14 | 17 => 4,     // int, var, decl tag
                    3 => 12,              // array
                    4 | 5 => vlen * 12,   // struct, union
                    6 | 13 => vlen * 8,   // enum, func proto
                    15 | 19 => vlen * 12, // datasec, enum64
                    _ => 0,
                };
        }
        Ok(Btf {
            strings,
            types,
            data,
        })
    }

    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes(
            self.data[at..at + 4]
                .try_into()
                .expect("checked while parsing"),
        )
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    /// The id of the type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|&at| {
                (self.word(at + 4) >> 24) & 0x1f == kind
                    && self.name(self.word(at)) == name.as_bytes()
            })
            .map(|i| i as u32 + 1)
    }

    /// The bit offset of member `name` of the struct `id`.
    fn member_bit_offset(&self, id: u32, name: &str) -> Option<u32> {
        let at = *self.types.get(id as usize - 1)?;
        let info = self.word(at + 4);
        let kind_flag = info >> 31 != 0;
        (0..(info & 0xffff) as usize).find_map(|i| {
            let m = at + 12 + i * 12;
            (self.name(self.word(m)) == name.as_bytes()).then(|| {
                let off = self.word(m + 8);
                if kind_flag {
                    off & 0x00ff_ffff
                } else {
                    off
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this machine's kernel (conntrack built in, BTF on) the kfuncs
    /// and `nf_conn.mark` are found; the ids are distinct and the offset
    /// a real one.
    #[test]
    fn the_running_kernel_is_read() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("no kernel BTF here: nothing to read");
            return;
        }
        match kernel_support(path) {
            Ok(s) => {
                assert!(
                    s.ids.iter().all(|id| *id > 0) && s.ids[0] != s.ids[1],
                    "{s:?}"
                );
                assert!((8..4096).contains(&s.ct_mark_offset), "{s:?}");
            }
            Err(why) => eprintln!("this kernel lacks the kfuncs: {why}"),
        }
    }

    /// The embedded object has its calls marked, and both ways of
    /// resolving leave no marked call behind.
    #[test]
    fn the_object_resolves_both_ways() {
        let obj = super::super::object();
        let support = KernelSupport {
            ids: [111, 222],
            ct_mark_offset: 0x88,
        };
        for s in [Some(&support), None] {
            let bytes = resolve(obj, s).unwrap();
            let mut again = bytes.clone();
            let r = marks::Resolved {
                ids: s.map(|s| s.ids),
                offsets: &[(CT_MARK_OFFSET_MARKER, 0)],
            };
            assert_eq!(
                marks::resolve(&mut again, &r).unwrap(),
                (0, 0),
                "nothing left marked"
            );
        }
        assert!(resolve(b"not an object", None).is_err());
    }
}
