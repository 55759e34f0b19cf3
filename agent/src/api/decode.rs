//! Decoding a KServe v2 inference request without a `serde_json::Value` tree (about
//! 10× the text in memory): the request is parsed with each input's `data` left as a
//! borrowed slice of the body, then that slice is read straight into the typed vector
//! its datatype names, capped at the number of values its shape names. An input sent
//! with the binary tensor data extension (`parameters.binary_data_size`) is read from its
//! slice of the body's binary section, little-endian, straight into the same vector.

use std::fmt;

use drover_protocol::manifest::{TensorData, TensorValue};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Deepest nesting of `data` arrays accepted.
const MAX_DEPTH: usize = 32;

#[derive(Deserialize)]
pub struct InferRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(borrow)]
    pub inputs: Vec<InferInput<'a>>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    pub parameters: RequestParameters,
}

/// Request parameters the agent acts on; others (`sequence_id`, `priority`, `timeout`,
/// custom ones) are accepted and ignored.
#[derive(Default, Deserialize)]
pub struct RequestParameters {
    /// Outputs not requested one by one come back binary.
    #[serde(default)]
    pub binary_data_output: bool,
}

#[derive(Deserialize)]
pub struct InferInput<'a> {
    pub name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    parameters: InputParameters,
}

#[derive(Default, Deserialize)]
struct InputParameters {
    binary_data_size: Option<u64>,
    shared_memory_region: Option<String>,
}

impl InferInput<'_> {
    /// Bytes this input takes in the body's binary section.
    pub fn binary_data_size(&self) -> Option<u64> {
        self.parameters.binary_data_size
    }
}

#[derive(Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: OutputParameters,
}

#[derive(Default, Deserialize)]
pub struct OutputParameters {
    pub binary_data: Option<bool>,
    pub classification: Option<u64>,
    pub shared_memory_region: Option<String>,
}

/// One decoded input: a tensor the runtime takes, or a BYTES tensor (checked element by
/// element; the runtime has no string tensors, so the caller refuses it with the reason).
pub enum Decoded {
    Tensor(TensorValue),
    Bytes { name: String, elements: usize },
}

/// Where the values go: the vector the datatype names (or, for BYTES, a count of
/// strings), and how many it may hold.
struct Sink<'s> {
    data: &'s mut TensorData,
    strings: Option<usize>,
    datatype: &'s str,
    max: usize,
}

impl Sink<'_> {
    fn push_f64<E: de::Error>(&mut self, v: f64) -> Result<(), E> {
        self.room()?;
        match self.data {
            _ if self.strings.is_some() => return Err(E::custom("BYTES data must be strings")),
            TensorData::F32(out) => out.push(v as f32),
            TensorData::I64(out) => {
                if v.fract() != 0.0 || !v.is_finite() {
                    return Err(E::custom(format!(
                        "{} data must be integers",
                        self.datatype
                    )));
                }
                out.push(v as i64)
            }
        }
        Ok(())
    }

    fn push_i64<E: de::Error>(&mut self, v: i64) -> Result<(), E> {
        self.room()?;
        match self.data {
            _ if self.strings.is_some() => return Err(E::custom("BYTES data must be strings")),
            TensorData::F32(out) => out.push(v as f32),
            TensorData::I64(out) => out.push(v),
        }
        Ok(())
    }

    fn push_str<E: de::Error>(&mut self) -> Result<(), E> {
        self.room()?;
        match &mut self.strings {
            Some(n) => *n += 1,
            None => return Err(non_numeric()),
        }
        Ok(())
    }

    fn room<E: de::Error>(&self) -> Result<(), E> {
        let len = match (&self.data, self.strings) {
            (_, Some(n)) => n,
            (TensorData::F32(v), None) => v.len(),
            (TensorData::I64(v), None) => v.len(),
        };
        if len >= self.max {
            return Err(E::custom(format!(
                "data holds more than the {} values its shape names",
                self.max
            )));
        }
        Ok(())
    }
}

