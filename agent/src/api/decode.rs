//! Decoding a KServe v2 JSON inference request without a `serde_json::Value` tree (about
//! 10× the text in memory): the request is parsed with each input's `data` left as a
//! borrowed slice of the body, then that slice is read straight into the typed vector
//! its datatype names, capped at the number of values its shape names.

use std::fmt;

use drover_protocol::manifest::{TensorData, TensorValue};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Deepest nesting of `data` arrays accepted.
const MAX_DEPTH: usize = 32;

#[derive(Deserialize)]
struct InferRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(borrow)]
    inputs: Vec<InferInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct InferInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
}

/// A request body decoded: what inference needs of it.
#[derive(Debug)]
pub struct Decoded {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// The outputs asked for by name; `None`: all of them.
    pub outputs: Option<Vec<String>>,
    pub inputs: Vec<TensorValue>,
}

/// Decodes a whole request body; the error is the 400 response's message. Also the
/// entry of the `agent/fuzz` target `infer_request`.
pub fn decode_request(body: &[u8]) -> Result<Decoded, String> {
    let req: InferRequest<'_> =
        serde_json::from_slice(body).map_err(|e| format!("malformed inference request: {e}"))?;
    let inputs = req
        .inputs
        .into_iter()
        .map(to_tensor)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Decoded {
        id: req.id,
        outputs: req.outputs.map(|o| o.into_iter().map(|o| o.name).collect()),
        inputs,
    })
}

/// Where the values go: the vector the datatype names, and how many it may hold.
struct Sink<'s> {
    data: &'s mut TensorData,
    datatype: &'s str,
    max: usize,
}

impl Sink<'_> {
    fn push_f64<E: de::Error>(&mut self, v: f64) -> Result<(), E> {
        self.room()?;
        match self.data {
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
            TensorData::F32(out) => out.push(v as f32),
            TensorData::I64(out) => out.push(v),
        }
        Ok(())
    }

    fn room<E: de::Error>(&self) -> Result<(), E> {
        let len = match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
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
        Err(non_numeric())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(non_numeric())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(non_numeric())
    }
}

/// Converts one request input into a tensor, reading its data into the vector its
/// datatype names: at most as many values as its shape names.
fn to_tensor(i: InferInput<'_>) -> Result<TensorValue, String> {
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
    let text = i.data.get();
    // Each value takes at least two bytes of text ("1,"): a lying shape reserves nothing
    // beyond what the body can hold.
    let capacity = values.min(text.len() / 2 + 1);
    let mut data = match i.datatype.as_str() {
        "FP32" | "FP64" | "FP16" => TensorData::F32(Vec::with_capacity(capacity)),
        "INT64" | "INT32" | "INT16" | "INT8" | "UINT8" | "UINT16" | "UINT32" | "UINT64"
        | "BOOL" => TensorData::I64(Vec::with_capacity(capacity)),
        other => {
            return Err(format!(
                "input {:?}: unsupported datatype {other:?}",
                i.name
            ))
        }
    };
    let mut sink = Sink {
        data: &mut data,
        datatype: &i.datatype,
        max: values,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    Level {
        sink: &mut sink,
        depth: 0,
    }
    .deserialize(&mut de)
    .map_err(|e| format!("input {:?}: {e}", i.name))?;
    Ok(TensorValue {
        name: i.name,
        shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<TensorValue, String> {
        let req: InferRequest<'_> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        req.inputs.into_iter().map(to_tensor).next().unwrap()
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
}
