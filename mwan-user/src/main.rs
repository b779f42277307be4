static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mwan.bpf.o"));
fn main() { println!("{}", EBPF_OBJ.len()); }
