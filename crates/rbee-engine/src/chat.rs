//! Chat templates: turning a conversation into the prompt text a model was fine-tuned on.
//!
//! Models ship their template as Jinja source (GGUF `tokenizer.chat_template`, or
//! `chat_template` in `tokenizer_config.json`). [`ChatTemplate`] compiles it once with minijinja
//! and renders it the way `transformers`' `apply_chat_template` does: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, Python string/dict methods (`.strip()`, `.items()` ...),
//! `raise_exception`, and a `tojson` that writes JSON as Python's `json.dumps` does.
//!
//! A model without a template gets [`ChatTemplate::chatml`], the ChatML format
//! (`<|im_start|>role\ncontent<|im_end|>\n`), the most widely understood fallback.
//!
//! The rendered prompt already contains the model's special tokens (BOS included, when the
//! template writes `bos_token`), so it is encoded without adding special tokens again.
//! Tokenization itself is [`crate::tokenizer`]'s job.

use std::fmt;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::tokenizer::TextTokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// The ChatML fallback used when a model has no template of its own.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

impl ChatTurn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a conversation could not be turned into a prompt. The messages are meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template source does not compile.
    #[error("the model's chat template is invalid: {0}")]
    InvalidTemplate(String),
    /// The template itself refused the conversation with `raise_exception`, e.g. because roles
    /// do not alternate or a role is not supported.
    #[error("the model's chat template rejected the conversation: {0}")]
    Rejected(String),
    /// Rendering failed for another reason (a template bug, or input it cannot handle).
    #[error("the model's chat template failed to render: {0}")]
    Render(String),
}

/// The message a template passed to `raise_exception`, carried as the source of the
/// minijinja error so it can be told apart from template bugs.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// A compiled chat template, with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos` and `eos` are exposed to it as `bos_token` and `eos_token`
    /// (empty strings when the model has none).
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::InvalidTemplate(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.unwrap_or_default(),
            eos: eos.unwrap_or_default(),
        })
    }

    /// The ChatML fallback, for models that ship no template.
    pub fn chatml() -> Self {
        Self::new(CHATML_TEMPLATE, None, None).expect("the built-in ChatML template compiles")
    }

    /// The template a tokenizer ships, with its BOS/EOS strings, or ChatML when it has none.
    pub fn for_tokenizer(tokenizer: &TextTokenizer) -> Result<Self, ChatError> {
        let bos = tokenizer.bos_token().map(str::to_owned);
        let eos = tokenizer.eos_token().map(str::to_owned);
        match tokenizer.chat_template() {
            Some(source) => Self::new(source, bos, eos),
            None => Self::new(CHATML_TEMPLATE, bos, eos),
        }
    }

    /// The prompt for `messages`; `add_generation_prompt` appends the header that starts the
    /// assistant's reply.
    pub fn render(
        &self,
        messages: &[ChatTurn],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::InvalidTemplate(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(classify)
    }
}

fn classify(error: Error) -> ChatError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return ChatError::Rejected(raised.0.clone());
        }
        cause = e.source();
    }
    tracing::debug!(error = %error.display_debug_info(), "chat template error");
    ChatError::Render(error.to_string())
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

/// `tojson` as `transformers` defines it: `json.dumps(value, ensure_ascii=False, indent=...)`,
/// i.e. no HTML escaping and Python's `", "`/`": "` separators, which is what models saw in
/// training.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot convert value to JSON").with_source(e)
    })?;
    let mut out = String::new();
    write_python_json(&mut out, &json, indent, sort_keys.unwrap_or(false), 0);
    Ok(Value::from(out))
}

fn write_python_json(
    out: &mut String,
    value: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, sort_keys, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(out, item, indent, sort_keys, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        scalar_or_empty => out.push_str(&scalar_or_empty.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(pairs: &[(&str, &str)]) -> Vec<ChatTurn> {
        pairs.iter().map(|(r, c)| ChatTurn::new(*r, *c)).collect()
    }

    #[test]
    fn chatml_fallback_renders_every_turn_and_the_generation_prompt() {
        let prompt = ChatTemplate::chatml()
            .render(&turns(&[("system", "Be brief."), ("user", "Hi")]), true)
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let without = ChatTemplate::chatml()
            .render(&turns(&[("user", "Hi")]), false)
            .unwrap();
        assert_eq!(without, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn tojson_writes_json_the_python_way() {
        let template = ChatTemplate::new(
            "{{ data | tojson }}|{{ data | tojson(indent=2) }}|{{ [] | tojson }}",
            None,
            None,
        )
        .unwrap();
        let env = &template.env;
        let rendered = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(context! { data => serde_json::json!({"a": [1, "<b>"], "c": {"d": null}}) })
            .unwrap();
        assert_eq!(
            rendered,
            "{\"a\": [1, \"<b>\"], \"c\": {\"d\": null}}|{\n  \"a\": [\n    1,\n    \"<b>\"\n  ],\n  \"c\": {\n    \"d\": null\n  }\n}|[]"
        );
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
             {{ m.content.strip().upper() }}{% if m.content.startswith(' x') %}!{% endif %}\
             {% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out = template
            .render(
                &turns(&[("user", " xy "), ("skip", "no"), ("user", "z")]),
                false,
            )
            .unwrap();
        assert_eq!(out, "XY!Z");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ChatError::InvalidTemplate(_)), "{err}");
    }
}
