//! Typed reading of GGUF metadata values for the tokenizer builder.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::TokenizerError;

pub(super) fn missing(key: &str) -> TokenizerError {
    TokenizerError::Metadata(format!("`{key}` is missing"))
}

fn wrong_type(key: &str, expected: &str) -> TokenizerError {
    TokenizerError::Metadata(format!("`{key}` is not {expected}"))
}

fn as_int(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => i64::from(*v),
        Value::I8(v) => i64::from(*v),
        Value::U16(v) => i64::from(*v),
        Value::I16(v) => i64::from(*v),
        Value::U32(v) => i64::from(*v),
        Value::I32(v) => i64::from(*v),
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

/// Typed, lenient access to GGUF metadata: writers disagree on integer widths, so any integer
/// type is accepted where an integer is expected.
pub(super) struct Meta<'a>(pub(super) &'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    pub(super) fn string(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(key, "a string")),
        }
    }

    pub(super) fn u32(&self, key: &str) -> Result<Option<u32>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(value) => as_int(value)
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| wrong_type(key, "a token id")),
        }
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(value) => as_int(value)
                .map(|v| Some(v != 0))
                .ok_or_else(|| wrong_type(key, "a boolean")),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(wrong_type(key, "an array")),
        }
    }

    pub(super) fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(wrong_type(key, "an array of strings")),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub(super) fn ints(&self, key: &str) -> Result<Option<Vec<i64>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| as_int(v).ok_or_else(|| wrong_type(key, "an array of integers")))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub(super) fn floats(&self, key: &str) -> Result<Option<Vec<f32>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(wrong_type(key, "an array of floats")),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_metadata_of_any_width_is_accepted() {
        let metadata = HashMap::from([
            ("id".to_owned(), Value::I32(7)),
            ("flag".to_owned(), Value::U8(1)),
            ("negative".to_owned(), Value::I64(-1)),
        ]);
        let meta = Meta(&metadata);
        assert_eq!(meta.u32("id").unwrap(), Some(7));
        assert_eq!(meta.bool("flag").unwrap(), Some(true));
        assert_eq!(meta.u32("absent").unwrap(), None);
        assert!(meta.u32("negative").is_err());
        assert!(meta.string("id").is_err());
    }
}
