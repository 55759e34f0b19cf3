//! Decoding a model chunk frame: `ChunkData.data` as bytes (`serde_bytes`, one copy)
//! against the same wire bytes decoded as a sequence of `u8` (what a plain `Vec<u8>`
//! field does), side by side in one run. Every device decodes every chunk published
//! while it downloads, so this is per-chunk CPU on the device.
//!
//! `cargo bench -p drover-protocol --bench chunk_decode` (without `--bench`, as under
//! `cargo test --all-targets`, a few iterations only: the figures then mean nothing).

use std::hint::black_box;
use std::time::Instant;

use drover_protocol::envelope::{decode_chunk, encode_chunk, HEADER_LEN};
use drover_protocol::messages::ChunkData;
use serde::Deserialize;

/// The same fields, `data` without `serde_bytes`.
#[derive(Deserialize)]
struct AsSequence {
    _manifest_digest: [u8; 32],
    _index: u32,
    data: Vec<u8>,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let iters = if full { 20_000 } else { 10 };
    let chunk = ChunkData {
        manifest_digest: [7; 32],
        index: 3,
        data: (0..64 * 1024).map(|i| (i * 31 % 251) as u8).collect(),
    };
    let frame = encode_chunk(&chunk);
    let body = &frame[HEADER_LEN..];
    // Same bytes on the wire: the sequence decoder reads what the bytes encoder wrote.
    let seq: AsSequence = postcard::from_bytes(body).expect("wire bytes differ");
    assert_eq!(seq.data, chunk.data);
    assert_eq!(decode_chunk(&frame).expect("decodes"), chunk);

    let time = |f: &dyn Fn() -> usize| {
        let t = Instant::now();
        let mut n = 0;
        for _ in 0..iters {
            n += f();
        }
        black_box(n);
        t.elapsed().as_secs_f64() * 1e6 / iters as f64
    };
    let as_bytes = time(&|| decode_chunk(black_box(&frame)).map_or(0, |c| c.data.len()));
    let as_seq =
        time(&|| postcard::from_bytes::<AsSequence>(black_box(body)).map_or(0, |c| c.data.len()));
    println!("64 KiB chunk frame, {iters} decodes each:");
    println!("  data as bytes (serde_bytes):  {as_bytes:8.2} us per chunk");
    println!("  data as a sequence of u8:     {as_seq:8.2} us per chunk");
    println!(
        "  ratio sequence / bytes:       {:8.1} x",
        as_seq / as_bytes.max(1e-9)
    );
}
