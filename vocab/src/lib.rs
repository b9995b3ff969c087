//! The one tokenizer and chat-template code of the cluster: the worker
//! tokenizes what it generates from with it, and the coordinator computes
//! the same token ids (and so the same KV block hashes,
//! [`nanoinfer_proto`'s `kv`]) to route by what each worker's cache holds.
//! Keeping both on this code is what keeps their ids equal.
//!
//! A coordinator has no model file: it loads the vocabulary-only GGUF a
//! worker serves ([`gguf`]) with [`load_vocab`].
//!
//! # Layout
//! - [`gguf`]: vocabulary-only GGUF files (a model's header and tokenizer
//!   metadata without its tensors), written by workers, read by
//!   coordinators.
//! - [`template`]: the model's own chat template, rendered as Hugging Face's
//!   `apply_chat_template` renders it.
//! - [`wire`]: chat messages on the wire, to and from what the template
//!   code takes.

pub mod gguf;
pub mod template;
pub mod wire;

pub use template::{ChatMessage, ChatTemplate, ToolCall, ToolFormat};
pub use wire::roles_and_contents;

use std::path::Path;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

/// Why a conversation could not be turned into a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The GGUF carries no chat template.
    #[error("the model has no chat template; send a prompt instead of messages")]
    NoTemplate,
    /// llama.cpp could not apply the template.
    #[error("the chat template could not be applied: {0}")]
    Render(String),
}

/// Loads only the vocabulary, template and metadata of a GGUF (a whole
/// model file or a vocabulary-only one).
pub fn load_vocab(backend: &LlamaBackend, path: &Path) -> Result<LlamaModel, String> {
    LlamaModel::load_from_file(
        backend,
        path,
        &LlamaModelParams::default().with_vocab_only(true),
    )
    .map_err(|e| format!("cannot load the vocabulary in {}: {e}", path.display()))
}

/// Tokenizes a prompt the way generation needs it (with BOS when the model
/// wants one; special-token text is treated as plain text).
pub fn tokenize(model: &LlamaModel, prompt: &str) -> Vec<LlamaToken> {
    model.vocab().tokenize(prompt.as_bytes(), true, false)
}

/// The tokens of one message's content inside a rendered conversation:
/// plain text, no BOS, special-token text kept as text.
pub fn content_tokens(model: &LlamaModel, content: &str) -> Vec<LlamaToken> {
    model.vocab().tokenize(content.as_bytes(), false, false)
}

/// The model's Jinja chat template, compiled (`source` overrides the
/// GGUF's `tokenizer.chat_template`). An error says why there is none (no
/// template, or one `minijinja` cannot compile): [`render_chat`] then uses
/// llama.cpp's built-in matcher.
pub fn chat_template(model: &LlamaModel, source: Option<&str>) -> Result<ChatTemplate, String> {
    let owned;
    let source = match source {
        Some(s) => s,
        None => {
            let t = model
                .chat_template(None)
                .map_err(|_| "the model has no chat template".to_string())?;
            owned = t
                .to_string()
                .map_err(|e| format!("the chat template is not UTF-8: {e}"))?;
            &owned
        }
    };
    let vocab = model.vocab();
    let text =
        |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let bos = if vocab.bos().0 >= 0 {
        text(vocab.bos())
    } else {
        String::new()
    };
    let eos = if vocab.eos().0 >= 0 {
        text(vocab.eos())
    } else {
        String::new()
    };
    ChatTemplate::new(source, &bos, &eos)
}

/// Whether [`render_chat`] renders this conversation with the Jinja
/// template (see there) rather than llama.cpp's matcher: when it carries
/// tools, tool calls or tool results.
pub fn uses_jinja(messages: &[ChatMessage], tools: Option<&serde_json::Value>) -> bool {
    tools.is_some()
        || messages
            .iter()
            .any(|m| !m.tool_calls.is_empty() || m.role == "tool")
}

