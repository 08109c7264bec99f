//! `response_format`: OpenAI's `text`, `json_object` and `json_schema` forms, turned into the
//! contract's [`ResponseFormat`]; and the check, at admission, that a format compiles.
//!
//! The worker enforces the format while sampling, with llguidance. Whether a schema compiles
//! does not depend on the model's vocabulary, so the queen compiles it too, against a
//! vocabulary of the 256 single bytes: a schema the worker would refuse is refused here with
//! the same reason, before a job exists.

use std::sync::OnceLock;

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use rbee_contract::ResponseFormat;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

/// `response_format`: free text (the default), any JSON object, or JSON valid against a JSON
/// Schema. The JSON forms are enforced while sampling: every answer parses (and validates),
/// unless `max_tokens` ends it first (`finish_reason` `length`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormatIn {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaIn },
}

/// A named JSON Schema. The answer always follows the schema, `strict` or not.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaIn {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON Schema object; left out, any JSON value.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Map<String, Value>>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// The contract's form of `format`; `None` for text.
pub(super) fn response_format(format: Option<ResponseFormatIn>) -> Option<ResponseFormat> {
    match format? {
        ResponseFormatIn::Text => None,
        ResponseFormatIn::JsonObject => Some(ResponseFormat::JsonObject {}),
        ResponseFormatIn::JsonSchema { json_schema } => {
            // The name and description label the schema for a hosted model; the schema is
            // always enforced, so `strict` changes nothing.
            let JsonSchemaIn {
                name,
                description,
                strict,
                schema,
            } = json_schema;
            let _ = (name, description, strict);
            Some(ResponseFormat::JsonSchema {
                schema: Value::Object(schema.unwrap_or_default()),
            })
        }
    }
}

/// Checks that `format` compiles, as the worker will compile it; the error names the problem.
/// Compiling a large schema takes a while, so on a multi-threaded runtime it runs with
/// `block_in_place`, off the reactor's other tasks.
pub(crate) fn check_compiles(format: &ResponseFormat) -> Result<(), String> {
    let mut schema = match format {
        ResponseFormat::JsonObject {} => json!({"type": "object"}),
        ResponseFormat::JsonSchema { schema } => schema.clone(),
    };
    // The worker replaces llguidance's own options (`x-guidance`) with its JSON layout.
    if let Some(object) = schema.as_object_mut() {
        object.remove("x-guidance");
    }
    let check = move || compile(schema);
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(check)
        }
        _ => check(),
    }
}

fn compile(schema: Value) -> Result<(), String> {
    let factory = bytes_factory()?;
    let grammar = TopLevelGrammar::from_grammar(GrammarWithLexer::from_json_schema(schema));
    let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        factory.create_parser(grammar)
    }))
    .map_err(|_| "response_format: the grammar compiler failed on this schema".to_string())?
    .map_err(|e| format!("response_format: {e}"))?;
    let mut matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(format!("response_format: {e}"));
    }
    // A schema can compile and still allow no text at all (a `$ref` that only refers to
    // itself); the worker refuses it by its first step's mask, and so does this check.
    match matcher.compute_mask() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "response_format: no answer can satisfy this schema ({})",
            e.to_string().lines().next().unwrap_or_default().trim()
        )),
    }
}

/// A grammar compiler over the 256 single bytes and an end token, built once.
fn bytes_factory() -> Result<&'static ParserFactory, String> {
    static FACTORY: OnceLock<Result<ParserFactory, String>> = OnceLock::new();
    FACTORY
        .get_or_init(|| {
            let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
            words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], b"</s>"].concat());
            let info = TokRxInfo::new(words.len() as u32, 256);
            let env: TokEnv = std::sync::Arc::new(Bytes(TokTrie::from(&info, &words)));
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        })
        .as_ref()
        .map_err(|e| format!("the schema compiler could not start: {e}"))
}

struct Bytes(TokTrie);

impl TokenizerEnv for Bytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.0
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.0.greedy_tokenize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: Value) -> Result<Option<ResponseFormat>, serde_json::Error> {
        serde_json::from_value::<ResponseFormatIn>(value).map(|f| response_format(Some(f)))
    }

    #[test]
    fn openai_forms_map_to_the_contract() {
        assert_eq!(parse(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            parse(json!({"type": "json_object"})).unwrap(),
            Some(ResponseFormat::JsonObject {})
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            parse(json!({"type": "json_schema", "json_schema": {
                "name": "A", "schema": schema, "strict": true,
            }}))
            .unwrap(),
            Some(ResponseFormat::JsonSchema { schema })
        );
        assert!(parse(json!({"type": "yaml"})).is_err());
        assert!(
            parse(json!({"type": "json_schema", "json_schema": {"name": "A", "schema": 3}}))
                .is_err()
        );
    }

    #[test]
    fn a_schema_that_does_not_compile_is_named() {
        check_compiles(&ResponseFormat::JsonObject {}).unwrap();
        check_compiles(&ResponseFormat::JsonSchema {
            schema: json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
                "$defs": {"A": {"type": "string"}}}),
        })
        .unwrap();
        let err = check_compiles(&ResponseFormat::JsonSchema {
            schema: json!({"type": "object", "properties": {"a": {"type": "strin"}}}),
        })
        .unwrap_err();
        assert!(err.starts_with("response_format: "), "{err}");
        assert!(err.contains("strin"), "{err}");
        // Compiles, but nothing can start it: the worker would fail its first step.
        let err = check_compiles(&ResponseFormat::JsonSchema {
            schema: json!({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}),
        })
        .unwrap_err();
        assert!(
            err.starts_with("response_format: no answer can satisfy this schema"),
            "{err}"
        );
    }
}
