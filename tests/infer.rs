//! Integration: the Infer contract through a real coordinator to one real
//! worker running the real model.

use crate::common;

use std::time::{Duration, Instant};

use common::{collect, greedy, text, Cluster, PROMPT};
use nanoinfer_proto::nanoinfer::{FinishReason, InferRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_contract_request_ids_usage_and_length() {
    let cluster = Cluster::start(1, &[], &[]).await;
    let mut client = cluster.client().await;

    // Client-supplied request id, greedy, a prompt that does not end quickly.
    let req = InferRequest {
        request_id: "client-id-1".into(),
        ..greedy(PROMPT, 12)
    };
    let msgs = collect(&mut client, req).await.unwrap();
    let (last, tokens) = msgs.split_last().unwrap();
    assert!(!tokens.is_empty(), "at least one token streams");
    assert!(msgs.iter().all(|m| m.request_id == "client-id-1"));
    for (i, m) in tokens.iter().enumerate() {
        assert_eq!(m.index, i as u32);
        assert_eq!(m.finish_reason, FinishReason::Unspecified as i32);
        assert!(m.usage.is_none(), "only the final message carries usage");
    }
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    let usage = last.usage.unwrap();
    assert_eq!(
        usage.generated_tokens, 12,
        "max_tokens = 12 yields 12 tokens"
    );
    assert_eq!(usage.generated_tokens as usize, tokens.len());
    assert!(usage.prompt_tokens > 1);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.generated_tokens
    );
    assert!(!text(&msgs).trim().is_empty());

    // An empty request id gets a generated one, the same on every message.
    let msgs = collect(&mut client, greedy(PROMPT, 3)).await.unwrap();
    let id = &msgs[0].request_id;
    assert!(!id.is_empty());
    assert!(msgs.iter().all(|m| &m.request_id == id));
    let other = collect(&mut client, greedy(PROMPT, 1)).await.unwrap();
    assert_ne!(&other[0].request_id, id, "generated ids are unique");
}

