//! Chat templates: turning a conversation into the prompt text a model was fine-tuned on.
//!
//! Models ship their template as Jinja source (GGUF `tokenizer.chat_template`, or
//! `chat_template` in `tokenizer_config.json`). [`ChatTemplate`] compiles it once with minijinja
//! and renders it the way `transformers`' `apply_chat_template` does: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, Python string/dict methods (`.strip()`, `.items()` ...),
//! `raise_exception`, and a `tojson` that writes JSON as Python's `json.dumps` does.
//!
//! A model without a template gets [`ChatTemplate::chatml`], the ChatML format
//! (`<|im_start|>role\ncontent<|im_end|>\n`), the most widely understood fallback. A model
//! whose template does not compile gets no fallback: its chat requests fail with the reason.
//!
//! The rendered prompt already contains the model's special tokens (BOS included, when the
//! template writes `bos_token`), so it is encoded without adding special tokens again. Control
//! tokens come only from the template: [`ChatTemplate::render_tracking`] reports where
//! control-token text typed inside a message ended up, so that it is tokenized as text.
//! Tokenization itself is [`crate::tokenizer`]'s job.
//!
//! Tools: a conversation may offer functions ([`ChatTool`]) and carry earlier calls
//! (an assistant turn's `tool_calls`, a `tool` turn's `tool_call_id`). They reach the template
//! in the shapes `transformers` gives it: a `tools` list of `{"type": "function", "function":
//! {...}}`, each call as `{"id", "type": "function", "function": {"name", "arguments"}}` with
//! the arguments as a JSON object, and an assistant turn that only calls with `content` none.
//! The templates of Llama 3.1+, Qwen2.5/3 and Mistral write them in their own syntax. A
//! template that ignores `tools` (found by rendering a probe conversation once, as llama.cpp
//! does) gets the tools described in a system message instead, in the Hermes format
//! (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), with earlier calls and their
//! results written into the messages in that format.

use std::fmt;
use std::fmt::Write as _;
use std::ops::Range;

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

/// A rendered prompt, with the places where a message's own text reads as control tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of `text` holding control-token text (`<|im_end|>`) that was typed inside a
    /// message rather than written by the template: it is to be tokenized as text.
    pub typed_control_text: Vec<Range<usize>>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: String,
    /// Empty for an assistant turn that only calls tools.
    pub content: String,
    /// An assistant turn's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ChatToolCall>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatTurn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A function call an assistant turn made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A function the model is offered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of the arguments object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

impl ChatTool {
    /// The shape templates iterate over: `{"type": "function", "function": {...}}`.
    fn template_value(&self) -> serde_json::Value {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(description) = &self.description {
            function.insert("description".into(), description.clone().into());
        }
        if let Some(parameters) = &self.parameters {
            function.insert("parameters".into(), parameters.clone());
        }
        serde_json::json!({"type": "function", "function": function})
    }
}

