//! The coordinator's tokenizers: per model, the vocabulary a worker serving
//! it sends (`Vocabulary`, a vocabulary-only GGUF), loaded with llama.cpp
//! through `nanoinfer_vocab`, the worker's own tokenizer and chat-template
//! code. The token ids are the worker's, so the KV block hashes
//! (`nanoinfer_proto::kv`) computed here are the ones the workers publish.
//!
//! A model's vocabulary is fetched when the model's first worker appears
//! (or on the first request that needs it), in the background. A request
//! that comes while it loads waits for it, up to [`LOAD_WAIT`] (a coordinator
//! that starts under traffic would otherwise send its first requests by
//! load alone, warming prefixes twice); past that, or when the fetch
//! failed, it is routed by load. A failed fetch is tried again after
//! [`RETRY`].
//!
//! Chat contents are tokenized on their own (see
//! `nanoinfer_vocab::render_chat`), so their tokens are cached whole: a
//! long system prompt shared by many requests is tokenized once
//! ([`CONTENT_CACHE_BYTES`] of contents per model, least recently used
//! out). A plain prompt is tokenized whole each time (a cut inside it
//! could change the tokens).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use nanoinfer_proto::worker::{worker_service_client::WorkerServiceClient, VocabularyRequest};
use tonic::transport::Channel;

/// How long after a failed fetch the next one may start.
pub const RETRY: Duration = Duration::from_secs(10);
/// Longest a request waits for its model's vocabulary while it loads.
pub const LOAD_WAIT: Duration = Duration::from_secs(3);
/// Bytes of chat contents whose tokens are cached, per model.
pub const CONTENT_CACHE_BYTES: usize = 16 << 20;
/// Contents shorter than this are tokenized every time (cheaper than the
/// cache's bookkeeping).
const CACHED_CONTENT_MIN_BYTES: usize = 256;
/// Largest vocabulary file accepted from a worker.
const MAX_VOCABULARY_BYTES: u64 = 256 << 20;

/// llama.cpp's backend: initialised once per process.
fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| format!("llama.cpp backend: {e}"))?;
            if !tracing::enabled!(tracing::Level::DEBUG) {
                b.void_logs();
            }
            Ok(b)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One model's tokenizer.
pub struct Tokenizer {
    model: LlamaModel,
    /// The model's Jinja chat template (`None`: llama.cpp's matcher), as
    /// the worker compiles it from the same file.
    template: Option<nanoinfer_vocab::ChatTemplate>,
    contents: Mutex<ContentCache>,
}

/// Cached content tokens, least recently used out past a byte budget.
struct ContentCache {
    map: HashMap<String, (Arc<Vec<LlamaToken>>, u64)>,
    bytes: usize,
    tick: u64,
}

