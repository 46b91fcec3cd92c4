//! The `a{sv}` options of `Generate` and `Complete`: parsed and checked here, on both sides of
//! the bus, so that an unknown name or a bad value is an `InvalidArgument` naming it.
//!
//! Integers may come as any D-Bus integer type (`gdbus` writes `<5>` as `int32`), doubles as a
//! double or an integer; anything else is refused.
use std::collections::HashMap;

use zbus::zvariant::{Array, OwnedValue, Value};

use crate::Error;

/// Every option `Generate`/`Complete` accept, with its type and range.
pub const OPTION_NAMES: [(&str, &str); 15] = [
    ("max_tokens", "u: most tokens to generate, 1 or more (default: the service's)"),
    ("temperature", "d: 0 = greedy (default), up to 100"),
    ("top_k", "u: keep the k most likely tokens, 0 = off (default)"),
    ("top_p", "d: nucleus mass in (0, 1], 1 = off (default)"),
    ("seed", "t: sampling seed (default 0)"),
    ("stop", "as: stop before any of these strings (up to 16, each 1-256 bytes)"),
    ("attention", "s: attention mode, e.g. dense, fasa, oracle, streaming, quest (default: the service's)"),
    ("budget", "u: tokens attended per step by the sparse modes, 1 or more"),
    ("chunks", "u: dominant frequency chunks per head for the FASA modes, 1 or more"),
    ("sinks", "u: first tokens always attended"),
    ("recent", "u: most recent tokens always attended"),
    ("pool", "u: calibrated FCs the per-step choice picks the chunks from (fasa mode), at least chunks"),
    ("rerank", "u: candidates re-scored exactly before the budget is kept, 0 = off"),
    ("per_group", "b: one token set per KV group (true) or per query head (false)"),
    ("dense_layers", "u: the first layers that always attend densely"),
];

/// Largest value of the attention knobs (`budget`, `chunks`, `sinks`, `recent`).
pub const MAX_ATTENTION_KNOB: u64 = 1 << 24;

pub const MAX_TOKENS_LIMIT: u64 = 1 << 20;
pub const MAX_TEMPERATURE: f64 = 100.0;
pub const MAX_TOP_K: u64 = 1 << 20;
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// Options as the caller gave them; `None` means "the service's default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_k: Option<u32>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Attention overrides; the service checks the mode's name against the modes it has.
    pub attention: Option<String>,
    pub budget: Option<u32>,
    pub chunks: Option<u32>,
    pub sinks: Option<u32>,
    pub recent: Option<u32>,
    pub pool: Option<u32>,
    pub rerank: Option<u32>,
    pub per_group: Option<bool>,
    pub dense_layers: Option<u32>,
}