/// Why a conversation could not be turned into a prompt. The messages are meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template source does not compile.
    #[error(
        "the model's chat template does not compile ({0}); chat messages cannot be formatted \
         for this model, a raw prompt still works"
    )]
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
    source: String,
    bos: String,
    eos: String,
    /// Whether the template writes the `tools` it is given into the prompt.
    supports_tools: bool,
    /// Whether the template refuses call ids that are not nine alphanumerics (Mistral's do).
    nine_char_call_ids: bool,
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
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::InvalidTemplate(e.to_string()))?;
        let mut template = Self {
            env,
            source: source.to_owned(),
            bos: bos.unwrap_or_default(),
            eos: eos.unwrap_or_default(),
            supports_tools: false,
            nine_char_call_ids: source.contains("length != 9"),
        };
        template.supports_tools = template.writes_tools();
        Ok(template)
    }

    /// Renders a probe conversation offered one tool: a template that supports tools writes
    /// the tool's name somewhere in the prompt; one that does not ignores the variable.
    fn writes_tools(&self) -> bool {
        const PROBE: &str = "rbee_probe_function_7d1f";
        let tool = ChatTool {
            name: PROBE.into(),
            description: Some("Probe.".into()),
            parameters: Some(serde_json::json!({"type": "object", "properties": {}})),
        };
        self.render_raw(&[ChatTurn::new("user", "Hello")], &[tool], true)
            .is_ok_and(|text| text.contains(PROBE))
    }

    /// Whether the template writes the tools it is offered itself; when it does not, they
    /// are described in a system message (see the module documentation).
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// The ChatML fallback, for models that ship no template.
    pub fn chatml() -> Self {
        Self::new(CHATML_TEMPLATE, None, None).expect("the built-in ChatML template compiles")
    }

    /// The template a tokenizer ships, with its BOS/EOS strings, or ChatML when it has none.
    /// A template that does not compile is an error, not a reason to use ChatML: the model
    /// was trained on its own format.
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
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`render`](Self::render) for a conversation offered `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatTurn],
        tools: &[ChatTool],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        if self.supports_tools {
            return self.render_raw(messages, tools, add_generation_prompt);
        }
        let in_system = generic_tool_messages(messages, tools, ToolsAt::System);
        match self.render_raw(&in_system, &[], add_generation_prompt) {
            Err(ChatError::Rejected(_)) if !tools.is_empty() => {
                let in_user = generic_tool_messages(messages, tools, ToolsAt::FirstMessage);
                self.render_raw(&in_user, &[], add_generation_prompt)
            }
            rendered => rendered,
        }
    }

    /// Renders exactly what it is given: tools go to the template as they are.
    fn render_raw(
        &self,
        messages: &[ChatTurn],
        tools: &[ChatTool],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::InvalidTemplate(e.to_string()))?;
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| template_message(m, self.nine_char_call_ids))
            .collect();
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        };
        // Without tools the variable stays undefined, as `transformers` leaves it.
        let ctx = if tools.is_empty() {
            base
        } else {
            let tools: Vec<serde_json::Value> =
                tools.iter().map(ChatTool::template_value).collect();
            context! { tools => tools, ..base }
        };
        template.render(ctx).map_err(classify)
    }

    /// Renders `messages` like [`render`](Self::render), and reports where control-token text
    /// typed inside a message ended up in the prompt. `find_control_text` gives the byte
    /// ranges of control-token text in a string (the tokenizer knows which texts those are).
    ///
    /// Such text is swapped for a placeholder before rendering, so that the template handles
    /// it as the plain text it is (`trim`, `split` and the like see no control token), and
    /// put back afterwards. Messages without control-token text render exactly as `render`
    /// renders them.
    pub fn render_tracking(
        &self,
        messages: &[ChatTurn],
        add_generation_prompt: bool,
        find_control_text: &dyn Fn(&str) -> Vec<Range<usize>>,
    ) -> Result<RenderedChat, ChatError> {
        self.render_tracking_with_tools(messages, &[], add_generation_prompt, find_control_text)
    }

    /// [`render_tracking`](Self::render_tracking) for a conversation offered `tools`.
    pub fn render_tracking_with_tools(
        &self,
        messages: &[ChatTurn],
        tools: &[ChatTool],
        add_generation_prompt: bool,
        find_control_text: &dyn Fn(&str) -> Vec<Range<usize>>,
    ) -> Result<RenderedChat, ChatError> {
        if self.supports_tools {
            return self.track(messages, tools, add_generation_prompt, find_control_text);
        }
        let in_system = generic_tool_messages(messages, tools, ToolsAt::System);
        match self.track(&in_system, &[], add_generation_prompt, find_control_text) {
            // A template that refuses a system message (Gemma's) gets the tools at the
            // start of the first message instead.
            Err(ChatError::Rejected(_)) if !tools.is_empty() => {
                let in_user = generic_tool_messages(messages, tools, ToolsAt::FirstMessage);
                self.track(&in_user, &[], add_generation_prompt, find_control_text)
            }
            rendered => rendered,
        }
    }

    /// [`render_tracking_with_tools`](Self::render_tracking_with_tools) with the tools
    /// handed to the template as they are.
    fn track(
        &self,
        messages: &[ChatTurn],
        tools: &[ChatTool],
        add_generation_prompt: bool,
        find_control_text: &dyn Fn(&str) -> Vec<Range<usize>>,
    ) -> Result<RenderedChat, ChatError> {
        let found: Vec<Vec<Range<usize>>> = messages
            .iter()
            .map(|m| find_control_text(&m.content))
            .collect();
        if found.iter().all(Vec::is_empty) {
            return Ok(RenderedChat {
                text: self.render_raw(messages, tools, add_generation_prompt)?,
                typed_control_text: Vec::new(),
            });
        }
        let marker = self.placeholder_marker(messages)?;
        let mut typed: Vec<&str> = Vec::new();
        let placeheld: Vec<ChatTurn> = messages
            .iter()
            .zip(&found)
            .map(|(message, ranges)| {
                let mut content = String::with_capacity(message.content.len());
                let mut copied = 0;
                for range in ranges {
                    content.push_str(&message.content[copied..range.start]);
                    let _ = write!(content, "{marker}{}{marker}", typed.len());
                    typed.push(&message.content[range.clone()]);
                    copied = range.end;
                }
                content.push_str(&message.content[copied..]);
                ChatTurn {
                    content,
                    ..message.clone()
                }
            })
            .collect();
        let rendered = self.render_raw(&placeheld, tools, add_generation_prompt)?;

        let altered = || {
            ChatError::Render(
                "the template altered a message that contains control-token text, so its \
                 text cannot be told apart from the template's own tokens"
                    .into(),
            )
        };
        let mut text = String::with_capacity(rendered.len());
        let mut spans = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(marker) {
            text.push_str(&rest[..at]);
            let after = &rest[at + marker.len_utf8()..];
            let close = after.find(marker).ok_or_else(altered)?;
            let digits = &after[..close];
            let original = digits
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| digits.parse::<usize>().ok())
                .flatten()
                .and_then(|index| typed.get(index))
                .ok_or_else(altered)?;
            spans.push(text.len()..text.len() + original.len());
            text.push_str(original);
            rest = &after[close + marker.len_utf8()..];
        }
        text.push_str(rest);
        Ok(RenderedChat {
            text,
            typed_control_text: spans,
        })
    }

    /// A private-use character found nowhere in the messages, the template or its special
    /// strings, to delimit placeholders with.
    fn placeholder_marker(&self, messages: &[ChatTurn]) -> Result<char, ChatError> {
        let in_use = |c: char| {
            messages.iter().any(|m| m.content.contains(c))
                || self.source.contains(c)
                || self.bos.contains(c)
                || self.eos.contains(c)
        };
        ('\u{E000}'..='\u{F8FF}')
            .find(|&c| !in_use(c))
            .ok_or_else(|| {
                ChatError::Render(
                    "the messages use every private-use character; cannot render them".into(),
                )
            })
    }
}

/// A message as templates read it (see the module documentation).
fn template_message(turn: &ChatTurn, nine_char_ids: bool) -> serde_json::Value {
    let id = |id: &str| {
        if nine_char_ids {
            nine_char_id(id)
        } else {
            id.to_owned()
        }
    };
    let mut message = serde_json::Map::new();
    message.insert("role".into(), turn.role.clone().into());
    let content = if turn.content.is_empty() && !turn.tool_calls.is_empty() {
        serde_json::Value::Null
    } else {
        turn.content.clone().into()
    };
    message.insert("content".into(), content);
    // Templates test for the key (`'tool_calls' in message`), so it is only there with calls.
    if !turn.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = turn
            .tool_calls
            .iter()
            .map(|call| {
                // Templates write the arguments with `tojson` or iterate them: an object, as
                // `transformers` expects; text that is not JSON stays text.
                let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                    .unwrap_or_else(|_| call.arguments.clone().into());
                serde_json::json!({
                    "id": id(&call.id),
                    "type": "function",
                    "function": {"name": call.name, "arguments": arguments},
                })
            })
            .collect();
        message.insert("tool_calls".into(), calls.into());
    }
    if let Some(call_id) = &turn.tool_call_id {
        message.insert("tool_call_id".into(), id(call_id).into());
    }
    if let Some(name) = &turn.name {
        message.insert("name".into(), name.clone().into());
    }
    message.into()
}

/// Mistral's templates refuse call ids that are not exactly nine ASCII letters and digits,
/// while OpenAI clients send ids such as `call_...`: such an id is replaced by nine
/// characters derived from it (FNV-1a), the same for a call and the result that names it.
fn nine_char_id(id: &str) -> String {
    if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return id.to_owned();
    }
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..9)
        .map(|_| {
            let c = ALPHABET[(hash % 62) as usize] as char;
            hash /= 62;
            c
        })
        .collect()
}

/// Where a template without tool support gets the tools' description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolsAt {
    /// In the system message (added when the conversation has none).
    System,
    /// In front of the first message's text, for templates that refuse a system message.
    FirstMessage,
}

/// How tools are described to a model whose template has no place for them: the Hermes
/// format, the most common one that instruction-tuned models have seen.
const GENERIC_TOOLS_PROMPT: &str = "You may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const GENERIC_TOOLS_PROMPT_END: &str = "\n</tools>\n\nFor each function call, return a json object \
with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// The conversation rewritten for a template without tool support: the tools described in
/// the system message, earlier calls written as `<tool_call>` text in the assistant's turn,
/// and tool results given as a user turn of `<tool_response>` blocks (consecutive results
/// in one turn, so that roles still alternate).
fn generic_tool_messages(messages: &[ChatTurn], tools: &[ChatTool], at: ToolsAt) -> Vec<ChatTurn> {
    let mut out: Vec<ChatTurn> = Vec::with_capacity(messages.len() + 1);
    let mut prompt = String::new();
    if !tools.is_empty() {
        prompt.push_str(GENERIC_TOOLS_PROMPT);
        for tool in tools {
            prompt.push('\n');
            prompt.push_str(&python_json(&tool.template_value()));
        }
        prompt.push_str(GENERIC_TOOLS_PROMPT_END);
    }
    // The system message takes the description after its own text (one is added when the
    // conversation has none); for a template that refuses system messages, the first
    // message takes it in front of its text.
    let mut skip = 0;
    if !prompt.is_empty() {
        match (at, messages.first()) {
            (ToolsAt::System, Some(first)) if first.role == "system" => {
                out.push(ChatTurn::new(
                    "system",
                    format!("{}\n\n{prompt}", first.content),
                ));
                skip = 1;
            }
            (ToolsAt::System, _) => out.push(ChatTurn::new("system", prompt)),
            (ToolsAt::FirstMessage, Some(first)) => {
                let content = format!("{prompt}\n\n{}", first.content);
                out.push(ChatTurn::new(first.role.clone(), content));
                skip = 1;
            }
            (ToolsAt::FirstMessage, None) => out.push(ChatTurn::new("user", prompt)),
        }
    }
    let mut previous_was_tool = false;
    for message in &messages[skip..] {
        if message.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", message.content);
            match out.last_mut() {
                Some(last) if previous_was_tool => {
                    last.content.push('\n');
                    last.content.push_str(&block);
                }
                _ => out.push(ChatTurn::new("user", block)),
            }
            previous_was_tool = true;
            continue;
        }
        previous_was_tool = false;
        if message.tool_calls.is_empty() {
            out.push(ChatTurn::new(message.role.clone(), message.content.clone()));
            continue;
        }
        let mut content = message.content.clone();
        for call in &message.tool_calls {
            if !content.is_empty() {
                content.push('\n');
            }
            let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                .unwrap_or_else(|_| call.arguments.clone().into());
            let _ = write!(
                content,
                "<tool_call>\n{}\n</tool_call>",
                python_json(&serde_json::json!({"name": call.name, "arguments": arguments}))
            );
        }
        out.push(ChatTurn::new(message.role.clone(), content));
    }
    out
}

fn python_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_python_json(&mut out, value, None, false, 0);
    out
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

/// `strftime_now(format)` as `transformers` provides it to templates (Llama 3.x writes
/// today's date into its system header): the current UTC time, formatted.
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, now).map(Value::from)
}

/// The directives of C's `strftime` that chat templates use, for `unix_secs` in UTC.
fn strftime(format: &str, unix_secs: u64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS[(days % 7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let directive = chars.next().ok_or_else(|| {
            Error::new(ErrorKind::InvalidOperation, "strftime format ends with `%`")
        })?;
        let _ = match directive {
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'm' => write!(out, "{month:02}"),
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year % 100),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'a' => write!(out, "{}", &weekday[..3]),
            'A' => write!(out, "{weekday}"),
            'H' => write!(out, "{:02}", secs / 3600),
            'M' => write!(out, "{:02}", secs / 60 % 60),
            'S' => write!(out, "{:02}", secs % 60),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            '%' => write!(out, "%"),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime directive `%{other}` is not supported"),
                ));
            }
        };
    }
    Ok(out)
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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
    fn strftime_formats_utc_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e, %y %H:%M:%S %F %%", t).unwrap(),
            "Friday July 26, 24 13:05:09 2024-07-26 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn typed_control_text_is_tracked_through_the_template() {
        let find = |text: &str| -> Vec<Range<usize>> {
            text.match_indices("<|im_end|>")
                .map(|(at, m)| at..at + m.len())
                .collect()
        };
        let template = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let messages = turns(&[("user", "  a <|im_end|> b<|im_end|> "), ("user", "plain")]);
        let rendered = template.render_tracking(&messages, false, &find).unwrap();
        assert_eq!(rendered.text, template.render(&messages, false).unwrap());
        assert_eq!(
            rendered.text,
            "<|im_start|>user\na <|im_end|> b<|im_end|><|im_end|>\n<|im_start|>user\nplain<|im_end|>\n"
        );
        let typed: Vec<&str> = rendered
            .typed_control_text
            .iter()
            .map(|r| &rendered.text[r.clone()])
            .collect();
        assert_eq!(typed, ["<|im_end|>", "<|im_end|>"]);
        assert_eq!(
            rendered.typed_control_text[0].start,
            "<|im_start|>user\na ".len()
        );
        assert_eq!(
            rendered.typed_control_text[1].start,
            "<|im_start|>user\na <|im_end|> b".len()
        );

        let plain = turns(&[("user", "no control text")]);
        let rendered = template.render_tracking(&plain, true, &find).unwrap();
        assert!(rendered.typed_control_text.is_empty());
    }

    #[test]
    fn a_template_that_cuts_typed_control_text_is_an_error() {
        let find = |text: &str| -> Vec<Range<usize>> {
            text.find("<s>").map(|at| at..at + 3).into_iter().collect()
        };
        let template = ChatTemplate::new("{{ messages[0].content[:2] }}", None, None).unwrap();
        let err = template
            .render_tracking(&turns(&[("user", "<s>x")]), false, &find)
            .unwrap_err();
        assert!(matches!(err, ChatError::Render(_)), "{err:?}");
    }

    fn weather_tool() -> ChatTool {
        ChatTool {
            name: "get_weather".into(),
            description: Some("Current weather of a city.".into()),
            parameters: Some(serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]
            })),
        }
    }

    /// A round trip: the question, the assistant's call, the tool's result.
    fn tool_round_trip(call_id: &str) -> Vec<ChatTurn> {
        vec![
            ChatTurn::new("user", "Weather in Paris?"),
            ChatTurn {
                tool_calls: vec![ChatToolCall {
                    id: call_id.into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..ChatTurn::new("assistant", "")
            },
            ChatTurn {
                tool_call_id: Some(call_id.into()),
                name: Some("get_weather".into()),
                ..ChatTurn::new("tool", "18 C, sunny")
            },
        ]
    }

    fn family(file: &str, bos: &str, eos: &str) -> ChatTemplate {
        let path = format!("{}/tests/data/templates/{file}", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).unwrap();
        ChatTemplate::new(&source, Some(bos.into()), Some(eos.into())).unwrap()
    }

    #[test]
    fn qwen25_writes_tools_calls_and_results_in_its_own_syntax() {
        let template = family("qwen2.5.jinja", "", "<|im_end|>");
        assert!(template.supports_tools());
        let prompt = template
            .render_with_tools(&tool_round_trip("call_abc"), &[weather_tool()], true)
            .unwrap();
        assert_eq!(prompt, QWEN_EXPECTED);
    }

    #[test]
    fn llama31_writes_tools_calls_and_results_in_its_own_syntax() {
        let template = family("llama-3.1.jinja", "<|begin_of_text|>", "<|eot_id|>");
        assert!(template.supports_tools());
        let prompt = template
            .render_with_tools(&tool_round_trip("call_abc"), &[weather_tool()], true)
            .unwrap();
        assert_eq!(prompt, LLAMA_EXPECTED);
    }

    #[test]
    fn mistral_writes_tools_calls_and_results_with_nine_character_ids() {
        let template = family("mistral-nemo.jinja", "<s>", "</s>");
        assert!(template.supports_tools());
        // An OpenAI-style id is not nine alphanumerics: it is mapped, the same in the call
        // and in the result.
        let prompt = template
            .render_with_tools(&tool_round_trip("call_abc"), &[weather_tool()], true)
            .unwrap();
        let id = nine_char_id("call_abc");
        assert_eq!(id.len(), 9);
        assert_eq!(prompt, MISTRAL_EXPECTED.replace("ID", &id));
        // An id that is already valid is kept.
        let kept = template
            .render_with_tools(&tool_round_trip("a1B2c3D4e"), &[weather_tool()], true)
            .unwrap();
        assert_eq!(kept, MISTRAL_EXPECTED.replace("ID", "a1B2c3D4e"));
    }

    #[test]
    fn without_tools_a_family_template_renders_as_before() {
        let template = family("qwen2.5.jinja", "", "<|im_end|>");
        let messages = turns(&[("user", "Hi")]);
        assert_eq!(
            template.render_with_tools(&messages, &[], true).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_template_without_tool_support_gets_the_tools_in_a_system_message() {
        let template = ChatTemplate::chatml();
        assert!(!template.supports_tools());
        let mut messages = vec![ChatTurn::new("system", "Be brief.")];
        messages.extend(tool_round_trip("call_abc"));
        messages.push(ChatTurn {
            tool_call_id: Some("call_def".into()),
            ..ChatTurn::new("tool", "rain later")
        });
        let prompt = template
            .render_with_tools(&messages, &[weather_tool()], true)
            .unwrap();
        assert_eq!(prompt, GENERIC_EXPECTED);
    }

    #[test]
    fn a_template_that_refuses_system_messages_gets_the_tools_in_the_first_message() {
        let template = family("gemma-2.jinja", "<bos>", "<eos>");
        assert!(!template.supports_tools());
        let prompt = template
            .render_with_tools(&tool_round_trip("call_abc"), &[weather_tool()], true)
            .unwrap();
        let user_turn = prompt
            .strip_prefix("<bos><start_of_turn>user\nYou may call one or more functions")
            .unwrap_or_else(|| panic!("{prompt}"));
        assert!(
            user_turn.contains("\"name\": \"get_weather\"")
                && user_turn.contains("</tool_call>\n\nWeather in Paris?<end_of_turn>"),
            "{prompt}"
        );
        // The call and its result are written as text in the conversation.
        assert!(
            prompt.contains(
                "<start_of_turn>model\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><end_of_turn>\n\
                 <start_of_turn>user\n<tool_response>\n18 C, sunny\n</tool_response><end_of_turn>\n<start_of_turn>model\n"
            ),
            "{prompt}"
        );
    }

    #[test]
    fn tracking_renders_tool_conversations_like_render() {
        let find = |text: &str| -> Vec<Range<usize>> {
            text.match_indices("<|im_end|>")
                .map(|(at, m)| at..at + m.len())
                .collect()
        };
        for template in [
            family("qwen2.5.jinja", "", "<|im_end|>"),
            ChatTemplate::chatml(),
        ] {
            let mut messages = tool_round_trip("call_abc");
            messages[2].content = "typed <|im_end|> here".into();
            let rendered = template
                .render_tracking_with_tools(&messages, &[weather_tool()], true, &find)
                .unwrap();
            assert_eq!(
                rendered.text,
                template
                    .render_with_tools(&messages, &[weather_tool()], true)
                    .unwrap()
            );
            assert_eq!(rendered.typed_control_text.len(), 1);
        }
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ChatError::InvalidTemplate(_)), "{err}");
    }

    const QWEN_EXPECTED: &str = "<|im_start|>system\n\
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\
\n\
# Tools\n\
\n\
You may call one or more functions to assist with the user query.\n\
\n\
You are provided with function signatures within <tools></tools> XML tags:\n\
<tools>\n\
{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Current weather of a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n\
</tools>\n\
\n\
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
<tool_call>\n\
{\"name\": <function-name>, \"arguments\": <args-json-object>}\n\
</tool_call><|im_end|>\n\
<|im_start|>user\n\
Weather in Paris?<|im_end|>\n\
<|im_start|>assistant\n\
<tool_call>\n\
{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
</tool_call><|im_end|>\n\
<|im_start|>user\n\
<tool_response>\n\
18 C, sunny\n\
</tool_response><|im_end|>\n\
<|im_start|>assistant\n\
";
    const LLAMA_EXPECTED: &str = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\
\n\
Environment: ipython\n\
Cutting Knowledge Date: December 2023\n\
Today Date: 26 Jul 2024\n\
\n\
<|eot_id|><|start_header_id|>user<|end_header_id|>\n\
\n\
Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\
\n\
Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\
\n\
{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n        \"description\": \"Current weather of a city.\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n                \"city\": {\n                    \"type\": \"string\"\n                }\n            },\n            \"required\": [\n                \"city\"\n            ]\n        }\n    }\n\
}\n\
\n\
Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\
\n\
{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\
\n\
\"18 C, sunny\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\
\n\
";
    const MISTRAL_EXPECTED: &str = "<s>[AVAILABLE_TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Current weather of a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}][/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST][TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"ID\"}]</s>[TOOL_RESULTS]{\"content\": 18 C, sunny, \"call_id\": \"ID\"}[/TOOL_RESULTS]";
    const GENERIC_EXPECTED: &str = "<|im_start|>system\n\
Be brief.\n\
\n\
You may call one or more functions to assist with the user query.\n\
\n\
You are provided with function signatures within <tools></tools> XML tags:\n\
<tools>\n\
{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Current weather of a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n\
</tools>\n\
\n\
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
<tool_call>\n\
{\"name\": <function-name>, \"arguments\": <args-json-object>}\n\
</tool_call><|im_end|>\n\
<|im_start|>user\n\
Weather in Paris?<|im_end|>\n\
<|im_start|>assistant\n\
<tool_call>\n\
{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
</tool_call><|im_end|>\n\
<|im_start|>user\n\
<tool_response>\n\
18 C, sunny\n\
</tool_response>\n\
<tool_response>\n\
rain later\n\
</tool_response><|im_end|>\n\
<|im_start|>assistant\n\
";
}