/// One level of (possibly nested) `data`.
struct Level<'a, 's> {
    sink: &'a mut Sink<'s>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Level<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn non_numeric<E: de::Error>() -> E {
    E::custom("data holds a non-numeric value")
}

impl<'de> Visitor<'de> for Level<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("numbers, or nested arrays of numbers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("data is nested too deeply"));
        }
        while seq
            .next_element_seed(Level {
                sink: &mut *self.sink,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.sink.push_f64(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.sink.push_i64(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match i64::try_from(v) {
            Ok(v) => self.sink.push_i64(v),
            Err(_) => self.sink.push_f64(v as f64),
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.sink.push_i64(i64::from(v))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.sink.push_str()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(non_numeric())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(non_numeric())
    }
}

/// The shape as unsigned dimensions and the number of values it names.
fn shape_of(i: &InferInput<'_>) -> Result<(Vec<u64>, usize), String> {
    let shape = i
        .shape
        .iter()
        .map(|d| {
            u64::try_from(*d).map_err(|_| format!("input {:?}: negative dimension {d}", i.name))
        })
        .collect::<Result<Vec<u64>, String>>()?;
    let values = shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("input {:?}: shape {shape:?} is too large", i.name))?;
    Ok((shape, values))
}

/// Converts one request input: its JSON `data`, or `binary` (its slice of the body's
/// binary section, given exactly when it names `binary_data_size`), into the vector its
/// datatype names, holding exactly the values its shape names.
pub fn decode_input(i: InferInput<'_>, binary: Option<&[u8]>) -> Result<Decoded, String> {
    if i.parameters.shared_memory_region.is_some() {
        return Err(format!(
            "input {:?}: shared memory is not supported here; send the data in the body",
            i.name
        ));
    }
    let (shape, values) = shape_of(&i)?;
    match (binary, i.data) {
        (Some(_), Some(_)) => Err(format!(
            "input {:?} has both data and parameters.binary_data_size; send one",
            i.name
        )),
        (None, None) => Err(format!(
            "input {:?} has neither data nor parameters.binary_data_size",
            i.name
        )),
        (Some(bytes), None) => from_binary(i.name, &i.datatype, shape, values, bytes),
        (None, Some(raw)) => from_json(i.name, &i.datatype, shape, values, raw.get()),
    }
}

fn from_json(
    name: String,
    datatype: &str,
    shape: Vec<u64>,
    values: usize,
    text: &str,
) -> Result<Decoded, String> {
    // Each value takes at least two bytes of text ("1,"): a lying shape reserves nothing
    // beyond what the body can hold.
    let capacity = values.min(text.len() / 2 + 1);
    let mut strings = None;
    let mut data = match datatype {
        "FP32" | "FP64" | "FP16" => TensorData::F32(Vec::with_capacity(capacity)),
        "INT64" | "INT32" | "INT16" | "INT8" | "UINT8" | "UINT16" | "UINT32" | "UINT64"
        | "BOOL" => TensorData::I64(Vec::with_capacity(capacity)),
        "BYTES" => {
            strings = Some(0);
            TensorData::F32(Vec::new())
        }
        other => return Err(format!("input {name:?}: unsupported datatype {other:?}")),
    };
    let mut sink = Sink {
        data: &mut data,
        strings,
        datatype,
        max: values,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    Level {
        sink: &mut sink,
        depth: 0,
    }
    .deserialize(&mut de)
    .map_err(|e| format!("input {name:?}: {e}"))?;
    if let Some(elements) = sink.strings {
        if elements != values {
            return Err(format!(
                "input {name:?}: BYTES data holds {elements} strings but shape {shape:?} names {values}"
            ));
        }
        return Ok(Decoded::Bytes { name, elements });
    }
    Ok(Decoded::Tensor(TensorValue { name, shape, data }))
}

/// Bytes per element in the binary section for the datatypes the runtime takes.
fn binary_width(name: &str, datatype: &str) -> Result<usize, String> {
    match datatype {
        "FP32" | "INT32" => Ok(4),
        "FP64" | "INT64" => Ok(8),
        "FP16" | "BF16" | "INT16" | "INT8" | "UINT8" | "UINT16" | "UINT32" | "UINT64"
        | "BOOL" => Err(format!(
            "input {name:?}: binary {datatype} data is not taken by the runtime; send FP32, FP64, INT32 or INT64"
        )),
        other => Err(format!("input {name:?}: unsupported datatype {other:?}")),
    }
}

/// Reads little-endian elements of `width` bytes (`chunks_exact` yields exactly that).
fn le<const W: usize>(c: &[u8]) -> [u8; W] {
    let mut a = [0; W];
    a.copy_from_slice(c);
    a
}

fn from_binary(
    name: String,
    datatype: &str,
    shape: Vec<u64>,
    values: usize,
    bytes: &[u8],
) -> Result<Decoded, String> {
    if datatype == "BYTES" {
        let elements = bytes_elements(bytes).map_err(|e| format!("input {name:?}: {e}"))?;
        if elements != values {
            return Err(format!(
                "input {name:?}: BYTES data holds {elements} elements but shape {shape:?} names {values}"
            ));
        }
        return Ok(Decoded::Bytes { name, elements });
    }
    let width = binary_width(&name, datatype)?;
    let need = values.checked_mul(width);
    if need != Some(bytes.len()) {
        return Err(format!(
            "input {name:?}: binary_data_size is {} bytes but shape {shape:?} of {datatype} needs {}",
            bytes.len(),
            need.map_or_else(|| "more than fits in memory".into(), |n| n.to_string())
        ));
    }
    let data = match datatype {
        "FP32" => TensorData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(le(c)))
                .collect(),
        ),
        "FP64" => TensorData::F32(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(le(c)) as f32)
                .collect(),
        ),
        "INT32" => TensorData::I64(
            bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(le(c))))
                .collect(),
        ),
        _ => TensorData::I64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(le(c)))
                .collect(),
        ),
    };
    Ok(Decoded::Tensor(TensorValue { name, shape, data }))
}

