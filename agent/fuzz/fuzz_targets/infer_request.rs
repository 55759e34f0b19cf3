//! Fuzzes the agent's KServe v2 inference request decoding as `POST
//! /v2/models/{name}/infer` runs it on a body (`drover_agent::api::decode_request`): the
//! borrowed parse of the request, then each input's `data` read straight into the typed
//! vector its datatype names. Nothing may panic, and a tensor that decodes holds no more
//! values than its shape names.
#![no_main]

use drover_protocol::manifest::TensorData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = drover_agent::api::decode_request(data) else {
        return;
    };
    for t in &req.inputs {
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
