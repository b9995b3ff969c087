//! API keys at the door: `Infer` requires `authorization: Bearer <key>`
//! with a key from `--api-keys-file`. `Health`, `grpc.health.v1` and the
//! metrics/probe endpoints stay open, so probes need no key.
//!
//! The file holds one key per line; blank lines and lines starting with `#`
//! are ignored. It is read again every [`RELOAD_EVERY`], so rotating keys
//! needs no restart; a file that cannot be read or holds no key leaves the
//! current keys in force (with a warning), rather than locking everyone out
//! or letting everyone in. Keys are compared in constant time and never
//! logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::MetadataMap;

/// How often the keys file is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `authorization: Bearer …` header.
    Missing,
    /// A key that is not in the file.
    Invalid,
}

impl Rejection {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
        }
    }

    /// What the client is told (never the key).
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "an API key is required: send the header `authorization: Bearer <key>`"
            }
            Self::Invalid => "the API key is not valid",
        }
    }
}

/// The keys in force, reloaded from their file.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    keys: RwLock<Arc<Vec<Vec<u8>>>>,
    text: RwLock<String>,
}

/// The keys in a keys file's text.
pub fn parse(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// Whether `a == b`, in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

fn read(path: &Path) -> Result<(String, Vec<Vec<u8>>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
    let keys = parse(&text);
    if keys.is_empty() {
        return Err(format!(
            "--api-keys-file {}: no key in it (one key per line; # starts a comment)",
            path.display()
        ));
    }
    Ok((text, keys))
}

impl ApiKeys {
    /// Loads the keys at `path`; an unreadable or empty file is an error.
    pub fn load(path: &Path) -> Result<Self, String> {
        let (text, keys) = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            keys: RwLock::new(Arc::new(keys)),
            text: RwLock::new(text),
        })
    }

    /// How many keys are in force.
    pub fn len(&self) -> usize {
        self.keys.read().expect("keys lock").len()
    }

    /// Whether no key is in force (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the request's `authorization` header. Every key is compared,
    /// whatever matched, so timing says nothing about which.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Rejection> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(Rejection::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Rejection::Missing)?;
        let keys = self.keys.read().expect("keys lock").clone();
        let found = keys
            .iter()
            .fold(false, |found, key| found | ct_eq(key, token.as_bytes()));
        if found {
            Ok(())
        } else {
            Err(Rejection::Invalid)
        }
    }

    /// Reads the file again; returns whether the keys changed.
    pub fn reload(&self) -> Result<bool, String> {
        let (text, keys) = read(&self.path)?;
        if *self.text.read().expect("keys lock") == text {
            return Ok(false);
        }
        *self.keys.write().expect("keys lock") = Arc::new(keys);
        *self.text.write().expect("keys lock") = text;
        Ok(true)
    }

    /// Reloads the file every [`RELOAD_EVERY`] until aborted.
    pub fn spawn_reload(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                match self.reload() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(keys = self.len(), "API keys reloaded");
                    }
                    Ok(false) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot reload API keys; the current ones stay in force");
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn keys_files_skip_blanks_and_comments() {
        let keys = parse("# team a\nkey-one\n\n  key-two  \n#key-three\n");
        assert_eq!(keys, vec![b"key-one".to_vec(), b"key-two".to_vec()]);
    }

    #[test]
    fn equality_is_exact() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn requests_need_a_listed_bearer_key_and_rotation_applies() {
        let dir = std::env::temp_dir().join(format!("nanoinfer-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "# keys\nold-key\n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(keys.check(&headers(None)), Err(Rejection::Missing));
        assert_eq!(
            keys.check(&headers(Some("Basic x"))),
            Err(Rejection::Missing)
        );
        assert_eq!(
            keys.check(&headers(Some("Bearer "))),
            Err(Rejection::Missing)
        );
        assert_eq!(
            keys.check(&headers(Some("Bearer nope"))),
            Err(Rejection::Invalid)
        );
        assert_eq!(keys.check(&headers(Some("Bearer old-key"))), Ok(()));
        assert_eq!(keys.reload(), Ok(false));
        std::fs::write(&path, "new-key\n").unwrap();
        assert_eq!(keys.reload(), Ok(true));
        assert_eq!(
            keys.check(&headers(Some("Bearer old-key"))),
            Err(Rejection::Invalid)
        );
        assert_eq!(keys.check(&headers(Some("Bearer new-key"))), Ok(()));
        // An emptied file keeps the keys in force.
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(keys.check(&headers(Some("Bearer new-key"))), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ApiKeys::load(&path).is_err());
    }
}
