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

/// Longest worker id: one DNS label.
pub const MAX_WORKER_ID_LEN: usize = 63;

/// Checks that `id` can be used as a worker id: one DNS label
/// (`[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?`), so that it is one key
/// segment, the first label of the certificate name
/// `<id>.worker.nanoinfer` (`scripts/gen-certs` requires the same) and the
/// exact etcd key a per-worker role may write. The worker refuses such an
/// `--id` at start; the coordinator skips a record whose id breaks it.
pub fn validate_worker_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_WORKER_ID_LEN {
        return Err(format!(
            "worker id {:?} must be 1..={MAX_WORKER_ID_LEN} bytes, got {} bytes",
            Escaped(id),
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "worker id {:?} contains {c:?}; use a DNS label: letters, digits and inner '-'",
            Escaped(id)
        ));
    }
    if id.starts_with('-') || id.ends_with('-') {
        return Err(format!(
            "worker id {id:?} starts or ends with '-'; use a DNS label: letters, digits and inner '-'"
        ));
    }
    Ok(())
}

/// A string for a log line or an error: at most 80 characters, Rust-escaped
/// by `{:?}` (a newline or a quote cannot end the line or the quoted field).
struct Escaped<'a>(&'a str);

impl std::fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MAX: usize = 80;
        match self.0.char_indices().nth(MAX) {
            Some((end, _)) => write!(f, "{:?}…", &self.0[..end]),
            None => write!(f, "{:?}", self.0),
        }
    }
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

/// Longest model name.
pub const MAX_MODEL_NAME_LEN: usize = 128;

/// Checks a model name (`--model-name`, one read from a GGUF, a request's
/// `model`, and the `model_name` of every record the coordinator reads):
/// 1..=128 bytes of ASCII letters, digits, `. _ : / @ + -` and inner
/// spaces (a GGUF's `general.name`, such as `Gemma 3 270m`), neither
/// starting nor ending with a space. No quotes, backslashes or control
/// characters, so a name is safe in a log line and a metric label. Names are
/// matched exactly.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME_LEN {
        return Err(format!(
            "a model name must be 1..={MAX_MODEL_NAME_LEN} bytes, got {} bytes",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|&c| !model_name_char(c)) {
        return Err(format!(
            "model name {:?} contains {c:?}; use letters, digits, '.', '_', ':', '/', '@', '+', '-' and inner spaces",
            Escaped(name)
        ));
    }
    if name.starts_with(' ') || name.ends_with(' ') {
        return Err(format!("model name {name:?} starts or ends with a space"));
    }
    Ok(())
}

fn model_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '@' | '+' | '-' | ' ')
}