/// llama.cpp's built-in matcher over the template's source (the GGUF's
/// when there is no compiled one), contents replaced by their markers.
fn matcher(
    model: &LlamaModel,
    template: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    marker: &dyn Fn(usize) -> String,
) -> Result<String, ChatError> {
    let source = match template {
        Some(t) => {
            LlamaChatTemplate::new(t.source()).map_err(|e| ChatError::Render(e.to_string()))?
        }
        None => model
            .chat_template(None)
            .map_err(|_| ChatError::NoTemplate)?,
    };
    let chat = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            LlamaChatMessage::new(
                m.role.clone(),
                if m.content.is_empty() {
                    String::new()
                } else {
                    marker(i)
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ChatError::Render(e.to_string()))?;
    model
        .apply_chat_template(&source, &chat, true)
        .map_err(|e| ChatError::Render(e.to_string()))
}

/// Renders a conversation with the model's chat template, the assistant's
/// turn added, and tokenizes it: the template's text with special tokens
/// parsed (its turn markers), each message's content as plain text (a
/// `<|im_start|>` typed by a user stays text). `content` tokenizes one
/// content ([`content_tokens`], or a cache of it: contents are tokenized on
/// their own, so a cached one is exact). Returns the rendered text and its
/// tokens.
///
/// Which renderer ([`uses_jinja`]): a conversation with tools, tool calls
/// or tool results is rendered by the Jinja `template` (from
/// [`chat_template`]), with `tools` (OpenAI's tool objects) handed to it;
/// a plain conversation by llama.cpp's built-in matcher over the same
/// template source, as llama.cpp's server renders without `--jinja`, and by
/// the Jinja template when the matcher does not know it. (SmolLM2's own
/// template adds a default system prompt the matcher leaves out, and with
/// it the 135M model stops naming Paris as France's capital.) A leading
/// `bos_token` the Jinja template writes is dropped when the tokenizer adds
/// BOS itself.
pub fn render_chat(
    model: &LlamaModel,
    template: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    tools: Option<&serde_json::Value>,
    content: &mut dyn FnMut(&str) -> Vec<LlamaToken>,
) -> Result<(String, Vec<LlamaToken>), ChatError> {
    // Each content is replaced by a marker the template copies through
    // verbatim; the rendered text is then cut at the markers. The marker
    // holds a part that differs between calls (an address), so a message
    // cannot carry it by accident; it is plain ASCII so that a template
    // that writes a content through `tojson` copies it unchanged.
    let nonce = format!(
        "{:016x}",
        std::ptr::addr_of!(*messages) as *const u8 as usize as u64 ^ 0x6e61_6e6f_696e_6665
    );
    let prefix = format!("@@nanoinfer-{nonce}-");
    let marker = |i: usize| format!("{prefix}{i}@@");
    let vocab = model.vocab();
    let matched = match uses_jinja(messages, tools) {
        true => None,
        false => Some(matcher(model, template, messages, &marker)),
    };
    let rendered = match (matched, template) {
        (Some(Ok(text)), _) => text,
        (Some(Err(e)), None) => return Err(e),
        (_, Some(t)) => {
            let marked: Vec<ChatMessage> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| ChatMessage {
                    content: if m.content.is_empty() {
                        String::new()
                    } else {
                        marker(i)
                    },
                    ..m.clone()
                })
                .collect();
            let mut text = t.render(&marked, tools).map_err(ChatError::Render)?;
            if vocab.should_add_bos() && !t.bos().is_empty() && text.starts_with(t.bos()) {
                text.drain(..t.bos().len());
            }
            text
        }
        (None, None) => {
            return Err(ChatError::Render(
                "the model's chat template cannot be rendered here, and llama.cpp's \
                 built-in templates render no tools"
                    .to_string(),
            ))
        }
    };
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut rest = rendered.as_str();
    let mut first = true;
    // Markers may come in any order, or more than once (a template may move
    // the system prompt into the last user turn): each is cut where it is.
    while let Some(at) = rest.find(&prefix) {
        let after = &rest[at + prefix.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let index: Option<usize> = after[..digits].parse().ok();
        let (Some(i), true) = (index, after[digits..].starts_with("@@")) else {
            return Err(ChatError::Render(
                "the chat template altered a message's content marker".to_string(),
            ));
        };
        let Some(m) = messages.get(i) else {
            return Err(ChatError::Render(
                "the chat template wrote a message that is not there".to_string(),
            ));
        };
        let template_part = &rest[..at];
        // BOS (when the model wants one) once, before the first piece.
        tokens.extend(vocab.tokenize(template_part.as_bytes(), first, true));
        first = false;
        tokens.extend(content(&m.content));
        text.push_str(template_part);
        text.push_str(&m.content);
        rest = &after[digits + 2..];
    }
    tokens.extend(vocab.tokenize(rest.as_bytes(), first, true));
    text.push_str(rest);
    Ok((text, tokens))
}
