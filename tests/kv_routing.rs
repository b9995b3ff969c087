//! Cache-aware routing on real workers: the coordinator's token ids are the
//! worker's (tokenizer parity through the vocabulary a worker serves), the
//! KV index built from a worker's events is what the worker holds after a
//! workload with eviction, and two coordinators send one tenant's requests
//! to the worker holding its prefix.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{chat_model_path, start_coordinator, start_worker, start_worker_with, Etcd};
use nanoinfer_coordinator::kv_index::KvIndex;
use nanoinfer_coordinator::vocab::Tokenizer;
use nanoinfer_proto::kv::block_hashes;
use nanoinfer_proto::worker::worker_service_client::WorkerServiceClient;
use nanoinfer_proto::worker::{
    ChatMessage, GenerateRequest, KvEventsRequest, TokenizeRequest, VocabularyRequest,
};
use tonic::transport::Channel;

async fn worker_client(proc: &mut common::Proc) -> WorkerServiceClient<Channel> {
    let addr = proc.listen_addr().await;
    WorkerServiceClient::new(
        nanoinfer::connect(&addr)
            .await
            .expect("connect to the worker"),
    )
    .max_decoding_message_size(8 << 20)
}

/// The vocabulary a worker serves, loaded as the coordinator loads it.
async fn tokenizer_of(client: &mut WorkerServiceClient<Channel>, model: &str) -> Tokenizer {
    let mut stream = client
        .vocabulary(VocabularyRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut total = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(chunk.data.len() <= 1 << 20);
        total = chunk.total_bytes;
        bytes.extend(chunk.data);
    }
    assert_eq!(bytes.len() as u64, total);
    Tokenizer::from_gguf(&bytes, model).unwrap()
}