/// Checks a free-text field of a record (the GGUF file name, the version):
/// at most 255 bytes and no control characters, so it cannot break a log
/// line.
fn validate_text(field: &str, value: &str) -> Result<(), String> {
    if value.len() > 255 {
        return Err(format!("{field} is {} bytes; at most 255", value.len()));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "{field} {:?} contains a control character",
            Escaped(value)
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

    /// Checks the record the way the coordinator does before routing to it
    /// (and the worker before publishing it): a valid id, an address the
    /// coordinator can dial, a valid model name (empty only in records of
    /// workers older than the field), and no control characters anywhere.
    pub fn validate(&self) -> Result<(), String> {
        validate_worker_id(&self.id)?;
        validate_address(&self.address)?;
        if !self.model_name.is_empty() {
            validate_model_name(&self.model_name)?;
        }
        validate_text("model", &self.model)?;
        validate_text("version", &self.version)
    }

    /// Decodes and checks the record stored under `key`, which must name
    /// the same id as the record itself: `None` for a key outside the
    /// schema, else the record or why it is refused (already escaped: safe
    /// to log).
    pub fn from_record(key: &str, value: &[u8]) -> Option<Result<Self, String>> {
        let id = worker_id(key)?;
        Some(Self::decode_checked(id, value))
    }

    fn decode_checked(id: &str, value: &[u8]) -> Result<Self, String> {
        validate_worker_id(id).map_err(|e| format!("its key: {e}"))?;
        let info = Self::from_json(value).map_err(|e| e.to_string())?;
        if info.id != id {
            return Err(format!(
                "its id {:?} is not its key's {id:?}",
                Escaped(&info.id)
            ));
        }
        info.validate()?;
        Ok(info)
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
    fn worker_ids_are_dns_labels() {
        for ok in [
            "a",
            "w1",
            "local-worker1",
            "nanoinfer-worker-0",
            "A-9",
            &"x".repeat(63),
        ] {
            assert_eq!(validate_worker_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a/b",
            "a.b",
            "a_b",
            "node-1:50061",
            "a b",
            "evil\nINFO forged",
            "a\"b",
            "é",
            &"x".repeat(64),
        ] {
            let err = validate_worker_id(bad).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
        }
        let err = validate_worker_id("x\ny").unwrap_err();
        assert!(err.contains(r#""x\ny""#), "escaped: {err}");
        assert!(validate_worker_id(&"x".repeat(1000))
            .unwrap_err()
            .contains('…'));
    }

    #[test]
    fn model_names_are_printable_ascii_without_quotes() {
        for ok in [
            "gemma",
            "smollm2-135m-instruct",
            "Gemma 3 270m",
            "Smollm2 135M 8k Lc100K Mix1 Ep2",
            "SmolLM2-135M-Instruct.Q4_1",
            "org/model:tag@v1+q4_k_m",
            &"m".repeat(128),
        ] {
            assert_eq!(validate_model_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            " gemma",
            "gemma ",
            "a\nb",
            "a\"b",
            "a'b",
            "a\\b",
            "a\tb",
            "a=b",
            "a,b",
            "a{b}",
            "modèle",
            &"m".repeat(129),
        ] {
            let err = validate_model_name(bad).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
        }
    }

    fn record(key: &str, json: &str) -> Option<Result<WorkerInfo, String>> {
        WorkerInfo::from_record(key, json.as_bytes())
    }

    #[test]
    fn records_are_checked_against_their_key() {
        let info = sample();
        assert_eq!(record(&info.key(), &info.to_json()), Some(Ok(info.clone())));
        // Outside the schema: not a record at all.
        assert_eq!(record("/nanoinfer/workers/a/b", "{}"), None);
        // Its key names another worker.
        let err = record("/nanoinfer/workers/other", &info.to_json())
            .unwrap()
            .unwrap_err();
        assert!(err.contains("not its key's"), "{err}");
        // A key and id that agree but could forge a log line.
        for id in ["evil\nINFO worker joined", "a\"b", "a.b"] {
            let forged = WorkerInfo {
                id: id.into(),
                ..info.clone()
            };
            let err = record(&worker_key(id), &forged.to_json())
                .unwrap()
                .unwrap_err();
            assert!(err.starts_with("its key: worker id"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        // A bad model name, file name or version.
        for (field, bad) in [
            ("model_name", "x\ny"),
            ("model_name", "x\"y"),
            ("model", "file\n.gguf"),
            ("version", "1\r"),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&info.to_json()).unwrap();
            v[field] = bad.into();
            let err = record(&info.key(), &v.to_string()).unwrap().unwrap_err();
            assert!(!err.contains('\n') && !err.contains('\r'), "{err}");
        }
        // Records of workers older than model_name still count.
        let mut v: serde_json::Value = serde_json::from_str(&info.to_json()).unwrap();
        v.as_object_mut().unwrap().remove("model_name");
        assert!(record(&info.key(), &v.to_string()).unwrap().is_ok());
        // A bad address.
        let mut v: serde_json::Value = serde_json::from_str(&info.to_json()).unwrap();
        v["address"] = "my host:1".into();
        let err = record(&info.key(), &v.to_string()).unwrap().unwrap_err();
        assert!(err.contains("host:port"), "{err}");
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
