//! What the worker's integration tests share.

use std::path::{Path, PathBuf};
use std::process::Command;

use nanoinfer_proto::limits::SamplingControls;
use nanoinfer_worker::engine::Generation;
use nanoinfer_worker::model::Model;

/// A greedy generation of at most `max_tokens` for `prompt`, no control
/// on; tests change the fields they need.
#[allow(dead_code)] // not every test file generates
pub fn generation(m: &Model, prompt: &str, max_tokens: u32) -> Generation {
    Generation {
        request_id: "test".into(),
        prompt: m.tokenize(prompt),
        resume: Vec::new(),
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        controls: SamplingControls::default(),
        logit_bias: Vec::new(),
        grammar: None,
        stop: Vec::new(),
        deadline: None,
        span: tracing::Span::none(),
    }
}

/// The model file `var` names, else the one `scripts/fetch-model KEY`
/// fetches (and prints last).
pub fn fetched(var: &str, key: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(root.join("scripts/fetch-model"))
        .arg(key)
        .output()
        .expect("run scripts/fetch-model");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim(),
    )
}
