//! API keys at the door: `Infer` requires `authorization: Bearer <key>`
//! with a key from `--api-keys-file`. `Health`, `grpc.health.v1` and the
//! metrics/probe endpoints stay open, so probes need no key.
//!
//! The file holds one key per line; blank lines and lines starting with `#`
//! are ignored. It is read again every [`RELOAD_EVERY`], so rotating keys
//! needs no restart. Emptying or deleting the file revokes every key: a
//! file that holds no key or cannot be read **fails closed** (every request
//! refused, an error logged once per change, `Health` says `NO_API_KEYS`)
//! until it is readable with keys again; emptying it is how an operator
//! cuts off a leaked key at once. At start an empty or missing file is an
//! error instead, so a typo in the path never starts a server that refuses
//! everyone. Keys are compared in constant time and never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::MetadataMap;

/// How often the keys file is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// What `Health` says while no key is in force.
pub const NO_API_KEYS_STATUS: &str = "NO_API_KEYS: the API keys file holds no valid key (emptied, deleted or unreadable); every request is refused until it holds one";

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `authorization: Bearer …` header.
    Missing,
    /// A key that is not in the file.
    Invalid,
    /// The keys file holds no valid key: every request is refused.
    NoKeys,
}

impl Rejection {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::NoKeys => "no_keys",
        }
    }

    /// What the client is told (never the key, nor the file).
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "an API key is required: send the header `authorization: Bearer <key>`"
            }
            Self::Invalid => "the API key is not valid",
            Self::NoKeys => {
                "the server has no valid API keys configured, so every request is refused; ask its operator"
            }
        }
    }
}

/// The keys in force, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// The keys of the file whose text this was.
    Keys {
        keys: Arc<Vec<Vec<u8>>>,
        text: String,
    },
    /// Fail closed: the file holds no key or cannot be read (the reason,
    /// for the log).
    Revoked { reason: String },
}

/// What a [`ApiKeys::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The file is as it was.
    Unchanged,
    /// New keys are in force (rotation); this many.
    Rotated(usize),
    /// Keys are in force again after a revocation; this many.
    Restored(usize),
    /// The file holds no key or cannot be read: every key is revoked.
    Revoked(String),
    /// Still revoked, for a reason that changed (e.g. emptied, then
    /// deleted).
    StillRevoked(String),
}

