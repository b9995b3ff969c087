//! What the worker's integration tests share.

use std::path::{Path, PathBuf};
use std::process::Command;

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