/// The final message's `cached_prompt_tokens` is what the worker reused
/// from its KV cache: its own counter moves by exactly that much. A first
/// prompt finds nothing; the same prompt again finds all but the tokens the
/// worker must compute to sample from (the last one, and up to 3 more to
/// keep to whole row groups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_the_prompt_tokens_the_worker_reused() {
    let mut cluster = Cluster::start(1, &[], &[]).await;
    let mut client = cluster.client().await;
    let prompt = PROMPT.repeat(8);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let before = common::scrape(&mut cluster.workers[0]).await;
        let msgs = collect(&mut client, greedy(&prompt, 2)).await.unwrap();
        let after = common::scrape(&mut cluster.workers[0]).await;
        let usage = msgs.last().unwrap().usage.unwrap();
        let series = "nanoinfer_worker_prefix_cache_hit_tokens_total";
        let reused = after[series] - before[series];
        assert_eq!(f64::from(usage.cached_prompt_tokens), reused, "{usage:?}");
        assert!(
            usage.cached_prompt_tokens < usage.prompt_tokens,
            "{usage:?}"
        );
        seen.push((usage.cached_prompt_tokens, usage.prompt_tokens));
    }
    assert_eq!(seen[0].0, 0, "{seen:?}");
    assert!(
        seen[1].0 + 4 >= seen[1].1,
        "the repeat reused its prompt: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_text_and_stop_sequences_end_the_stream() {
    let cluster = Cluster::start(1, &[], &[]).await;
    let mut client = cluster.client().await;

    let sampled = |seed| InferRequest {
        prompt: PROMPT.into(),
        max_tokens: 16,
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: Some(seed),
        ..Default::default()
    };
    // A seed fixes the draws; the logits they are drawn from are the same
    // only when they are computed the same way. The first request computes
    // the whole prompt in one batch, later ones find all but its last token
    // in the prefix cache and compute that token alone, which rounds
    // differently (see docs/api.md, "Reproducibility"). So warm the cache first:
    // then both requests take the same path and must agree.
    collect(&mut client, sampled(7)).await.unwrap();
    let a = text(&collect(&mut client, sampled(42)).await.unwrap());
    let b = text(&collect(&mut client, sampled(42)).await.unwrap());
    assert_eq!(a, b, "same seed and parameters give the same text");
    let mut others = Vec::new();
    for seed in [1, 2, 3] {
        others.push(text(&collect(&mut client, sampled(seed)).await.unwrap()));
    }
    assert!(
        others.iter().any(|t| t != &a),
        "different seeds give different samples: {a:?} vs {others:?}"
    );

    // Greedy reference, then stop on a piece of it that spans tokens.
    let reference = collect(&mut client, greedy(PROMPT, 24)).await.unwrap();
    let full = text(&reference);
    let pieces: Vec<&str> = reference.iter().map(|m| m.token.as_str()).collect();
    // The stop text: the end of token 4 plus the start of token 5.
    let (left, right) = (pieces[4], pieces[5]);
    assert!(!left.is_empty() && !right.is_empty());
    let stop = format!(
        "{}{}",
        &left[left.len() - left.chars().last().unwrap().len_utf8()..],
        &right[..right.chars().next().unwrap().len_utf8()]
    );
    let cut = full.find(&stop).unwrap();
    let req = InferRequest {
        stop: vec![stop.clone(), "never-produced-stop-text".into()],
        ..greedy(PROMPT, 24)
    };
    let msgs = collect(&mut client, req).await.unwrap();
    let last = msgs.last().unwrap();
    assert_eq!(last.finish_reason, FinishReason::StopSequence as i32);
    let out = text(&msgs);
    assert_eq!(out, full[..cut], "output is the text before the stop");
    assert!(!out.contains(&stop), "the stop text is not emitted");
    let usage = last.usage.unwrap();
    assert_eq!(usage.generated_tokens as usize, msgs.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let cluster = Cluster::start(
        1,
        &["--ctx-size", "128"],
        &["--max-tokens-limit", "64", "--default-max-tokens", "16"],
    )
    .await;
    let mut client = cluster.client().await;
    let long_prompt = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let cases = [
        (greedy("", 4), "prompt"),
        (
            InferRequest {
                temperature: Some(-1.0),
                ..greedy("hi", 4)
            },
            "temperature",
        ),
        (
            InferRequest {
                temperature: Some(f32::NAN),
                ..greedy("hi", 4)
            },
            "temperature",
        ),
        (
            InferRequest {
                top_p: Some(0.0),
                ..greedy("hi", 4)
            },
            "top_p",
        ),
        (
            InferRequest {
                top_p: Some(1.5),
                ..greedy("hi", 4)
            },
            "top_p",
        ),
        (greedy("hi", 65), "max_tokens"),
        (greedy(&long_prompt, 4), "prompt"),
    ];
    for (req, field) in cases {
        let err = collect(&mut client, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        // "request <id>: <field>: …" when the id is known (the worker's
        // check of the prompt), "<field>: …" otherwise.
        let message = err.message();
        let named = message.starts_with(field)
            || (message.starts_with("request ") && message.contains(&format!(": {field}: ")));
        assert!(named, "message {message:?} names {field}");
        // The next good request succeeds.
        let ok = collect(&mut client, greedy(PROMPT, 2)).await.unwrap();
        assert_eq!(ok.last().unwrap().usage.unwrap().generated_tokens, 2);
    }
    // A prompt that nearly fills the 128-token window: generation stops at
    // the window's end (the repetitive prompt makes greedy decoding repeat
    // it rather than end).
    let near_full = "the quick brown fox jumps over the lazy dog ".repeat(11);
    let msgs = collect(&mut client, greedy(&near_full, 64)).await.unwrap();
    let last = msgs.last().unwrap();
    let usage = last.usage.unwrap();
    assert!(usage.prompt_tokens > 64, "{usage:?}");
    assert_eq!(
        last.finish_reason,
        FinishReason::ContextLength as i32,
        "{usage:?}"
    );
    assert_eq!(usage.total_tokens, 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_worker() {
    // One slot: the next request can only run once the abandoned one left it.
    let cluster = Cluster::start(1, &["--parallel", "1"], &[]).await;
    let mut client = cluster.client().await;

    // A long greedy generation (~2000 tokens would take about a minute).
    let req = InferRequest {
        request_id: "abandoned".into(),
        ..greedy(PROMPT, 2000)
    };
    let mut stream = client.infer(req).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    drop(stream);

    // The next request is served without waiting for the abandoned one.
    let started = Instant::now();
    let msgs = collect(&mut client, greedy(PROMPT, 4)).await.unwrap();
    assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 4);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the worker was still busy with the abandoned request ({:?})",
        started.elapsed()
    );
    let worker = &cluster.workers[0];
    assert!(
        worker
            .log()
            .lines()
            .any(|l| l.contains("client left") && l.contains("abandoned")),
        "worker logged the stop:\n{}",
        worker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted() {
    // The worker: one slot and a queue of one. The coordinator: an
    // admission queue of one, held at most 3 s.
    let mut cluster = Cluster::start(
        1,
        &["--queue", "1", "--parallel", "1"],
        &["--admission-queue", "1", "--admission-timeout", "3"],
    )
    .await;
    let mut client = cluster.client().await;
    let metrics = cluster.coordinator.metrics_addr().await;

    // One request running...
    let mut running = client
        .infer(greedy(PROMPT, 2000))
        .await
        .unwrap()
        .into_inner();
    running.message().await.unwrap().unwrap();
    // ...one waiting in the worker's queue of 1...
    let queued = client.infer(greedy(PROMPT, 4)).await.unwrap().into_inner();
    // ...one waiting in the coordinator's admission queue of 1...
    let mut c = client.clone();
    let admitted_late = tokio::spawn(async move { collect(&mut c, greedy(PROMPT, 4)).await });
    common::eventually(
        Duration::from_secs(10),
        "a request in the admission queue",
        || {
            let metrics = metrics.clone();
            async move {
                let (_, body) = common::http_get(&metrics, "/metrics").await;
                common::parse_metrics(&body).get("nanoinfer_coordinator_admission_queue_waiting")
                    == Some(&1.0)
            }
        },
    )
    .await;
    // ...so the next one is refused at once...
    let err = collect(&mut client, greedy(PROMPT, 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("requests already wait"), "{err:?}");
    assert_eq!(
        err.metadata()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1"),
        "{err:?}"
    );
    // ...and the one that waited is refused when its 3 s are up.
    let err = admitted_late.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("no worker had room within 3 s"),
        "{err:?}"
    );
    drop(running);
    drop(queued);
    // Capacity comes back once they are gone.
    common::eventually(Duration::from_secs(20), "the queue to drain", || {
        let mut c = client.clone();
        async move { collect(&mut c, greedy(PROMPT, 1)).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_constrains_every_sequence() {
    let cluster = Cluster::start(1, &[], &[]).await;
    let mut client = cluster.client().await;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": false
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2}
        },
        "required": ["name", "role", "address", "tags"],
        "additionalProperties": false
    });
    // Sampled, three sequences: each advances its own copy of the
    // constraint; every one that ends by end-of-generation validates.
    let req = InferRequest {
        prompt: "A user of the site, as JSON:".into(),
        max_tokens: 200,
        temperature: Some(1.0),
        seed: Some(11),
        n: 3,
        json_schema: schema.to_string(),
        ..Default::default()
    };
    let msgs = collect(&mut client, req).await.unwrap();
    let mut texts = [String::new(), String::new(), String::new()];
    let mut ended = 0;
    for m in &msgs {
        texts[m.choice as usize].push_str(&m.token);
        if m.finish_reason == FinishReason::Eos as i32 {
            ended += 1;
        }
    }
    assert!(ended >= 1, "no sequence ended by EOS: {texts:?}");
    for (i, t) in texts.iter().enumerate() {
        let finished = msgs
            .iter()
            .find(|m| m.choice as usize == i && m.finish_reason != 0)
            .map(|m| m.finish_reason);
        if finished != Some(FinishReason::Eos as i32) {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(t).unwrap_or_else(|e| panic!("sequence {i}: {e}: {t}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{t}");
        assert!(
            ["admin", "editor", "viewer"].contains(&o["role"].as_str().unwrap()),
            "{t}"
        );
        assert!(o["name"].as_str().unwrap().chars().count() <= 20, "{t}");
        assert!(o["address"]["city"].is_string(), "{t}");
        assert!(o["tags"].as_array().unwrap().len() <= 2, "{t}");
    }
    // json_object's schema: greedy, any object.
    let req = InferRequest {
        json_schema: r#"{"type":"object"}"#.into(),
        ..greedy("The capital of France, as JSON:", 100)
    };
    let msgs = collect(&mut client, req).await.unwrap();
    let out = text(&msgs);
    if msgs.last().unwrap().finish_reason == FinishReason::Eos as i32 {
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v.is_object(), "{out}");
    } else {
        assert!(out.starts_with('{'), "{out}");
    }
    // Refused: not JSON, a keyword the engine cannot enforce (named), an
    // array; each names json_schema.
    for (schema, says) in [
        ("{not json", "not JSON"),
        (r#"{"type":"array","uniqueItems":true}"#, "uniqueItems"),
        ("[1]", "JSON Schema"),
    ] {
        let req = InferRequest {
            json_schema: schema.into(),
            ..greedy("hi", 4)
        };
        let err = collect(&mut client, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{schema}: {err:?}");
        assert!(err.message().contains("json_schema"), "{err:?}");
        assert!(err.message().contains(says), "{schema}: {err:?}");
    }
}
