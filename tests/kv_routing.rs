//! Cache-aware routing on real workers: the coordinator's token ids are the
//! worker's (tokenizer parity through the vocabulary a worker serves), the
//! KV index built from a worker's events is what the worker holds after a
//! workload with eviction, two coordinators send one tenant's requests to
//! the worker holding its prefix (and to the worker still computing it,
//! which the other coordinator sent there), a late coordinator is exact, a
//! restarted worker loses its tenants, and the event stream follows rotated
//! cluster certificates.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    chat_model_path, model_path, start_coordinator, start_worker, start_worker_with,
    start_workers_with, Etcd,
};
use nanoinfer_coordinator::kv_index::KvIndex;
use nanoinfer_coordinator::vocab::Tokenizer;
use nanoinfer_proto::kv::block_hashes;
use nanoinfer_proto::worker::worker_service_client::WorkerServiceClient;
use nanoinfer_proto::worker::{
    kv_event, ChatMessage, GenerateRequest, KvEventsRequest, KvTier, TokenizeRequest,
    VocabularyRequest,
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
                    ..Default::default()
                })
                .collect(),
            add_special: true,
            tools: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
}

/// Tool prompts too: a worker whose chat template has a tool section
/// (`--chat-template-file`, served in its vocabulary) renders the tools, an
/// assistant's calls and a tool's result to the ids the coordinator
/// computes from the same vocabulary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_prompts_have_the_same_token_ids_in_coordinator_and_worker() {
    let etcd = Etcd::start().await;
    let mut worker = common::start_hermes_style_worker(&etcd, "w1", &[]).await;
    let mut client = worker_client(&mut worker).await;
    let tokenizer = tokenizer_of(&mut client, "smollm2").await;
    assert_eq!(tokenizer.tool_format(), nanoinfer_vocab::ToolFormat::Hermes);
    let tools = serde_json::json!([{"type": "function", "function": {
        "name": "get_weather", "description": "The weather <now> in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let call = nanoinfer_vocab::ToolCall {
        id: "call_1".into(),
        name: "get_weather".into(),
        arguments: r#"{"city": "Grüße <|im_end|>"}"#.into(),
    };
    let messages = vec![
        nanoinfer_vocab::ChatMessage::new("system", "Be brief."),
        nanoinfer_vocab::ChatMessage::new("user", "Weather in Paris? <|im_start|>"),
        nanoinfer_vocab::ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![call.clone()],
            ..Default::default()
        },
        nanoinfer_vocab::ChatMessage {
            role: "tool".into(),
            content: "18 C".into(),
            tool_call_id: "call_1".into(),
            ..Default::default()
        },
    ];
    let wire: Vec<ChatMessage> = messages.iter().map(ChatMessage::from).collect();
    let worker_ids = client
        .tokenize(TokenizeRequest {
            messages: wire,
            tools: tools.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let ids = tokenizer.chat(&messages, Some(&tools)).unwrap();
    assert_eq!(ids, worker_ids);
    let plain = tokenizer.chat(&messages[..2], None).unwrap();
    assert!(ids.len() > plain.len() + 50, "the tools are rendered");
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
                tokenizer
                    .chat(
                        &messages
                            .iter()
                            .map(|(r, c)| nanoinfer_vocab::ChatMessage::new(r, c))
                            .collect::<Vec<_>>(),
                        None
                    )
                    .unwrap(),
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
    // Every prompt was prefilled: nothing is left computing.
    assert_eq!(index.computing("w1"), Some(0));
    assert_eq!(fresh.computing("w1"), Some(0));

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
    // Evicted from the KV cache into the worker's RAM tier (on by
    // default), in the live index and the snapshot alike: restorable, not
    // held.
    for i in 0..prompts.len() {
        let blocks = block_hashes(&tokens_of(i).await);
        let live = index.matched_with("w1", &blocks, |_| false);
        assert_eq!(
            live,
            fresh.matched_with("w1", &blocks, |_| false),
            "tenant {i}"
        );
        assert_eq!(live.unwrap().2, blocks.len(), "tenant {i} is in RAM");
    }
    assert_eq!(
        index.matched_with("w1", &third, |_| false),
        Some((0, 0, third.len()))
    );
    // The repeats of tenants 0 and 1 came after they were evicted: the
    // worker restored their prompts from RAM (all but the last row group;
    // at most a few tokens of "Tenant " are shared with the other tenants,
    // no whole block, so the KV cache alone would have given less than 16).
    for (i, &c) in cached[4..].iter().enumerate() {
        let len = tokens_of(i).await.len() as u32;
        assert!(c >= 16 && c + 4 >= len, "{cached:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_send_a_tenant_to_the_worker_holding_its_prefix() {
    let etcd = Etcd::start().await;
    let _workers = start_workers_with(&etcd, &["w1", "w2"], &model_path(), |_| {
        vec!["--parallel", "2"]
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_prefix_went_to_ram_is_sent_back_to_that_worker() {
    let etcd = Etcd::start().await;
    // No prefix kept in the KV cache: every finished prompt goes to the
    // worker's RAM tier at once, so only the `ram` tier tells the
    // coordinator where a tenant's prefix is.
    let args = ["--parallel", "1", "--prefix-cache-tokens", "0"];
    let workers = start_workers_with(&etcd, &["w1", "w2"], &model_path(), |_| args.to_vec()).await;
    let (mut coordinator, addr) = start_coordinator(&etcd, &["--routing", "cache-aware"]).await;
    common::wait_routable(&addr, 2).await;
    cached_via(&addr, "warm up").await;
    coordinator
        .wait_for_line("vocabulary loaded", Duration::from_secs(30))
        .await;
    let prompt = |tenant: usize, round: usize| {
        format!(
            "Tenant {tenant}: {} Question {round}:",
            "You answer questions about invoices, refunds and shipping. ".repeat(8)
        )
    };
    for tenant in 0..4 {
        let (cached, _) = cached_via(&addr, &prompt(tenant, 0)).await;
        assert!(cached < 16, "tenant {tenant}'s first request is cold");
    }
    // The coordinator breaks ties in turn (sorted workers, a counter): one
    // request more puts the repeats out of step with the first round, so
    // that without the ram tier every repeat would go to the other worker.
    cached_via(&addr, "out of step").await;
    // Each repeat goes where the tenant's prefix sits in RAM and is
    // restored there, all but the question.
    for round in 1..3 {
        for tenant in 0..4 {
            let (cached, prompt_tokens) = cached_via(&addr, &prompt(tenant, round)).await;
            assert!(
                cached + 24 >= prompt_tokens,
                "tenant {tenant}, round {round}: {cached} of {prompt_tokens} prompt tokens reused"
            );
        }
    }
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_in_prefill_draws_the_other_coordinators_request() {
    let etcd = Etcd::start().await;
    let mut workers = start_workers_with(&etcd, &["w1", "w2"], &model_path(), |_| {
        vec!["--parallel", "2"]
    })
    .await;
    // Each worker's event stream, watched for prompts entering the
    // computing tier.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    for w in &mut workers {
        let mut stream = worker_client(w)
            .await
            .kv_events(KvEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        let tx = seen_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = stream.message().await {
                let computing = batch.events.iter().any(|e| {
                    e.tier == KvTier::Computing as i32
                        && matches!(&e.kind, Some(kv_event::Kind::Stored(b)) if !b.block_hashes.is_empty())
                });
                if computing && !batch.snapshot {
                    let _ = tx.send(());
                }
            }
        });
    }
    let mut addrs = Vec::new();
    let mut coordinators = Vec::new();
    for _ in 0..2 {
        let (mut c, addr) = start_coordinator(&etcd, &["--routing", "cache-aware"]).await;
        common::wait_routable(&addr, 2).await;
        cached_via(&addr, "warm up").await;
        c.wait_for_line("vocabulary loaded", Duration::from_secs(30))
            .await;
        coordinators.push(c);
        addrs.push(addr);
    }
    // The coordinators break ties in turn (sorted workers, a counter): one
    // request more through the second one puts them out of step, so
    // without the computing tier the second would pick the other worker.
    cached_via(&addrs[1], "out of step").await;
    // A long prompt, so its prefill lasts well past the moment the worker
    // announces it (about 3 s here).
    for tenant in 0..4 {
        while seen.try_recv().is_ok() {}
        let prefix = format!(
            "Tenant {tenant}: {}",
            "You answer questions about invoices, refunds and shipping. ".repeat(60)
        );
        let first_addr = addrs[0].clone();
        let first_prompt = format!("{prefix} Question 0:");
        let first = tokio::spawn(async move { cached_via(&first_addr, &first_prompt).await });
        // Once the worker says it is computing the prompt (and the other
        // coordinator has had a moment to apply that), the tenant's next
        // request goes through the other coordinator, which never saw the
        // first: it must join the prefill, not start a second copy.
        tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .expect("a computing-tier event")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (cached, prompt_tokens) = cached_via(&addrs[1], &format!("{prefix} Question 1:")).await;
        let (first_cached, _) = first.await.unwrap();
        assert!(
            first_cached < 16,
            "tenant {tenant}: the first request is cold ({first_cached} reused)"
        );
        assert!(
            cached + 24 >= prompt_tokens,
            "tenant {tenant}: the second request reused {cached} of {prompt_tokens} tokens"
        );
    }
}

/// Cache-aware picks of a coordinator by reason (cache, load, no_index).
async fn picks(coordinator: &mut common::Proc) -> (f64, f64, f64) {
    let m = common::scrape(coordinator).await;
    let get = |reason: &str| {
        m.get(&format!(
            "nanoinfer_coordinator_cache_aware_picks_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    (get("cache"), get("load"), get("no_index"))
}

/// Reused prompt tokens of one request of `prompt` through `addr`.
async fn cached_via(addr: &str, prompt: &str) -> (u32, u32) {
    let mut client = common::client(addr).await;
    let msgs = common::collect(&mut client, common::greedy(prompt, 2))
        .await
        .unwrap();
    let usage = msgs.last().unwrap().usage.unwrap();
    (usage.cached_prompt_tokens, usage.prompt_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_coordinator_is_exact_and_a_restarted_worker_loses_its_tenants() {
    let etcd = Etcd::start().await;
    // Fixed ports: a restarted worker comes back at the same address, so
    // the coordinators keep its entry and learn of the restart from its
    // event stream alone.
    let ports = [common::free_port(), common::free_port()];
    let args = |port: u16| {
        vec![
            "--parallel".to_string(),
            "2".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ]
    };
    let each: Vec<Vec<String>> = ports.iter().map(|port| args(*port)).collect();
    let mut workers = start_workers_with(&etcd, &["w1", "w2"], &model_path(), |i| {
        each[i].iter().map(String::as_str).collect()
    })
    .await;
    let (mut first, first_addr) = start_coordinator(&etcd, &["--routing", "cache-aware"]).await;
    common::wait_routable(&first_addr, 2).await;
    cached_via(&first_addr, "warm up").await;
    first
        .wait_for_line("vocabulary loaded", Duration::from_secs(30))
        .await;
    let tenant = format!(
        "Tenant 7: {}",
        "You answer questions about invoices, refunds and shipping. ".repeat(8)
    );
    let (_, prompt_tokens) = cached_via(&first_addr, &format!("{tenant} Question 0:")).await;
    let (cached, _) = cached_via(&first_addr, &format!("{tenant} Question 1:")).await;
    assert!(cached + 24 >= prompt_tokens, "{cached} of {prompt_tokens}");

    // A coordinator started now, while the workers hold the prefix, routes
    // to it from its first request on (after its vocabulary loads).
    let (mut late, late_addr) = start_coordinator(&etcd, &["--routing", "cache-aware"]).await;
    common::wait_routable(&late_addr, 2).await;
    cached_via(&late_addr, "warm up").await;
    late.wait_for_line("vocabulary loaded", Duration::from_secs(30))
        .await;
    let before = picks(&mut late).await;
    let (cached, prompt_tokens) = cached_via(&late_addr, &format!("{tenant} Question 2:")).await;
    assert!(
        cached + 24 >= prompt_tokens,
        "late coordinator: {cached} of {prompt_tokens}"
    );
    assert_eq!(
        picks(&mut late).await.0,
        before.0 + 1.0,
        "picked for its cache"
    );

    // The worker holding the tenant restarts (same id, same address).
    let mut holder = None;
    for (i, w) in workers.iter_mut().enumerate() {
        let hits = common::scrape(w).await["nanoinfer_worker_prefix_cache_hit_tokens_total"];
        if hits >= 64.0 {
            holder = Some(i);
        }
    }
    let holder = holder.expect("one worker served the repeats");
    let id = ["w1", "w2"][holder];
    workers[holder].kill();
    workers[holder].wait_exit(Duration::from_secs(10)).await;
    let a = args(ports[holder]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    workers[holder] = start_worker(&etcd, id, &a).await;
    common::wait_routable(&first_addr, 2).await;
    // At once, before or after the coordinator's resync: the old tenant's
    // next request is not picked by the cache the restart cleared (and
    // nothing of it is held anywhere). One request only: it warms a worker
    // again.
    let before = picks(&mut first).await;
    let (cached, _) = cached_via(&first_addr, &format!("{tenant} Question 3:")).await;
    let after = picks(&mut first).await;
    assert_eq!(after.0, before.0, "no pick by a cache the restart cleared");
    assert!(cached < 16, "nothing of the tenant was held: {cached}");
    // Both coordinators resync with the restarted worker: a resync is
    // counted and its index is synced again (blocks >= 0).
    for c in [&mut first, &mut late] {
        let addr = c.metrics_addr().await;
        common::eventually(Duration::from_secs(20), "the coordinator to resync", || {
            let addr = addr.clone();
            async move {
                let (_, body) = common::http_get(&addr, "/metrics").await;
                let m = common::parse_metrics(&body);
                let get = |name: &str, default: f64| {
                    m.get(&format!("{name}{{worker=\"{id}\"}}"))
                        .copied()
                        .unwrap_or(default)
                };
                get("nanoinfer_coordinator_kv_resyncs_total", 0.0) >= 1.0
                    && get("nanoinfer_coordinator_kv_index_blocks", -1.0) >= 0.0
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_follows_rotated_cluster_certificates() {
    let dir = common::temp_dir("kv-tls");
    let certs = common::gen_certs(&dir.join("certs"), &["w1"]);
    let path = |name: &str| certs.join(name).to_str().unwrap().to_string();
    let cluster = |who: &str| {
        vec![
            "--cluster-ca".to_string(),
            path("ca.pem"),
            "--cluster-cert".to_string(),
            path(&format!("{who}.pem")),
            "--cluster-key".to_string(),
            path(&format!("{who}.key")),
        ]
    };
    let etcd = Etcd::start().await;
    let args = cluster("worker-w1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _worker = start_worker(&etcd, "w1", &args).await;
    let args = cluster("coordinator");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--routing", "cache-aware"]);
    let (mut coordinator, addr) = start_coordinator(&etcd, &args).await;
    common::wait_routable(&addr, 1).await;
    let metrics = coordinator.metrics_addr().await;
    let snapshots = || {
        let metrics = metrics.clone();
        async move {
            let (_, body) = common::http_get(&metrics, "/metrics").await;
            let m = common::parse_metrics(&body);
            let synced = m
                .get("nanoinfer_coordinator_kv_index_blocks{worker=\"w1\"}")
                .is_some_and(|&b| b >= 0.0);
            (
                m.get("nanoinfer_coordinator_kv_snapshots_total")
                    .copied()
                    .unwrap_or(0.0),
                synced,
            )
        }
    };
    common::eventually(Duration::from_secs(20), "the first snapshot", || async {
        snapshots().await == (1.0, true)
    })
    .await;
    // The coordinator's cluster files are rewritten (as a renewal would):
    // its worker connections are rebuilt, and the event stream moves to
    // the new connection (a new subscription: a second snapshot).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for name in ["coordinator.pem", "coordinator.key"] {
        let bytes = std::fs::read(path(name)).unwrap();
        std::fs::write(path(name), bytes).unwrap();
    }
    coordinator
        .wait_for_line("worker connections rebuilt", Duration::from_secs(10))
        .await;
    common::eventually(
        Duration::from_secs(20),
        "a snapshot over the new connection",
        || async {
            let (n, synced) = snapshots().await;
            n >= 2.0 && synced
        },
    )
    .await;
    // And routing by cache still works over it.
    let prompt = format!("Tenant 9: {}", "Refunds take five days. ".repeat(12));
    cached_via(&addr, &format!("{prompt} Question 1:")).await;
    let (cached, prompt_tokens) = cached_via(&addr, &format!("{prompt} Question 2:")).await;
    assert!(cached + 24 >= prompt_tokens, "{cached} of {prompt_tokens}");
}