/// The keys in force, reloaded from their file.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    state: RwLock<State>,
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
            state: RwLock::new(State::Keys {
                keys: Arc::new(keys),
                text,
            }),
        })
    }

    /// How many keys are in force (0 while revoked).
    pub fn len(&self) -> usize {
        match &*self.state.read().expect("keys lock") {
            State::Keys { keys, .. } => keys.len(),
            State::Revoked { .. } => 0,
        }
    }

    /// Whether no key is in force: the file was emptied, deleted or made
    /// unreadable after start, and every request is refused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `Health` status while every request is refused for want of a
    /// key; `None` while keys are in force.
    pub fn health_problem(&self) -> Option<&'static str> {
        self.is_empty().then_some(NO_API_KEYS_STATUS)
    }

    /// Checks the request's `authorization` header. Every key is compared,
    /// whatever matched, so timing says nothing about which.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Rejection> {
        let keys = match &*self.state.read().expect("keys lock") {
            State::Keys { keys, .. } => keys.clone(),
            State::Revoked { .. } => return Err(Rejection::NoKeys),
        };
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
        let found = keys
            .iter()
            .fold(false, |found, key| found | ct_eq(key, token.as_bytes()));
        if found {
            Ok(())
        } else {
            Err(Rejection::Invalid)
        }
    }

    /// Reads the file again and says what changed. A file with no key, or
    /// one that cannot be read, revokes every key.
    pub fn reload(&self) -> Reload {
        let next = match read(&self.path) {
            Ok((text, keys)) => State::Keys {
                keys: Arc::new(keys),
                text,
            },
            Err(reason) => State::Revoked { reason },
        };
        let mut state = self.state.write().expect("keys lock");
        let outcome = match (&*state, &next) {
            (State::Keys { text: old, .. }, State::Keys { text: new, .. }) if old == new => {
                return Reload::Unchanged
            }
            (State::Revoked { reason: old }, State::Revoked { reason: new }) if old == new => {
                return Reload::Unchanged
            }
            (State::Keys { .. }, State::Keys { keys, .. }) => Reload::Rotated(keys.len()),
            (State::Revoked { .. }, State::Keys { keys, .. }) => Reload::Restored(keys.len()),
            (State::Keys { .. }, State::Revoked { reason }) => Reload::Revoked(reason.clone()),
            (State::Revoked { .. }, State::Revoked { reason }) => {
                Reload::StillRevoked(reason.clone())
            }
        };
        *state = next;
        outcome
    }

    /// Reloads the file every [`RELOAD_EVERY`] until aborted, logging each
    /// change once (a revocation at error level).
    pub fn spawn_reload(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match self.reload() {
                    Reload::Unchanged => {}
                    Reload::Rotated(keys) => tracing::info!(keys, "API keys reloaded"),
                    Reload::Restored(keys) => tracing::warn!(
                        keys,
                        "API keys file holds keys again: requests with a listed key are served"
                    ),
                    Reload::Revoked(reason) | Reload::StillRevoked(reason) => tracing::error!(
                        error = %reason,
                        "no valid API key: EVERY request is refused (UNAUTHENTICATED / HTTP 401) until the keys file holds one"
                    ),
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
        assert_eq!(keys.reload(), Reload::Unchanged);
        std::fs::write(&path, "new-key\n").unwrap();
        assert_eq!(keys.reload(), Reload::Rotated(1));
        assert_eq!(
            keys.check(&headers(Some("Bearer old-key"))),
            Err(Rejection::Invalid)
        );
        assert_eq!(keys.check(&headers(Some("Bearer new-key"))), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ApiKeys::load(&path).is_err());
    }

    #[test]
    fn an_emptied_or_deleted_file_revokes_every_key_until_it_holds_keys_again() {
        let dir = std::env::temp_dir().join(format!("nanoinfer-revoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "leaked-key\n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(keys.health_problem(), None);
        assert_eq!(keys.check(&headers(Some("Bearer leaked-key"))), Ok(()));

        // Emptied (comments only): every request refused, whatever it
        // sends; reported once.
        std::fs::write(&path, "# revoked\n").unwrap();
        assert!(matches!(keys.reload(), Reload::Revoked(r) if r.contains("no key in it")));
        assert_eq!(
            keys.reload(),
            Reload::Unchanged,
            "logged once, not every tick"
        );
        assert!(keys.is_empty());
        assert_eq!(keys.health_problem(), Some(NO_API_KEYS_STATUS));
        for h in [None, Some("Bearer leaked-key"), Some("Bearer other")] {
            assert_eq!(keys.check(&headers(h)), Err(Rejection::NoKeys), "{h:?}");
        }
        let told = Rejection::NoKeys.message();
        assert!(told.contains("no valid API keys"), "{told}");
        assert!(
            !told.contains(path.to_str().unwrap()),
            "the path is not told"
        );

        // Deleted: still revoked, the new reason reported.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(keys.reload(), Reload::StillRevoked(r) if r.contains("No such file")));
        assert_eq!(keys.reload(), Reload::Unchanged);
        assert_eq!(
            keys.check(&headers(Some("Bearer leaked-key"))),
            Err(Rejection::NoKeys)
        );

        // Written again with a new key: restored, the leaked one stays out.
        std::fs::write(&path, "fresh-key\n").unwrap();
        assert_eq!(keys.reload(), Reload::Restored(1));
        assert_eq!(keys.health_problem(), None);
        assert_eq!(keys.check(&headers(Some("Bearer fresh-key"))), Ok(()));
        assert_eq!(
            keys.check(&headers(Some("Bearer leaked-key"))),
            Err(Rejection::Invalid)
        );
        assert_eq!(keys.reload(), Reload::Unchanged);

        // Emptied and refilled with the same text: revoked, then restored.
        std::fs::write(&path, "").unwrap();
        assert!(matches!(keys.reload(), Reload::Revoked(_)));
        std::fs::write(&path, "fresh-key\n").unwrap();
        assert_eq!(keys.reload(), Reload::Restored(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
