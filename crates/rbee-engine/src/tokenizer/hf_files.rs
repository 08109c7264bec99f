//! Loads a Hugging Face `tokenizer.json`, with the settings that live in the files beside it:
//! `tokenizer_config.json` (special tokens, BOS/EOS policy, chat template),
//! `chat_template.jinja` (where newer checkpoints keep the template) and
//! `generation_config.json` (extra end-of-generation ids).

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::eog::Declared;
use super::{Spec, TokenizerError};

pub(super) fn spec_from_file(path: &Path) -> Result<Spec, TokenizerError> {
    let bytes = read(path)?;
    let inner = Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let config = read_json_if_present(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let generation = read_json_if_present(&dir.join("generation_config.json"))?;

    let lookup = |text: Option<String>| text.and_then(|t| inner.token_to_id(&t));
    // What the tokenizer's own post-processor adds around an empty input reveals its BOS/EOS
    // policy when the config does not state one.
    let around_empty = inner
        .encode_fast("", true)
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default();
    let bos_id = lookup(token_text(&config["bos_token"])).or_else(|| {
        generation
            .as_ref()
            .and_then(|g| g["bos_token_id"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
    });
    let eos_id = lookup(token_text(&config["eos_token"])).or_else(|| {
        ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
    });
    let add_bos = config["add_bos_token"]
        .as_bool()
        .unwrap_or_else(|| bos_id.is_some() && around_empty.first() == bos_id.as_ref());
    let add_eos = config["add_eos_token"].as_bool().unwrap_or_else(|| {
        eos_id.is_some()
            && around_empty.len() > usize::from(add_bos)
            && around_empty.last() == eos_id.as_ref()
    });

    let mut declared_ends = Declared::default();
    if let Some(generation) = &generation {
        match &generation["eos_token_id"] {
            Value::Number(n) => declared_ends
                .others
                .extend(n.as_u64().and_then(|id| u32::try_from(id).ok())),
            Value::Array(ids) => declared_ends.others.extend(
                ids.iter()
                    .filter_map(Value::as_u64)
                    .filter_map(|id| u32::try_from(id).ok()),
            ),
            _ => {}
        }
    }

    let chat_template = match template_from_config(&config["chat_template"]) {
        Some(template) => Some(template),
        None => {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                Some(String::from_utf8_lossy(&read(&jinja)?).into_owned())
            } else {
                None
            }
        }
    };

    Ok(Spec {
        vocab_size: inner.get_vocab_size(true),
        inner,
        bos_id,
        eos_id,
        declared_ends,
        add_bos,
        add_eos,
        chat_template,
    })
}

/// A special token in `tokenizer_config.json` is either its text or a serialized `AddedToken`.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is the chat one.
fn template_from_config(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned),
        _ => None,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    serde_json::from_slice(&read(path)?)
        .map(Some)
        .map_err(|e| TokenizerError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn special_tokens_may_be_plain_or_serialized_added_tokens() {
        assert_eq!(token_text(&json!("<s>")), Some("<s>".to_owned()));
        assert_eq!(
            token_text(&json!({"__type": "AddedToken", "content": "</s>", "special": true})),
            Some("</s>".to_owned())
        );
        assert_eq!(token_text(&Value::Null), None);
    }

    #[test]
    fn the_default_named_template_is_the_chat_template() {
        let config = json!([
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "chat"},
        ]);
        assert_eq!(template_from_config(&config), Some("chat".to_owned()));
        assert_eq!(
            template_from_config(&json!("plain")),
            Some("plain".to_owned())
        );
        assert_eq!(
            template_from_config(&json!([{"name": "rag", "template": "x"}])),
            None
        );
    }
}
