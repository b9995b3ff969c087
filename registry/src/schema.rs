//! The etcd key schema and the worker record, used by both sides.

use serde::{Deserialize, Serialize};

/// Prefix under which every worker registers itself.
pub const WORKERS_PREFIX: &str = "/nanoinfer/workers/";

/// The key a worker with `id` registers under.
pub fn worker_key(id: &str) -> String {
    format!("{WORKERS_PREFIX}{id}")
}

/// The worker id a key names, or `None` for a key outside the schema.
pub fn worker_id(key: &str) -> Option<&str> {
    key.strip_prefix(WORKERS_PREFIX)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Checks that `id` can be used as a worker id (one key segment).
pub fn validate_worker_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!(
            "worker id must be 1..=128 bytes, got {} bytes",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "worker id {id:?} contains {c:?}; use [A-Za-z0-9._:-]"
        ));
    }
    Ok(())
}

/// Checks that `address` is a `host:port` the coordinator can dial: a
/// hostname or IP (IPv6 in brackets), a port 1..=65535, nothing else. The
/// worker refuses to register a bad `--advertise`, and the coordinator skips a
/// record that fails this (one bad record must not poison routing).
pub fn validate_address(address: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("address {:?} is not host:port: {why}", address));
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("no port");
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return bad("the port must be 1..=65535"),
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("invalid IPv6 address"),
        };
    }
    if host.is_empty() || host.len() > 253 {
        return bad("empty or overlong host");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.split('.').all(label_ok) {
        return bad("the host must be a DNS name or an IP address");
    }
    Ok(())
}

/// Checks a model name (`--model-name`, or one read from a GGUF): 1..=128
/// bytes, no control characters. Names are matched exactly.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!(
            "a model name must be 1..=128 bytes, got {} bytes",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "model name {:?} contains a control character",
            name.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Generation capacity a worker advertises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Requests it generates concurrently.
    pub slots: u32,
    /// Requests it queues before answering `RESOURCE_EXHAUSTED`.
    pub queue: u32,
    /// Context window in tokens (prompt + generated).
    pub context_length: u32,
}

/// The JSON value stored at `/nanoinfer/workers/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's id (the last key segment).
    pub id: String,
    /// gRPC address the coordinator dials, `host:port`.
    pub address: String,
    /// The GGUF file it serves (its file name).
    pub model: String,
    /// The name requests select it by (`--model-name`); empty in records
    /// of workers older than the field.
    #[serde(default)]
    pub model_name: String,
    /// What it can take.
    pub capacity: Capacity,
    /// nanoinfer version of the worker binary.
    pub version: String,
}

impl WorkerInfo {
    /// The key this record is stored under.
    pub fn key(&self) -> String {
        worker_key(&self.id)
    }

    /// Encodes the record as the JSON stored in etcd.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("WorkerInfo always serializes")
    }

    /// Decodes the JSON stored in etcd.
    pub fn from_json(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkerInfo {
        WorkerInfo {
            id: "host-50061".into(),
            address: "127.0.0.1:50061".into(),
            model: "gemma-3-270m-q4_k_m.gguf".into(),
            model_name: "gemma-3-270m".into(),
            capacity: Capacity {
                slots: 1,
                queue: 16,
                context_length: 2048,
            },
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn value_round_trips_through_json() {
        let info = sample();
        let json = info.to_json();
        assert_eq!(WorkerInfo::from_json(json.as_bytes()).unwrap(), info);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["address"], "127.0.0.1:50061");
        assert_eq!(v["capacity"]["context_length"], 2048);
    }

    #[test]
    fn key_round_trips() {
        let info = sample();
        assert_eq!(info.key(), "/nanoinfer/workers/host-50061");
        assert_eq!(worker_id(&info.key()), Some("host-50061"));
        assert_eq!(worker_id("/nanoinfer/workers/"), None);
        assert_eq!(worker_id("/nanoinfer/workers/a/b"), None);
        assert_eq!(worker_id("/other/x"), None);
    }

    #[test]
    fn worker_ids_are_single_segments() {
        assert!(validate_worker_id("node-1:50061").is_ok());
        assert!(validate_worker_id("").is_err());
        assert!(validate_worker_id("a/b").unwrap_err().contains("'/'"));
        assert!(validate_worker_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn addresses_must_be_host_port() {
        for ok in [
            "127.0.0.1:50061",
            "worker-0.workers.default.svc:50061",
            "[::1]:50061",
            "localhost:1",
        ] {
            assert_eq!(validate_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "my host:15063",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            ":50061",
            "host:+5",
            "[zz]:1",
            "a..b:1",
            "http://x:1",
        ] {
            let err = validate_address(bad).unwrap_err();
            assert!(err.contains("host:port"), "{bad}: {err}");
        }
    }

    #[test]
    fn malformed_value_is_an_error() {
        assert!(WorkerInfo::from_json(b"{\"id\":1}").is_err());
    }
}