impl GenerateOptions {
    /// Parses and range-checks the `a{sv}` a caller sent.
    pub fn from_dict(dict: &HashMap<String, OwnedValue>) -> Result<Self, Error> {
        let mut opts = GenerateOptions::default();
        // Sorted, so that the first bad option reported does not depend on hash order.
        let mut keys: Vec<&String> = dict.keys().collect();
        keys.sort();
        for key in keys {
            let value: &Value<'_> = &dict[key];
            match key.as_str() {
                "max_tokens" => {
                    let v = integer(key, value)?;
                    if !(1..=MAX_TOKENS_LIMIT as i128).contains(&v) {
                        return Err(bad(key, format!("must be between 1 and {MAX_TOKENS_LIMIT}, got {v}")));
                    }
                    opts.max_tokens = Some(v as u32);
                }
                "temperature" => {
                    let v = double(key, value)?;
                    if !(0.0..=MAX_TEMPERATURE).contains(&v) {
                        return Err(bad(key, format!("must be between 0 and {MAX_TEMPERATURE}, got {v}")));
                    }
                    opts.temperature = Some(v);
                }
                "top_k" => {
                    let v = integer(key, value)?;
                    if !(0..=MAX_TOP_K as i128).contains(&v) {
                        return Err(bad(key, format!("must be between 0 and {MAX_TOP_K}, got {v}")));
                    }
                    opts.top_k = Some(v as u32);
                }
                "top_p" => {
                    let v = double(key, value)?;
                    if !(v > 0.0 && v <= 1.0) {
                        return Err(bad(key, format!("must be in (0, 1], got {v}")));
                    }
                    opts.top_p = Some(v);
                }
                "seed" => {
                    let v = integer(key, value)?;
                    if !(0..=u64::MAX as i128).contains(&v) {
                        return Err(bad(key, format!("must be a non-negative integer, got {v}")));
                    }
                    opts.seed = Some(v as u64);
                }
                "stop" => opts.stop = strings(key, value)?,
                "attention" => match value {
                    Value::Str(mode) if !mode.is_empty() && mode.len() <= 32 => opts.attention = Some(mode.to_string()),
                    Value::Str(_) => return Err(bad(key, "must name a mode (1-32 bytes)".into())),
                    other => return Err(type_error(key, "a string", other)),
                },
                "per_group" => match value {
                    Value::Bool(b) => opts.per_group = Some(*b),
                    other => return Err(type_error(key, "a boolean", other)),
                },
                "budget" | "chunks" | "sinks" | "recent" | "pool" | "rerank" | "dense_layers" => {
                    let v = integer(key, value)?;
                    let min = if matches!(key.as_str(), "budget" | "chunks" | "pool") { 1 } else { 0 };
                    if !(min..=MAX_ATTENTION_KNOB as i128).contains(&v) {
                        return Err(bad(key, format!("must be between {min} and {MAX_ATTENTION_KNOB}, got {v}")));
                    }
                    let slot = match key.as_str() {
                        "budget" => &mut opts.budget,
                        "chunks" => &mut opts.chunks,
                        "sinks" => &mut opts.sinks,
                        "pool" => &mut opts.pool,
                        "rerank" => &mut opts.rerank,
                        "dense_layers" => &mut opts.dense_layers,
                        _ => &mut opts.recent,
                    };
                    *slot = Some(v as u32);
                }
                other => {
                    let known: Vec<&str> = OPTION_NAMES.iter().map(|(n, _)| *n).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown option '{}'; known options: {}",
                        printable(other),
                        known.join(", ")
                    )));
                }
            }
        }
        for s in &opts.stop {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(bad("stop", format!("each string must be 1 to {MAX_STOP_BYTES} bytes, got {}", s.len())));
            }
        }
        if opts.stop.len() > MAX_STOP_STRINGS {
            return Err(bad("stop", format!("at most {MAX_STOP_STRINGS} strings, got {}", opts.stop.len())));
        }
        Ok(opts)
    }

    /// The `a{sv}` to send: only the options that are set, each with its canonical type.
    pub fn to_dict(&self) -> HashMap<&'static str, Value<'static>> {
        let mut d = HashMap::new();
        if let Some(v) = self.max_tokens {
            d.insert("max_tokens", Value::U32(v));
        }
        if let Some(v) = self.temperature {
            d.insert("temperature", Value::F64(v));
        }
        if let Some(v) = self.top_k {
            d.insert("top_k", Value::U32(v));
        }
        if let Some(v) = self.top_p {
            d.insert("top_p", Value::F64(v));
        }
        if let Some(v) = self.seed {
            d.insert("seed", Value::U64(v));
        }
        if !self.stop.is_empty() {
            d.insert("stop", Value::Array(Array::from(self.stop.clone())));
        }
        if let Some(v) = &self.attention {
            d.insert("attention", Value::from(v.clone()));
        }
        let knobs = [
            ("budget", self.budget),
            ("chunks", self.chunks),
            ("sinks", self.sinks),
            ("recent", self.recent),
            ("pool", self.pool),
            ("rerank", self.rerank),
            ("dense_layers", self.dense_layers),
        ];
        for (key, v) in knobs {
            if let Some(v) = v {
                d.insert(key, Value::U32(v));
            }
        }
        if let Some(b) = self.per_group {
            d.insert("per_group", Value::Bool(b));
        }
        d
    }
}

/// An unsigned option of any D-Bus integer type within `range` (for the other methods' `a{sv}`).
pub fn unsigned(key: &str, value: &Value<'_>, range: std::ops::RangeInclusive<u64>) -> Result<u64, Error> {
    let v = integer(key, value)?;
    if !(*range.start() as i128..=*range.end() as i128).contains(&v) {
        return Err(bad(key, format!("must be between {} and {}, got {v}", range.start(), range.end())));
    }
    Ok(v as u64)
}

/// A non-empty string option.
pub fn text(key: &str, value: &Value<'_>) -> Result<String, Error> {
    match value {
        Value::Str(s) if !s.is_empty() => Ok(s.to_string()),
        Value::Str(_) => Err(bad(key, "must not be empty".into())),
        other => Err(type_error(key, "a string", other)),
    }
}

/// The error for an option a method does not take; `known` lists those it does.
pub fn unknown(key: &str, known: &str) -> Error {
    Error::InvalidArgument(format!("unknown option '{}'; known options: {known}", printable(key)))
}

fn bad(key: &str, what: String) -> Error {
    Error::InvalidArgument(format!("option '{key}' {what}"))
}

/// A key as it can be shown in a message: at most 64 characters, control characters escaped.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn type_error(key: &str, want: &str, value: &Value<'_>) -> Error {
    bad(key, format!("must be {want}, got a value of D-Bus type '{}'", value.value_signature()))
}