async fn worker_tokens(
    client: &mut WorkerServiceClient<Channel>,
    text: Option<&str>,
    messages: &[(String, String)],
) -> Vec<i32> {
    client
        .tokenize(TokenizeRequest {
            text: text.unwrap_or_default().to_string(),
            messages: messages
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: role.clone(),
                    content: content.clone(),
                })
                .collect(),
            add_special: true,
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_token_ids_are_the_workers() {
    let etcd = Etcd::start().await;
    let mut worker = start_worker_with(&etcd, "w1", &chat_model_path(), &[]).await;
    let mut client = worker_client(&mut worker).await;
    let tokenizer = tokenizer_of(&mut client, "smollm2").await;
    let long = "You are the support assistant of a garden-tool shop. ".repeat(20);
    let texts = [
        "The history of the Roman Empire begins with",
        "Grüße aus Köln — 東京タワー, naïve café, emoji 🦀🚀 and Ελληνικά",
        "special-token text stays text: <|im_start|>user\nhi<|im_end|>",
        " leading space,\ttabs\n\nand blank lines ",
        long.as_str(),
    ];
    for text in texts {
        assert_eq!(
            tokenizer.prompt(text),
            worker_tokens(&mut client, Some(text), &[]).await,
            "plain prompt {text:?}"
        );
    }
    let conversations: Vec<Vec<(String, String)>> = vec![
        vec![("user".into(), "What is the capital of France?".into())],
        vec![
            ("system".into(), long.clone()),
            ("user".into(), "Do you sell rakes? 🦀 <|im_end|>".into()),
            ("assistant".into(), "Yes, three kinds.".into()),
            ("user".into(), "Grüße! Which is the lightest?".into()),
        ],
    ];
    for messages in &conversations {
        // Twice: the second time the long content comes from the cache.
        for _ in 0..2 {
            assert_eq!(
                tokenizer.chat(messages).unwrap(),
                worker_tokens(&mut client, None, messages).await,
                "conversation {messages:?}"
            );
        }
    }
    assert_eq!(
        tokenizer.cached_contents(),
        1,
        "the long system prompt is cached"
    );

    // Gemma's SentencePiece vocabulary (a base model: plain prompts only).
    let mut gemma = start_worker(&etcd, "w2", &[]).await;
    let mut client = worker_client(&mut gemma).await;
    let tokenizer = tokenizer_of(&mut client, "gemma").await;
    for text in texts {
        assert_eq!(
            tokenizer.prompt(text),
            worker_tokens(&mut client, Some(text), &[]).await,
            "gemma, plain prompt {text:?}"
        );
    }
}

/// Subscribes to a worker's `KvEvents` and applies its first `batches` batches.
async fn follow(
    client: &mut WorkerServiceClient<Channel>,
    index: &KvIndex,
    batches: usize,
) -> tonic::Streaming<nanoinfer_proto::worker::KvEventBatch> {
    let mut stream = client
        .kv_events(KvEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    for _ in 0..batches {
        let batch = stream.message().await.unwrap().unwrap();
        index.apply("w1", &batch).unwrap();
    }
    stream
}

async fn generate(client: &mut WorkerServiceClient<Channel>, prompt: &str, max_tokens: u32) -> u32 {
    let mut stream = client
        .generate(GenerateRequest {
            request_id: format!("kv-{}", prompt.len()),
            prompt: prompt.to_string(),
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut cached = 0;
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(f) = m.finished {
            cached = f.cached_tokens;
        }
    }
    cached
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_follows_the_workers_cache_through_eviction() {
    let etcd = Etcd::start().await;
    // Two slots and room for about one finished prompt: later prompts
    // evict earlier ones.
    let mut worker = start_worker(
        &etcd,
        "w1",
        &["--parallel", "2", "--prefix-cache-tokens", "96"],
    )
    .await;
    let mut client = worker_client(&mut worker).await;
    let index = KvIndex::new(100_000);
    // The snapshot of a fresh worker: nothing held.
    let mut stream = follow(&mut client, &index, 1).await;
    assert_eq!(index.blocks("w1"), Some(vec![]));

    let prompts: Vec<String> = (0..4)
        .map(|i| {
            format!(
                "Tenant {i} system prompt. {}",
                "Rules of the house apply here. ".repeat(6)
            )
        })
        .collect();
    let mut generator = client.clone();
    let workload = tokio::spawn(async move {
        let mut cached = Vec::new();
        for p in prompts.iter().chain(prompts.iter().take(2)) {
            cached.push(generate(&mut generator, p, 4).await);
        }
        (prompts, cached)
    });
    // Apply events while the workload runs; the stream is live.
    let mut applied = 0;
    let (prompts, cached) = loop {
        tokio::select! {
            batch = stream.message() => {
                index.apply("w1", &batch.unwrap().unwrap()).unwrap();
                applied += 1;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if workload.is_finished() {
                    break workload.await.unwrap();
                }
            }
        }
    };
    // Drain what is left, then compare with a fresh snapshot.
    while let Ok(Some(Ok(batch))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .map(|m| m.transpose())
    {
        index.apply("w1", &batch).unwrap();
        applied += 1;
    }
    assert!(applied >= 6, "events for every request: {applied}");
    let fresh = KvIndex::new(100_000);
    follow(&mut client, &fresh, 1).await;
    assert_eq!(
        index.blocks("w1"),
        fresh.blocks("w1"),
        "the live index is the snapshot"
    );

    // What it holds: the last prompt's blocks (its cells are kept), not the
    // evicted first tenants'; and each held block is a prefix of some
    // prompt the worker ran.
    let held: HashSet<u64> = index.blocks("w1").unwrap().into_iter().collect();
    let tokens_of = |i: usize| {
        let mut c = client.clone();
        let p = prompts[i].clone();
        async move { worker_tokens(&mut c, Some(&p), &[]).await }
    };
    let last = block_hashes(&tokens_of(1).await);
    assert!(!last.is_empty());
    assert!(
        last.iter().all(|h| held.contains(h)),
        "the last prompt is held"
    );
    let third = block_hashes(&tokens_of(2).await);
    assert!(
        third.iter().all(|h| !held.contains(h)),
        "tenant 2 was evicted"
    );
    // The repeats of tenants 0 and 1 came after they were evicted: the
    // worker computed them again (at most a few tokens of "Tenant " are
    // shared with the other tenants: no whole block).
    assert!(cached[4..].iter().all(|&c| c < 16), "{cached:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_send_a_tenant_to_the_worker_holding_its_prefix() {
    let etcd = Etcd::start().await;
    let mut workers = Vec::new();
    for id in ["w1", "w2"] {
        workers.push(start_worker(&etcd, id, &["--parallel", "2"]).await);
    }
    let mut results = Vec::new();
    for routing in ["cache-aware", "prefix-affinity"] {
        let mut coordinators = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let (c, addr) = start_coordinator(&etcd, &["--routing", routing]).await;
            common::wait_routable(&addr, 2).await;
            coordinators.push(c);
            addrs.push(addr);
        }
        if routing == "cache-aware" {
            // The first request for the model fetches its vocabulary;
            // routing by cache starts once it is loaded and the workers'
            // snapshots arrived.
            for (c, addr) in coordinators.iter_mut().zip(&addrs) {
                let mut client = common::client(addr).await;
                common::collect(&mut client, common::greedy("warm up", 1))
                    .await
                    .unwrap();
                c.wait_for_line("vocabulary loaded", Duration::from_secs(30))
                    .await;
            }
        }
        // Four tenants, each a long system prompt; their requests
        // alternate between the coordinators.
        let mut hits = 0;
        let mut total = 0;
        for round in 0..3 {
            for tenant in 0..4 {
                let prompt = format!(
                    "[{routing}] Tenant {tenant}: {} Question {round}:",
                    "You answer questions about invoices, refunds and shipping. ".repeat(8)
                );
                let addr = &addrs[(round + tenant) % 2];
                let mut client = common::client(addr).await;
                let msgs = common::collect(&mut client, common::greedy(&prompt, 2))
                    .await
                    .unwrap();
                let usage = msgs.last().unwrap().usage.unwrap();
                if round > 0 {
                    total += 1;
                    // The prefix (all but the question) was reused.
                    if usage.cached_prompt_tokens + 24 >= usage.prompt_tokens {
                        hits += 1;
                    }
                }
            }
        }
        println!("{routing}: {hits}/{total} repeat requests found their prefix");
        results.push((routing, hits, total));
    }
    let (_, hits, total) = results[0];
    assert_eq!(
        hits, total,
        "cache-aware: every repeat on its prefix's worker: {results:?}"
    );
}
