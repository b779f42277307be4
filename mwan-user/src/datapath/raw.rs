//! BPF map syscalls on raw bytes: element lookups and updates, batched
//! reads and writes. Used where the key and value types are not known at
//! compile time (copying a map of any layout) or not needed (counting).

use std::os::fd::RawFd;

use anyhow::{bail, Result};

/// Update flags: only a new key, only an existing one.
pub const BPF_NOEXIST: u64 = 1;
pub const BPF_EXIST: u64 = 2;

/// `bpf_attr` of the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Keys and values read from a map, back to back.
pub struct Entries {
    key_size: usize,
    value_size: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Entries {
    pub fn new(key_size: usize, value_size: usize) -> Entries {
        Entries {
            key_size,
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.keys.len() / self.key_size.max(1)
    }
    pub fn key(&self, i: usize) -> &[u8] {
        &self.keys[i * self.key_size..(i + 1) * self.key_size]
    }
    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_size..(i + 1) * self.value_size]
    }
    pub fn push(&mut self, k: &[u8], v: &[u8]) {
        self.keys.extend_from_slice(k);
        self.values.extend_from_slice(v);
    }
}

/// Every (key, value) of a map, key by key (`BPF_MAP_GET_NEXT_KEY`): for
/// maps without batch reads (tries).
pub fn read_keyed(fd: RawFd, key_size: usize, value_size: usize) -> Result<Entries> {
    let mut out = Entries::new(key_size, value_size);
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        match next_key(fd, key.as_deref(), &mut next) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => bail!("BPF_MAP_GET_NEXT_KEY: {e}"),
        }
        let mut value = vec![0u8; value_size];
        match lookup(fd, &next, &mut value) {
            Ok(()) => out.push(&next, &value),
            // Deleted meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => bail!("BPF_MAP_LOOKUP_ELEM: {e}"),
        }
        key = Some(next);
    }
}

/// Reads a hash map in batches (`BPF_MAP_LOOKUP_BATCH`), keys and values
/// of the given sizes as bytes; `each` returns false to stop.
pub fn read_batched(
    fd: std::os::fd::RawFd,
    key_size: usize,
    value_size: usize,
    chunk: u32,
    mut each: impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<()> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut chunk = chunk.max(1);
    // u64 storage: 8-byte aligned buffers.
    let mut keys: Vec<u64> = Vec::new();
    let mut values: Vec<u64> = Vec::new();
    // The hash-map batch cursor is a bucket index (u32).
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    loop {
        keys.resize((chunk as usize * key_size).div_ceil(8), 0);
        values.resize((chunk as usize * value_size).div_ceil(8), 0);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut token_in as *mut u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: fd as u32,
            ..Default::default()
        };
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let errno = if rc < 0 {
            std::io::Error::last_os_error().raw_os_error()
        } else {
            None
        };
        match errno {
            Some(libc::ENOSPC) => {
                // One bucket holds more entries than the chunk: grow it.
                chunk = chunk.saturating_mul(2);
                continue;
            }
            Some(e) if e != libc::ENOENT => bail!(
                "BPF_MAP_LOOKUP_BATCH: {}",
                std::io::Error::from_raw_os_error(e)
            ),
            _ => {}
        }
        // SAFETY: plain bytes of the u64 buffers.
        let kb = unsafe { std::slice::from_raw_parts(keys.as_ptr() as *const u8, keys.len() * 8) };
        let vb =
            unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 8) };
        for i in 0..attr.count as usize {
            let k = &kb[i * key_size..(i + 1) * key_size];
            let v = &vb[i * value_size..(i + 1) * value_size];
            if !each(k, v) {
                return Ok(());
            }
        }
        if errno == Some(libc::ENOENT) {
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

/// Writes `entries` in `order` into a fresh map: `BPF_MAP_UPDATE_BATCH`
/// (one syscall per 4096 entries: a million pins are read, sorted and
/// copied in about a second),
/// entry by entry where the kernel has no batch for the map. Stops when a
/// (non-LRU) map is full. Returns how many were written.
pub fn write_all(fd: RawFd, entries: &Entries, order: &[usize]) -> Result<u64> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const CHUNK: usize = 4096;
    let mut written = 0usize;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for chunk in order.chunks(CHUNK) {
        keys.clear();
        values.clear();
        for i in chunk {
            keys.extend_from_slice(entries.key(*i));
            values.extend_from_slice(entries.value(*i));
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc == 0 {
            written += chunk.len();
            continue;
        }
        // The kernel reports how many it wrote when it stopped midway, and
        // leaves `count` as it was when it has no batch for the map (then
        // rewriting is harmless). The rest one by one.
        let done = match attr.count as usize {
            n if n < chunk.len() => n,
            _ => 0,
        };
        written += done;
        for i in &chunk[done..] {
            match update(fd, entries.key(*i), entries.value(*i), 0) {
                Ok(()) => written += 1,
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) => return Ok(written as u64),
                Err(e) => bail!("{e}"),
            }
        }
    }
    Ok(written as u64)
}

/// `bpf_attr` of the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_cmd(
    cmd: libc::c_long,
    fd: RawFd,
    key: *const u8,
    value: u64,
    flags: u64,
) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as u64,
        value,
        flags,
    };
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn lookup(fd: RawFd, key: &[u8], value: &mut [u8]) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    elem_cmd(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        key.as_ptr(),
        value.as_mut_ptr() as u64,
        0,
    )
}

pub fn update(fd: RawFd, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    elem_cmd(
        BPF_MAP_UPDATE_ELEM,
        fd,
        key.as_ptr(),
        value.as_ptr() as u64,
        flags,
    )
}

pub fn next_key(fd: RawFd, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<()> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let k = key.map(|k| k.as_ptr()).unwrap_or(std::ptr::null());
    elem_cmd(BPF_MAP_GET_NEXT_KEY, fd, k, next.as_mut_ptr() as u64, 0)
}
