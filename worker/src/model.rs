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

/// Checks that `path` is a readable GGUF file (its magic bytes), so a wrong
/// path or file is a clear error before anything else starts; llama.cpp
/// itself only says "null result" for a file it cannot parse.
pub fn check_file(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("model file {}: {e}", path.display()))?;
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
/// `spawn_blocking`). Errors name the path.
pub fn load(path: &Path) -> Result<Model, String> {
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