/// Counts the elements of a binary BYTES tensor: each is a 4-byte little-endian length
/// and that many bytes, back to back, filling the slice exactly.
fn bytes_elements(mut bytes: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    while !bytes.is_empty() {
        let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(format!(
                "BYTES element {n} is cut off in its 4-byte length prefix"
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(format!(
                "BYTES element {n} claims {len} bytes but {} remain",
                rest.len()
            ));
        }
        bytes = &rest[len..];
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<TensorValue, String> {
        let req: InferRequest<'_> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        match decode_input(req.inputs.into_iter().next().unwrap(), None)? {
            Decoded::Tensor(t) => Ok(t),
            Decoded::Bytes { elements, .. } => Err(format!("{elements} strings")),
        }
    }

    #[test]
    fn flat_and_nested_data_decode_into_the_datatype_vector() {
        let t = decode(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[true,-4]]}]}"#).unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.data, TensorData::F32(vec![1.0, 2.5, 1.0, -4.0]));
        let t = decode(r#"{"inputs":[{"data":[3,-1],"datatype":"INT64","name":"x","shape":[2]}]}"#)
            .unwrap();
        assert_eq!(t.data, TensorData::I64(vec![3, -1]));
    }

    #[test]
    fn data_beyond_its_shape_non_numeric_fractional_ints_and_deep_nesting_are_refused() {
        let e = decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2,3]}]}"#)
            .unwrap_err();
        assert!(e.contains("more than the 2 values its shape names"), "{e}");
        let e = decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#)
            .unwrap_err();
        assert!(e.contains("non-numeric"), "{e}");
        let e = decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#)
            .unwrap_err();
        assert!(e.contains("INT64 data must be integers"), "{e}");
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let e = decode(&format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{deep}}}]}}"#
        ))
        .unwrap_err();
        assert!(e.contains("nested too deeply"), "{e}");
        let e = decode(r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,16],"datatype":"FP32","data":[1]}]}"#).unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    fn binary(json: &str, bytes: &[u8]) -> Result<Decoded, String> {
        let req: InferRequest<'_> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        decode_input(req.inputs.into_iter().next().unwrap(), Some(bytes))
    }

    fn input(datatype: &str, shape: &str, size: usize) -> String {
        format!(
            r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{datatype}","parameters":{{"binary_data_size":{size}}}}}]}}"#
        )
    }

    #[test]
    fn binary_data_decodes_little_endian_into_the_datatype_vector_nan_and_inf_included() {
        let v = [1.5f32, f32::NAN, f32::NEG_INFINITY];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let Ok(Decoded::Tensor(t)) = binary(&input("FP32", "[3]", 12), &bytes) else {
            panic!("not a tensor")
        };
        let TensorData::F32(got) = t.data else {
            panic!("not F32")
        };
        assert_eq!(
            (got[0], got[1].is_nan(), got[2]),
            (1.5, true, f32::NEG_INFINITY)
        );
        let bytes: Vec<u8> = [-2.25f64, 1e300]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let Ok(Decoded::Tensor(t)) = binary(&input("FP64", "[2]", 16), &bytes) else {
            panic!("not a tensor")
        };
        assert_eq!(t.data, TensorData::F32(vec![-2.25, f32::INFINITY]));
        let bytes: Vec<u8> = [-7i32, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
        let Ok(Decoded::Tensor(t)) = binary(&input("INT32", "[1,2]", 8), &bytes) else {
            panic!("not a tensor")
        };
        assert_eq!(
            (t.shape, t.data),
            (vec![1, 2], TensorData::I64(vec![-7, 9]))
        );
    }

    #[test]
    fn binary_sizes_shapes_and_bytes_elements_are_checked() {
        let e = binary(&input("FP32", "[3]", 8), &[0; 8]).err().unwrap();
        assert!(
            e.contains("binary_data_size is 8 bytes but shape [3] of FP32 needs 12"),
            "{e}"
        );
        let e = binary(&input("BOOL", "[2]", 2), &[1, 0]).err().unwrap();
        assert!(e.contains("binary BOOL data is not taken"), "{e}");
        let two = [1, 0, 0, 0, b'a', 0, 0, 0, 0];
        let Ok(Decoded::Bytes { elements, .. }) = binary(&input("BYTES", "[2]", 9), &two) else {
            panic!("not bytes")
        };
        assert_eq!(elements, 2);
        let e = binary(&input("BYTES", "[3]", 9), &two).err().unwrap();
        assert!(e.contains("holds 2 elements but shape [3] names 3"), "{e}");
        let e = binary(&input("BYTES", "[1]", 2), &[1, 0]).err().unwrap();
        assert!(e.contains("cut off in its 4-byte length prefix"), "{e}");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"BYTES","data":["a","b"]}]}"#)
                .unwrap_err();
        assert_eq!(e, "2 strings");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"BYTES","data":["a",1]}]}"#)
                .unwrap_err();
        assert!(e.contains("BYTES data must be strings"), "{e}");
        let e = decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#).unwrap_err();
        assert!(
            e.contains("neither data nor parameters.binary_data_size"),
            "{e}"
        );
    }
}