impl Tokenizer {
    /// Loads a vocabulary-only GGUF from `bytes`.
    pub fn from_gguf(bytes: &[u8], name: &str) -> Result<Self, String> {
        let backend = backend()?;
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = std::env::temp_dir().join(format!(
            "nanoinfer-vocab-{}-{safe}-{}.gguf",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let model = nanoinfer_vocab::load_vocab(backend, &path);
        let _ = std::fs::remove_file(&path);
        let model = model?;
        let template = nanoinfer_vocab::chat_template(&model, None).ok();
        Ok(Self {
            template,
            model,
            contents: Mutex::new(ContentCache {
                map: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
        })
    }

    /// A plain prompt's tokens, as the worker computes them.
    pub fn prompt(&self, prompt: &str) -> Vec<i32> {
        nanoinfer_vocab::tokenize(&self.model, prompt)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// A conversation's tokens, as the worker renders and computes them.
    pub fn chat(
        &self,
        messages: &[nanoinfer_vocab::ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<i32>, nanoinfer_vocab::ChatError> {
        let (_, tokens) = nanoinfer_vocab::render_chat(
            &self.model,
            self.template.as_ref(),
            messages,
            tools,
            &mut |content| self.content(content),
        )?;
        Ok(tokens.into_iter().map(|t| t.0).collect())
    }

    /// How the model's chat template writes tool calls
    /// ([`nanoinfer_vocab::ToolFormat::None`]: it has no tool section).
    pub fn tool_format(&self) -> nanoinfer_vocab::ToolFormat {
        self.template
            .as_ref()
            .map_or(nanoinfer_vocab::ToolFormat::None, |t| t.tool_format())
    }

    fn content(&self, content: &str) -> Vec<LlamaToken> {
        if content.len() < CACHED_CONTENT_MIN_BYTES {
            return nanoinfer_vocab::content_tokens(&self.model, content);
        }
        {
            let mut cache = self.contents.lock().expect("content cache lock");
            cache.tick += 1;
            let tick = cache.tick;
            if let Some((tokens, used)) = cache.map.get_mut(content) {
                *used = tick;
                return tokens.as_ref().clone();
            }
        }
        let tokens = Arc::new(nanoinfer_vocab::content_tokens(&self.model, content));
        let mut cache = self.contents.lock().expect("content cache lock");
        if content.len() <= CONTENT_CACHE_BYTES / 4 {
            let tick = cache.tick;
            if cache
                .map
                .insert(content.to_string(), (tokens.clone(), tick))
                .is_none()
            {
                cache.bytes += content.len();
            }
            while cache.bytes > CONTENT_CACHE_BYTES {
                let oldest = cache
                    .map
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
                    .expect("a cached content");
                cache.map.remove(&oldest);
                cache.bytes -= oldest.len();
            }
        }
        tokens.as_ref().clone()
    }

    /// Cached contents (tests).
    pub fn cached_contents(&self) -> usize {
        self.contents.lock().expect("content cache lock").map.len()
    }
}

enum State {
    Loading,
    Ready(Arc<Tokenizer>),
    Failed(Instant),
}

/// The tokenizers of every model, fetched on demand.
#[derive(Default)]
pub struct Vocabs {
    models: Mutex<HashMap<String, State>>,
    /// Wakes the requests waiting for a vocabulary whenever one finishes
    /// loading (or fails to).
    changed: tokio::sync::Notify,
}

impl Vocabs {
    /// `model`'s tokenizer when it is loaded. Otherwise starts fetching it
    /// from a worker, through `channel` (`None`: no worker serves it now),
    /// and returns `None`.
    pub fn get(
        self: &Arc<Self>,
        model: &str,
        channel: impl FnOnce() -> Option<Channel>,
    ) -> Option<Arc<Tokenizer>> {
        let mut models = self.models.lock().expect("vocabs lock");
        match models.get(model) {
            Some(State::Ready(t)) => return Some(t.clone()),
            Some(State::Loading) => return None,
            Some(State::Failed(at)) if at.elapsed() < RETRY => return None,
            _ => {}
        }
        let channel = channel()?;
        models.insert(model.to_string(), State::Loading);
        let this = self.clone();
        let model = model.to_string();
        tokio::spawn(async move {
            let started = Instant::now();
            let state = match fetch(channel, &model).await {
                Ok(t) => {
                    tracing::info!(model = %model, ms = started.elapsed().as_millis() as u64,
                        "vocabulary loaded: its tokenizer and chat template are at hand");
                    State::Ready(Arc::new(t))
                }
                Err(e) => {
                    tracing::warn!(model = %model, error = %e,
                        "cannot load the vocabulary; routing this model by load until a retry works");
                    State::Failed(Instant::now())
                }
            };
            this.models
                .lock()
                .expect("vocabs lock")
                .insert(model, state);
            this.changed.notify_waiters();
        });
        None
    }

    /// [`Vocabs::get`], and while `model`'s vocabulary is loading, waits
    /// for it up to `wait`.
    pub async fn get_waiting(
        self: &Arc<Self>,
        model: &str,
        channel: impl Fn() -> Option<Channel>,
        wait: Duration,
    ) -> Option<Arc<Tokenizer>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a load that ends between the
            // check and the wait still wakes this one.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(t) = self.get(model, &channel) {
                return Some(t);
            }
            let loading = matches!(
                self.models.lock().expect("vocabs lock").get(model),
                Some(State::Loading)
            );
            if !loading || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}

/// Fetches and loads `model`'s vocabulary from the worker at `channel`.
async fn fetch(channel: Channel, model: &str) -> Result<Tokenizer, String> {
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(4 << 20);
    let mut stream = client
        .vocabulary(VocabularyRequest {})
        .await
        .map_err(|s| format!("Vocabulary: {}", s.message()))?
        .into_inner();
    let mut bytes = Vec::new();
    let mut total = None;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| format!("Vocabulary: {}", s.message()))?
    {
        if chunk.model_name != model {
            return Err(format!(
                "the worker serves {:?}, not {model:?}",
                chunk.model_name
            ));
        }
        if chunk.total_bytes > MAX_VOCABULARY_BYTES {
            return Err(format!("vocabulary of {} bytes", chunk.total_bytes));
        }
        total = Some(chunk.total_bytes);
        bytes.extend_from_slice(&chunk.data);
    }
    if total != Some(bytes.len() as u64) {
        return Err(format!(
            "vocabulary ended after {} of {total:?} bytes",
            bytes.len()
        ));
    }
    let name = model.to_string();
    tokio::task::spawn_blocking(move || Tokenizer::from_gguf(&bytes, &name))
        .await
        .map_err(|e| e.to_string())?
}
