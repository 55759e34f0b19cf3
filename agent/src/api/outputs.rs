//! Inference responses: each output as JSON `data` or, with the binary tensor data
//! extension, as `parameters.binary_data_size` in the JSON header and its raw
//! little-endian bytes after it (`Inference-Header-Content-Length` names the header's
//! length). Outputs carry the datatype the model's metadata names, so a client decoding
//! the bytes by that datatype reads what the model produced.

use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use drover_protocol::manifest::{DType, TensorData, TensorSpec, TensorValue};
use serde::ser::{Serialize, Serializer};

use super::binary::HEADER_LENGTH;

/// The KServe v2 name of a model tensor's element type.
pub fn datatype(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::U8 => "UINT8",
        DType::Bool => "BOOL",
        DType::String => "BYTES",
    }
}

/// The datatype an output is sent as: the model's own over the runtime's vector (F32
/// holds FP32 and FP64 outputs, I64 every integer and boolean one).
fn out_datatype(t: &TensorValue, spec: Option<DType>) -> &'static str {
    match (&t.data, spec) {
        (TensorData::F32(_), Some(DType::F64)) => "FP64",
        (TensorData::F32(_), _) => "FP32",
        (TensorData::I64(_), Some(d @ (DType::I32 | DType::U8 | DType::Bool))) => datatype(d),
        (TensorData::I64(_), _) => "INT64",
    }
}

/// Appends an output's values as `datatype` (from [`out_datatype`]), little-endian.
fn append_le(out: &mut Vec<u8>, data: &TensorData, datatype: &str) {
    match (data, datatype) {
        (TensorData::F32(v), "FP64") => v
            .iter()
            .for_each(|x| out.extend_from_slice(&f64::from(*x).to_le_bytes())),
        (TensorData::F32(v), _) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        // The runtime widened these from the model's type, so narrowing is exact.
        (TensorData::I64(v), "INT32") => v
            .iter()
            .for_each(|x| out.extend_from_slice(&(*x as i32).to_le_bytes())),
        (TensorData::I64(v), "UINT8" | "BOOL") => out.extend(v.iter().map(|x| *x as u8)),
        (TensorData::I64(v), _) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
}

fn width(datatype: &str) -> usize {
    match datatype {
        "UINT8" | "BOOL" => 1,
        "FP32" | "INT32" => 4,
        _ => 8,
    }
}

/// One output to send, and whether binary.
pub struct Wanted<'a> {
    pub name: &'a str,
    pub binary: bool,
}

#[derive(serde::Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(serde::Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// JSON `data` straight from the runtime's vector (no intermediate JSON tree); BOOL as
/// `true`/`false` as the protocol writes it.
enum JsonData<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
    Bool(&'a [i64]),
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            JsonData::F32(v) => v.serialize(s),
            JsonData::I64(v) => v.serialize(s),
            JsonData::Bool(v) => s.collect_seq(v.iter().map(|x| *x != 0)),
        }
    }
}

#[derive(serde::Serialize)]
pub struct Header<'a> {
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub id: String,
    pub parameters: ResponseParameters,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(serde::Serialize)]
pub struct ResponseParameters {
    pub drover_request_id: u64,
}

/// Builds the response: JSON when every output is JSON, else the JSON header followed by
/// the binary outputs' bytes (one buffer of their size; nothing else is copied).
pub fn respond(
    model_name: &str,
    model_version: &str,
    id: String,
    request_id: u64,
    specs: &[TensorSpec],
    outputs: &[TensorValue],
    wanted: &[Wanted<'_>],
) -> Result<Response, String> {
    let mut json = Vec::with_capacity(wanted.len());
    let mut binary_len = 0;
    for w in wanted {
        let t = outputs
            .iter()
            .find(|o| o.name == w.name)
            .ok_or_else(|| format!("the model produced no output {:?}", w.name))?;
        let spec = specs.iter().find(|s| s.name == t.name).map(|s| s.dtype);
        let dt = out_datatype(t, spec);
        let (parameters, data) = if w.binary {
            let n = t.shape.iter().product::<u64>() as usize * width(dt);
            binary_len += n;
            (
                Some(BinarySize {
                    binary_data_size: n,
                }),
                None,
            )
        } else {
            let data = match (&t.data, dt) {
                (TensorData::F32(v), _) => JsonData::F32(v),
                (TensorData::I64(v), "BOOL") => JsonData::Bool(v),
                (TensorData::I64(v), _) => JsonData::I64(v),
            };
            (None, Some(data))
        };
        json.push(OutputJson {
            name: &t.name,
            datatype: dt,
            shape: &t.shape,
            parameters,
            data,
        });
    }
    let header = Header {
        model_name,
        model_version,
        id,
        parameters: ResponseParameters {
            drover_request_id: request_id,
        },
        outputs: json,
    };
    let mut body =
        serde_json::to_vec(&header).map_err(|e| format!("could not encode the response: {e}"))?;
    if binary_len == 0 {
        return Ok(([(CONTENT_TYPE, "application/json")], body).into_response());
    }
    let header_len = body.len();
    body.reserve_exact(binary_len);
    for w in wanted.iter().filter(|w| w.binary) {
        if let Some(t) = outputs.iter().find(|o| o.name == w.name) {
            let spec = specs.iter().find(|s| s.name == t.name).map(|s| s.dtype);
            append_le(&mut body, &t.data, out_datatype(t, spec));
        }
    }
    Ok((
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                axum::http::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_len),
            ),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, data: TensorData) -> TensorValue {
        let n = match &data {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        };
        TensorValue {
            name: name.into(),
            shape: vec![n as u64],
            data,
        }
    }

    #[test]
    fn outputs_are_sent_as_the_models_datatype_in_binary_and_json() {
        let spec = |name: &str, dtype| TensorSpec {
            name: name.into(),
            dtype,
            shape: vec![],
        };
        let specs = [
            spec("f", DType::F64),
            spec("b", DType::Bool),
            spec("i", DType::I32),
        ];
        let f = t("f", TensorData::F32(vec![1.5, f32::NAN]));
        let b = t("b", TensorData::I64(vec![1, 0]));
        let i = t("i", TensorData::I64(vec![-2]));
        let mut out = Vec::new();
        append_le(&mut out, &f.data, out_datatype(&f, Some(DType::F64)));
        append_le(&mut out, &b.data, out_datatype(&b, Some(DType::Bool)));
        append_le(&mut out, &i.data, out_datatype(&i, Some(DType::I32)));
        assert_eq!(&out[..8], 1.5f64.to_le_bytes());
        assert!(f64::from_le_bytes(out[8..16].try_into().unwrap()).is_nan());
        assert_eq!(&out[16..], [1, 0, 0xfe, 0xff, 0xff, 0xff]);
        let outputs = [f, b, i];
        let wanted = [
            Wanted {
                name: "b",
                binary: false,
            },
            Wanted {
                name: "i",
                binary: false,
            },
        ];
        let r = respond("m", "1", "x".into(), 1, &specs, &outputs, &wanted).unwrap();
        assert!(r.headers().get(HEADER_LENGTH).is_none());
        let bools = serde_json::to_string(&JsonData::Bool(&[1, 0])).unwrap();
        assert_eq!(bools, "[true,false]");
    }
}
