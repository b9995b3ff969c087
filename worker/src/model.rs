//! Loading a GGUF model and tokenizing prompts with it.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
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

/// A loaded model, shareable across threads (tokenization is read-only).
pub struct Model {
    /// The llama.cpp backend; must outlive every model and context.
    pub backend: Arc<LlamaBackend>,
    /// The weights and vocabulary.
    pub model: Arc<LlamaModel>,
    /// File name of the GGUF.
    pub name: String,
    /// The name requests select the model by: `--model-name`, else the
    /// GGUF's `general.name`, else the file name without `.gguf`.
    pub model_name: String,
    /// Seconds the load took.
    pub load_seconds: f64,
}

/// Checks that `path` is a readable GGUF file (its magic bytes), so a wrong
/// path or file is a clear error before anything else starts; llama.cpp
/// itself only says "null result" for a file it cannot parse.
pub fn check_file(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            // The first thing a new user meets: say how to get a model.
            " (fetch the default one with scripts/fetch-model, or `nanoinfer-fetch-model DIR` in the \
             image, and pass its path with --model or NANOINFER_MODEL)"
        } else {
            ""
        };
        format!("model file {}: {e}{hint}", path.display())
    })?;
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(format!(
            "model file {} is not a regular file",
            path.display()
        ));
    }
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) => Err(format!(
            "model file {} is not a GGUF file (it starts with {:?}, not \"GGUF\")",
            path.display(),
            String::from_utf8_lossy(&magic)
        )),
        Err(_) => Err(format!(
            "model file {} is not a GGUF file (shorter than its 4-byte magic)",
            path.display()
        )),
    }
}

/// Loads `path` on the calling thread (blocking; call it from
/// `spawn_blocking`). Errors name the path. `model_name` overrides the name
/// read from the file.
pub fn load(path: &Path, model_name: Option<&str>) -> Result<Model, String> {
    check_file(path)?;
    let mut backend = LlamaBackend::init().map_err(|e| format!("llama.cpp backend: {e}"))?;
    // llama.cpp's own logging is verbose; keep it only at debug level.
    if !tracing::enabled!(tracing::Level::DEBUG) {
        backend.void_logs();
    }
    let started = Instant::now();
    let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default())
        .map_err(|e| format!("cannot load model {}: {e}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let model_name = match model_name {
        Some(n) => n.to_string(),
        None => default_model_name(model.meta_val_str("general.name").ok(), path),
    };
    tracing::info!(model = %name, model_name = %model_name, params = model.n_params(), size_bytes = model.size(),
        load_ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(Model {
        backend: Arc::new(backend),
        model: Arc::new(model),
        name,
        model_name,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The GGUF's `general.name` when it is a usable name, else the file name
/// without its `.gguf` extension.
pub fn default_model_name(general_name: Option<String>, path: &Path) -> String {
    if let Some(n) = general_name.map(|n| n.trim().to_string()) {
        if nanoinfer_registry::schema::validate_model_name(&n).is_ok() {
            return n;
        }
    }
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".gguf").unwrap_or(&stem).to_string();
    if nanoinfer_registry::schema::validate_model_name(&stem).is_ok() {
        stem
    } else {
        "model".to_string()
    }
}

impl Model {
    /// Tokenizes a prompt the way generation needs it (with BOS when the
    /// model wants one; special-token text is treated as plain text).
    pub fn tokenize(&self, prompt: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(prompt.as_bytes(), true, false)
    }

    /// Renders a conversation (`(role, content)` pairs) with the model's own
    /// chat template, the assistant's turn added, and tokenizes it: the
    /// template's text with special tokens parsed (its turn markers), each
    /// message's content as plain text (a `<|im_start|>` typed by a user
    /// stays text). Returns the rendered text and its tokens.
    pub fn render_chat(
        &self,
        messages: &[(String, String)],
    ) -> Result<(String, Vec<LlamaToken>), ChatError> {
        use llama_cpp_2::model::LlamaChatMessage;
        let template = self
            .model
            .chat_template(None)
            .map_err(|_| ChatError::NoTemplate)?;
        // Each content is replaced by a marker the template copies through
        // verbatim; the rendered text is then cut at the markers.
        let nonce = format!(
            "{:016x}",
            std::ptr::addr_of!(*self) as usize as u64 ^ 0x6e61_6e6f_696e_6665
        );
        let marker = |i: usize| format!("\u{1}nanoinfer-{nonce}-{i}\u{1}");
        let chat = messages
            .iter()
            .enumerate()
            .map(|(i, (role, _))| LlamaChatMessage::new(role.clone(), marker(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ChatError::Render(e.to_string()))?;
        let rendered = self
            .model
            .apply_chat_template(&template, &chat, true)
            .map_err(|e| ChatError::Render(e.to_string()))?;
        let vocab = self.model.vocab();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut rest = rendered.as_str();
        let mut first = true;
        for (i, (_, content)) in messages.iter().enumerate() {
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
            tokens.extend(vocab.tokenize(content.as_bytes(), false, false));
            text.push_str(template_part);
            text.push_str(content);
            rest = &after[m.len()..];
        }
        tokens.extend(vocab.tokenize(rest.as_bytes(), first, true));
        text.push_str(rest);
        Ok((text, tokens))
    }

    /// The text of one token, special tokens as their text form.
    pub fn piece(&self, token: LlamaToken) -> String {
        String::from_utf8_lossy(&self.model.vocab().token_to_piece(token, true, None)).into_owned()
    }

    /// The text of `tokens` (special tokens as their text form; bytes that
    /// are no valid UTF-8 become U+FFFD). Ids must be in `0..n_vocab`.
    pub fn detokenize(&self, tokens: &[LlamaToken]) -> String {
        let vocab = self.model.vocab();
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend_from_slice(&vocab.token_to_piece(t, true, None));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Vocabulary size: token ids are `0..n_vocab`.
    pub fn n_vocab(&self) -> i32 {
        self.model.n_vocab()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gguf_files_pass_the_check() {
        let dir = std::env::temp_dir().join(format!("nanoinfer-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.txt");
        std::fs::write(&text, "hello world").unwrap();
        let err = check_file(&text).unwrap_err();
        assert!(
            err.contains("is not a GGUF file") && err.contains("\"hell\""),
            "{err}"
        );
        let short = dir.join("short");
        std::fs::write(&short, "GG").unwrap();
        assert!(check_file(&short).unwrap_err().contains("shorter"));
        let gguf = dir.join("m.gguf");
        std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
        assert_eq!(check_file(&gguf), Ok(()));
        let err = check_file(&dir.join("missing.gguf")).unwrap_err();
        assert!(err.contains("missing.gguf"), "{err}");
        assert!(check_file(&dir).unwrap_err().contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
