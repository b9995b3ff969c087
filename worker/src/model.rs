//! Loading a GGUF model and tokenizing prompts with it.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

pub use nanoinfer_vocab::{ChatError, ChatMessage, ChatTemplate};

/// A loaded model, shareable across threads (tokenization is read-only).
pub struct Model {
    /// The llama.cpp backend; must outlive every model and context.
    pub backend: Arc<LlamaBackend>,
    /// The weights and vocabulary.
    pub model: Arc<LlamaModel>,
    /// File name of the GGUF.
    pub name: String,
    /// Where the GGUF is.
    pub path: std::path::PathBuf,
    /// The name requests select the model by: `--model-name`, else the
    /// GGUF's `general.name`, else the file name without `.gguf`.
    pub model_name: String,
    /// Seconds the load took.
    pub load_seconds: f64,
    /// The structured-output compiler over this vocabulary.
    pub grammars: crate::grammar::Grammars,
    /// The chat template, compiled (`None`: llama.cpp's built-in matcher).
    pub template: Option<Arc<ChatTemplate>>,
    /// `--chat-template-file`'s text, served in the vocabulary file.
    pub template_override: Option<String>,
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

/// Environment variable that turns ggml's tiled matrix kernel for
/// K-quants on (`1`) or off (`0`).
pub const TILED_KERNEL_VAR: &str = "GGML_CPU_TILED_MM";

/// Turns off ggml's tiled K-quant matrix kernel unless the environment
/// already says: it takes a batch of 8 rows or more and rounds differently
/// from the kernel a smaller batch gets, so a prompt computed cold (in one
/// large chunk) and the same prompt after a cached prefix (a few rows)
/// would get different logits, and a seeded request different text
/// (docs/operations.md, "Same seed, same text"; its cost, with the 8-bit
/// KV cache, is in docs/benchmarks.md). ggml reads the variable once, at
/// its first matrix product.
pub fn pin_kernels() {
    if std::env::var_os(TILED_KERNEL_VAR).is_none() {
        std::env::set_var(TILED_KERNEL_VAR, "0");
    }
}

/// Loads `path` on the calling thread (blocking; call it from
/// `spawn_blocking`). Errors name the path. `model_name` overrides the name
/// read from the file.
pub fn load(
    path: &Path,
    model_name: Option<&str>,
    template_override: Option<String>,
) -> Result<Model, String> {
    check_file(path)?;
    pin_kernels();
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
    let template = match nanoinfer_vocab::chat_template(&model, template_override.as_deref()) {
        Ok(t) => {
            tracing::info!(
                tool_format = t.tool_format().name(),
                "chat template compiled"
            );
            Some(Arc::new(t))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no Jinja chat template: conversations use llama.cpp's built-in templates, without tools");
            None
        }
    };
    let model = Arc::new(model);
    Ok(Model {
        template,
        template_override,
        backend: Arc::new(backend),
        grammars: crate::grammar::Grammars::new(model.clone()),
        model,
        name,
        path: path.to_path_buf(),
        model_name,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Loads the draft model at `path` (`--draft-model`) on `backend`, the
/// served model's (llama.cpp's backend starts once per process), and checks
/// that it has `main`'s vocabulary: the same number of tokens, each with
/// the same text, or its proposals would name other tokens. Errors name
/// the flag.
pub fn load_draft(
    backend: &LlamaBackend,
    path: &Path,
    main: &LlamaModel,
) -> Result<LlamaModel, String> {
    check_file(path).map_err(|e| format!("--draft-model: {e}"))?;
    let draft = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| format!("--draft-model: cannot load {}: {e}", path.display()))?;
    same_vocabulary(main, &draft).map_err(|e| format!("--draft-model {}: {e}", path.display()))?;
    tracing::info!(draft_model = %path.display(), params = draft.n_params(), "draft model loaded");
    Ok(draft)
}

/// Whether `draft` names every token as `main` does.
fn same_vocabulary(main: &LlamaModel, draft: &LlamaModel) -> Result<(), String> {
    if main.n_vocab() != draft.n_vocab() {
        return Err(format!(
            "its vocabulary has {} tokens, the served model's {}",
            draft.n_vocab(),
            main.n_vocab()
        ));
    }
    let (a, b) = (main.vocab(), draft.vocab());
    for id in 0..main.n_vocab() {
        let token = LlamaToken(id);
        if a.token_to_piece(token, true, None) != b.token_to_piece(token, true, None) {
            return Err(format!(
                "token {id} is {:?} there and {:?} in the served model: not the same vocabulary",
                String::from_utf8_lossy(&b.token_to_piece(token, true, None)),
                String::from_utf8_lossy(&a.token_to_piece(token, true, None))
            ));
        }
    }
    Ok(())
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
        nanoinfer_vocab::tokenize(&self.model, prompt)
    }

    /// Renders a conversation with the model's own chat template and
    /// tokenizes it ([`nanoinfer_vocab::render_chat`], the code the
    /// coordinator computes the same ids with). Returns the rendered text
    /// and its tokens.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<(String, Vec<LlamaToken>), ChatError> {
        nanoinfer_vocab::render_chat(
            &self.model,
            self.template.as_deref(),
            messages,
            tools,
            &mut |content| nanoinfer_vocab::content_tokens(&self.model, content),
        )
    }

    /// This model's vocabulary-only GGUF (for coordinators, which tokenize
    /// with it; see [`nanoinfer_vocab::gguf`]).
    pub fn vocab_gguf(&self) -> Result<Vec<u8>, String> {
        let file =
            std::fs::File::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        nanoinfer_vocab::gguf::vocab_only_with(
            std::io::BufReader::new(file),
            self.template_override.as_deref(),
        )
        .map_err(|e| format!("{}: {e}", self.path.display()))
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
