//! The one tokenizer and chat-template code of the cluster: the worker
//! tokenizes what it generates from with it, and the coordinator computes
//! the same token ids (and so the same KV block hashes,
//! [`nanoinfer_proto`'s `kv`]) to route by what each worker's cache holds.
//! Keeping both on this code is what keeps their ids equal.
//!
//! A coordinator has no model file: it loads the vocabulary-only GGUF a
//! worker serves ([`gguf`]) with [`load_vocab`].

pub mod gguf;

use std::path::Path;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
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

/// Renders a conversation (`(role, content)` pairs) with the model's own
/// chat template, the assistant's turn added, and tokenizes it: the
/// template's text with special tokens parsed (its turn markers), each
/// message's content as plain text (a `<|im_start|>` typed by a user stays
/// text). `content` tokenizes one content ([`content_tokens`], or a cache
/// of it: contents are tokenized on their own, so a cached one is exact).
/// Returns the rendered text and its tokens.
pub fn render_chat(
    model: &LlamaModel,
    messages: &[(String, String)],
    content: &mut dyn FnMut(&str) -> Vec<LlamaToken>,
) -> Result<(String, Vec<LlamaToken>), ChatError> {
    let template = model
        .chat_template(None)
        .map_err(|_| ChatError::NoTemplate)?;
    // Each content is replaced by a marker the template copies through
    // verbatim; the rendered text is then cut at the markers. The marker
    // holds a part that differs between calls (an address), so a message
    // cannot carry it by accident.
    let nonce = format!(
        "{:016x}",
        std::ptr::addr_of!(*messages) as *const u8 as usize as u64 ^ 0x6e61_6e6f_696e_6665
    );
    let marker = |i: usize| format!("\u{1}nanoinfer-{nonce}-{i}\u{1}");
    let chat = messages
        .iter()
        .enumerate()
        .map(|(i, (role, _))| LlamaChatMessage::new(role.clone(), marker(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ChatError::Render(e.to_string()))?;
    let rendered = model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| ChatError::Render(e.to_string()))?;
    let vocab = model.vocab();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut rest = rendered.as_str();
    let mut first = true;
    for (i, (_, body)) in messages.iter().enumerate() {
        let m = marker(i);
        let Some(at) = rest.find(&m) else {
            return Err(ChatError::Render(format!(
                "the chat template dropped message {i}"
            )));
        };
        let (template_part, after) = rest.split_at(at);
        // BOS (when the model wants one) once, before the first piece.
        tokens.extend(vocab.tokenize(template_part.as_bytes(), first, true));
        first = false;
        tokens.extend(content(body));
        text.push_str(template_part);
        text.push_str(body);
        rest = &after[m.len()..];
    }
    tokens.extend(vocab.tokenize(rest.as_bytes(), first, true));
    text.push_str(rest);
    Ok((text, tokens))
}
