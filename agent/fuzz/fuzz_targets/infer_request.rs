//! Fuzzes the agent's KServe v2 inference request decoding as `POST
//! /v2/models/{name}/infer` runs it on a body (`drover_agent::api::decode_request`): the
//! split at `Inference-Header-Content-Length` (the first input byte chooses whether the
//! request is binary-framed and where the JSON part ends), the borrowed parse of the
//! request, each input's binary slice, then its `data` or bytes read straight into the
//! typed vector its datatype names. Nothing may panic, and a tensor that decodes holds no
//! more values than its shape names.
#![no_main]

use drover_protocol::manifest::TensorData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    // mode 0..=127: JSON only; 128..=255: binary-framed, the JSON part a share of the
    // body that grows with the mode, so both framings and every split point are reached.
    let header = (mode >= 128).then(|| {
        let n = (usize::from(mode - 128) * body.len()) / 127;
        n.to_string()
    });
    let Ok(tensors) = drover_agent::api::decode_request(body, header.as_deref()) else {
        return;
    };
    for t in &tensors {
        let len = match &t.data {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        } as u64;
        let values = t.shape.iter().try_fold(1u64, |n, d| n.checked_mul(*d));
        assert!(
            values.is_some_and(|n| len <= n),
            "{len} values for shape {:?}",
            t.shape
        );
    }
});
