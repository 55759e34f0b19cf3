//! The binary tensor data extension's request framing (KServe v2 / Triton
//! `binary_tensor_data`): with an `Inference-Header-Content-Length: N` header, the body
//! is N bytes of JSON followed by the raw tensors of every input that names
//! `parameters.binary_data_size`, back to back in the order the inputs are listed.
//!
//! Grammar, checked in this order (one error each):
//! `body = json[N] binary`, `N <= len(body)`, and
//! `len(binary) = sum of binary_data_size over inputs, in order`.

use axum::http::HeaderValue;

use super::decode::InferInput;

/// The header naming the JSON part's length (both ways).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Splits a body into its JSON header and binary section (empty without the header).
pub fn split<'b>(
    body: &'b [u8],
    header_length: Option<&HeaderValue>,
) -> Result<(&'b [u8], &'b [u8]), String> {
    let Some(v) = header_length else {
        return Ok((body, &[]));
    };
    let n = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .ok_or_else(|| {
            format!(
                "Inference-Header-Content-Length {:?} is not a byte count",
                String::from_utf8_lossy(v.as_bytes())
            )
        })?;
    if n > body.len() {
        return Err(format!(
            "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
            body.len()
        ));
    }
    Ok(body.split_at(n))
}

/// Hands each input its slice of the binary section, in order: `Some` exactly for the
/// inputs that name `binary_data_size`. The sizes must add up to the section.
pub fn input_slices<'b>(
    inputs: &[InferInput<'_>],
    mut binary: &'b [u8],
    framed: bool,
) -> Result<Vec<Option<&'b [u8]>>, String> {
    let mut out = Vec::with_capacity(inputs.len());
    for i in inputs {
        let Some(size) = i.binary_data_size() else {
            out.push(None);
            continue;
        };
        if !framed {
            return Err(format!(
                "input {:?} names binary_data_size but the request has no Inference-Header-Content-Length header",
                i.name
            ));
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|s| *s <= binary.len())
            .ok_or_else(|| {
                format!(
                    "input {:?}: binary_data_size {size} runs past the body's binary section ({} bytes left)",
                    i.name,
                    binary.len()
                )
            })?;
        let (mine, rest) = binary.split_at(size);
        out.push(Some(mine));
        binary = rest;
    }
    if !binary.is_empty() {
        return Err(format!(
            "the body holds {} bytes of binary data beyond the inputs' binary_data_size",
            binary.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::decode::InferRequest;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn the_header_length_splits_json_from_binary_and_may_not_exceed_the_body() {
        assert_eq!(
            split(b"{}abcd", Some(&hv("2"))).unwrap(),
            (&b"{}"[..], &b"abcd"[..])
        );
        assert_eq!(split(b"{}", None).unwrap(), (&b"{}"[..], &b""[..]));
        let e = split(b"{}ab", Some(&hv("9"))).unwrap_err();
        assert!(e.contains("9 exceeds the body's 4 bytes"), "{e}");
        let e = split(b"{}", Some(&hv("-1"))).unwrap_err();
        assert!(e.contains("not a byte count"), "{e}");
    }

    #[test]
    fn binary_sizes_must_add_up_to_the_binary_section() {
        let json = r#"{"inputs":[
            {"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},
            {"name":"b","shape":[1],"datatype":"FP32","data":[1]},
            {"name":"c","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let req: InferRequest<'_> = serde_json::from_str(json).unwrap();
        let bin = [0u8; 12];
        let s = input_slices(&req.inputs, &bin, true).unwrap();
        assert_eq!(
            s.iter().map(|s| s.map(<[u8]>::len)).collect::<Vec<_>>(),
            [Some(4), None, Some(8)]
        );
        let e = input_slices(&req.inputs, &bin[..10], true).unwrap_err();
        assert!(e.contains("\"c\": binary_data_size 8 runs past"), "{e}");
        let long = [0u8; 13];
        let e = input_slices(&req.inputs, &long, true).unwrap_err();
        assert!(e.contains("1 bytes of binary data beyond"), "{e}");
        let e = input_slices(&req.inputs, &[], false).unwrap_err();
        assert!(e.contains("no Inference-Header-Content-Length"), "{e}");
    }
}