fn integer(key: &str, value: &Value<'_>) -> Result<i128, Error> {
    Ok(match value {
        Value::U8(v) => *v as i128,
        Value::I16(v) => *v as i128,
        Value::U16(v) => *v as i128,
        Value::I32(v) => *v as i128,
        Value::U32(v) => *v as i128,
        Value::I64(v) => *v as i128,
        Value::U64(v) => *v as i128,
        other => return Err(type_error(key, "an integer", other)),
    })
}

fn double(key: &str, value: &Value<'_>) -> Result<f64, Error> {
    let v = match value {
        Value::F64(v) => *v,
        Value::Bool(_) | Value::Str(_) | Value::Signature(_) | Value::ObjectPath(_) => {
            return Err(type_error(key, "a double", value))
        }
        other => match integer(key, other) {
            Ok(i) => i as f64,
            Err(_) => return Err(type_error(key, "a double", other)),
        },
    };
    if !v.is_finite() {
        return Err(bad(key, format!("must be a finite number, got {v}")));
    }
    Ok(v)
}

fn strings(key: &str, value: &Value<'_>) -> Result<Vec<String>, Error> {
    match value {
        Value::Str(s) => Ok(vec![s.to_string()]),
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.to_string()),
                other => Err(type_error(key, "an array of strings", other)),
            })
            .collect(),
        other => Err(type_error(key, "an array of strings", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(pairs: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap())).collect()
    }

    fn err(pairs: Vec<(&str, Value<'static>)>) -> String {
        match GenerateOptions::from_dict(&dict(pairs)) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_through_dict() {
        let opts = GenerateOptions {
            max_tokens: Some(12),
            temperature: Some(0.7),
            top_k: Some(40),
            top_p: Some(0.9),
            seed: Some(u64::MAX),
            stop: vec!["\n\n".into(), "END".into()],
            attention: Some("fasa".into()),
            budget: Some(256),
            chunks: Some(8),
            sinks: Some(0),
            recent: Some(32),
            pool: Some(16),
            rerank: Some(512),
            per_group: Some(false),
            dense_layers: Some(1),
        };
        let sent: HashMap<String, OwnedValue> = opts
            .to_dict()
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect();
        assert_eq!(GenerateOptions::from_dict(&sent).unwrap(), opts);
        assert_eq!(GenerateOptions::from_dict(&HashMap::new()).unwrap(), GenerateOptions::default());
    }

    #[test]
    fn lenient_integer_types() {
        let o = GenerateOptions::from_dict(&dict(vec![
            ("max_tokens", Value::I32(5)),
            ("temperature", Value::I32(1)),
            ("stop", Value::from("x")),
        ]))
        .unwrap();
        assert_eq!(o.max_tokens, Some(5));
        assert_eq!(o.temperature, Some(1.0));
        assert_eq!(o.stop, vec!["x".to_string()]);
    }

    #[test]
    fn bad_values_are_named() {
        assert!(err(vec![("bogus", Value::U32(1))]).contains("unknown option 'bogus'"));
        assert!(err(vec![("max_tokens", Value::I32(-5))]).contains("max_tokens"));
        assert!(err(vec![("max_tokens", Value::U32(0))]).contains("max_tokens"));
        assert!(err(vec![("max_tokens", Value::from("ten"))]).contains("must be an integer"));
        assert!(err(vec![("temperature", Value::F64(f64::NAN))]).contains("finite"));
        assert!(err(vec![("temperature", Value::F64(f64::INFINITY))]).contains("finite"));
        assert!(err(vec![("temperature", Value::F64(-1.0))]).contains("temperature"));
        assert!(err(vec![("temperature", Value::Bool(true))]).contains("must be a double"));
        assert!(err(vec![("top_p", Value::F64(0.0))]).contains("top_p"));
        assert!(err(vec![("top_p", Value::F64(1.5))]).contains("top_p"));
        assert!(err(vec![("seed", Value::I64(-1))]).contains("seed"));
        assert!(err(vec![("stop", Value::U32(3))]).contains("array of strings"));
        assert!(err(vec![("attention", Value::U32(3))]).contains("must be a string"));
        assert!(err(vec![("attention", Value::from(""))]).contains("attention"));
        assert!(err(vec![("budget", Value::U32(0))]).contains("budget"));
        assert!(err(vec![("recent", Value::I64(-1))]).contains("recent"));
        assert!(err(vec![("stop", Value::from(""))]).contains("1 to 256 bytes"));
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        assert!(err(vec![("stop", Value::Array(Array::from(many)))]).contains("at most 16"));
        let long_key = "k\u{1}".repeat(100);
        let m = err(vec![(long_key.as_str(), Value::U32(1))]);
        assert!(m.len() < 400 && m.contains("\\u{1}"), "{m}");
    }
}
