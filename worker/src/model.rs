//! Loading a GGUF model and tokenizing prompts with it.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

/// A loaded model, shareable across threads (tokenization is read-only).
pub struct Model {
    /// The llama.cpp backend; must outlive every model and context.
    pub backend: Arc<LlamaBackend>,
    /// The weights and vocabulary.
    pub model: Arc<LlamaModel>,
    /// File name of the GGUF, used as the model's name.
    pub name: String,
    /// Seconds the load took.
    pub load_seconds: f64,
}

/// Loads `path` on the calling thread (blocking; call it from
/// `spawn_blocking`). Errors name the path.
pub fn load(path: &Path) -> Result<Model, String> {
    if !path.is_file() {
        return Err(format!("model file {} does not exist", path.display()));
    }
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
    tracing::info!(model = %name, params = model.n_params(), size_bytes = model.size(),
        load_ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(Model {
        backend: Arc::new(backend),
        model: Arc::new(model),
        name,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}

impl Model {
    /// Tokenizes a prompt the way generation needs it (with BOS when the
    /// model wants one; special-token text is treated as plain text).
    pub fn tokenize(&self, prompt: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(prompt.as_bytes(), true, false)
    }

    /// Vocabulary size: token ids are `0..n_vocab`.
    pub fn n_vocab(&self) -> i32 {
        self.model.n_vocab()
    }
}
