//! Vocabulary-only GGUF files: a model file's header and metadata (the
//! tokenizer, its merges, the chat template, the hyperparameters) without
//! its tensors. llama.cpp loads such a file with `vocab_only` and tokenizes
//! and renders templates exactly as with the whole model; llama.cpp's own
//! `models/ggml-vocab-*.gguf` are files of this kind. A worker builds one
//! from its model for coordinators, which have no model volume.
//!
//! Layout (GGUF v2 and v3, little-endian): magic `GGUF`, version (u32),
//! tensor count (u64), metadata count (u64), the metadata key/value pairs,
//! then the tensor infos and the data. The vocabulary-only file keeps the
//! first four fields and the metadata byte for byte, with a tensor count of
//! zero, and nothing after them.

use std::io::Read;
use std::path::Path;

/// Metadata value types, as GGUF numbers them.
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// A reader over the file that remembers every byte it read.
struct Reader<R> {
    inner: R,
    copied: Vec<u8>,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], String> {
        let start = self.copied.len();
        self.copied.resize(start + n, 0);
        self.inner
            .read_exact(&mut self.copied[start..])
            .map_err(|e| format!("truncated GGUF metadata: {e}"))?;
        Ok(&self.copied[start..])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        // Metadata stays in memory; refuse sizes no real file has.
        if n > 1 << 30 {
            return Err(format!("GGUF metadata item of {n} bytes"));
        }
        self.bytes(n as usize).map(|_| ())
    }

    fn string(&mut self) -> Result<(), String> {
        let n = self.u64()?;
        self.skip(n)
    }

    /// Size of a fixed-size value of `kind`, or `None`.
    fn fixed(kind: u32) -> Option<u64> {
        match kind {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, kind: u32) -> Result<(), String> {
        if let Some(size) = Self::fixed(kind) {
            return self.skip(size);
        }
        match kind {
            STRING => self.string(),
            ARRAY => {
                let elem = self.u32()?;
                let n = self.u64()?;
                if let Some(size) = Self::fixed(elem) {
                    self.skip(size.checked_mul(n).ok_or("GGUF array too long")?)
                } else if elem == STRING {
                    (0..n).try_for_each(|_| self.string())
                } else {
                    Err(format!("GGUF array of type {elem} is not supported"))
                }
            }
            other => Err(format!("unknown GGUF metadata type {other}")),
        }
    }
}

/// The vocabulary-only GGUF of the model file at `path` (see the module
/// docs). Errors name the file.
pub fn vocab_only(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    vocab_only_from(std::io::BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`vocab_only`] over any reader of a GGUF file.
pub fn vocab_only_from(inner: impl Read) -> Result<Vec<u8>, String> {
    vocab_only_with(inner, None)
}

/// The metadata key of the Jinja chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// [`vocab_only_from`], with the chat template replaced by `chat_template`
/// (or added) when given: a worker started with its own template serves
/// it to coordinators, so both render alike.
pub fn vocab_only_with(inner: impl Read, chat_template: Option<&str>) -> Result<Vec<u8>, String> {
    let mut r = Reader {
        inner,
        copied: Vec::new(),
    };
    if r.bytes(4)? != b"GGUF" {
        return Err("not a GGUF file".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let tensors_at = r.copied.len();
    r.u64()?;
    let count = r.u64()?;
    let mut kept = count;
    for _ in 0..count {
        let at = r.copied.len();
        r.string()?;
        let is_template = r.copied[at + 8..] == *CHAT_TEMPLATE_KEY.as_bytes();
        let kind = r.u32()?;
        r.value(kind)?;
        if is_template && chat_template.is_some() {
            r.copied.truncate(at);
            kept -= 1;
        }
    }
    let mut out = r.copied;
    if let Some(t) = chat_template {
        for s in [CHAT_TEMPLATE_KEY, t] {
            if s == t {
                out.extend(STRING.to_le_bytes());
            }
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        kept += 1;
    }
    out[tensors_at..tensors_at + 8].copy_from_slice(&0u64.to_le_bytes());
    out[tensors_at + 8..tensors_at + 16].copy_from_slice(&kept.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    #[test]
    fn keeps_the_metadata_and_drops_the_tensors() {
        let mut file = b"GGUF".to_vec();
        file.extend(3u32.to_le_bytes());
        file.extend(2u64.to_le_bytes()); // tensors
        file.extend(3u64.to_le_bytes()); // metadata items
        string(&mut file, "general.name");
        file.extend(STRING.to_le_bytes());
        string(&mut file, "tiny");
        string(&mut file, "tokenizer.ggml.tokens");
        file.extend(ARRAY.to_le_bytes());
        file.extend(STRING.to_le_bytes());
        file.extend(2u64.to_le_bytes());
        string(&mut file, "a");
        string(&mut file, "b");
        string(&mut file, "tokenizer.ggml.scores");
        file.extend(ARRAY.to_le_bytes());
        file.extend(6u32.to_le_bytes()); // f32
        file.extend(2u64.to_le_bytes());
        file.extend([0u8; 8]);
        let metadata_end = file.len();
        file.extend([7u8; 100]); // tensor infos and data
        let out = vocab_only_from(&file[..]).unwrap();
        assert_eq!(out.len(), metadata_end);
        assert_eq!(&out[16..], &file[16..metadata_end]);
        assert_eq!(&out[8..16], &0u64.to_le_bytes());

        // A template given replaces the file's (here: is added).
        let with = vocab_only_with(&file[..], Some("{{ x }}")).unwrap();
        assert_eq!(&with[16..24], &4u64.to_le_bytes());
        let mut tail = Vec::new();
        string(&mut tail, CHAT_TEMPLATE_KEY);
        tail.extend(STRING.to_le_bytes());
        string(&mut tail, "{{ x }}");
        assert!(with.ends_with(&tail));
        let again = vocab_only_with(&with[..], Some("{{ y }}")).unwrap();
        assert_eq!(&again[16..24], &4u64.to_le_bytes());
        assert_eq!(again.len(), with.len());
        assert!(again.ends_with(b"{{ y }}"));

        assert!(vocab_only_from(&b"GGML"[..])
            .unwrap_err()
            .contains("not a GGUF"));
        assert!(vocab_only_from(&file[..40])
            .unwrap_err()
            .contains("truncated"));
    }
}
