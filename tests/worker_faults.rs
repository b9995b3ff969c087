//! Integration: a real worker under faults, driven directly over
//! `nanoinfer.worker.v1` (no coordinator): mid-stream resume (with and
//! without draft-free speculation, and with a draft model; a draft with
//! another vocabulary refused at start), deadlines and
//! dead requests in the queue, the queue timeout, an engine that dies, a
//! drain with a slow reader, and a worker started while etcd is down.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, eventually, free_port, http_get, model_path, parse_metrics, Etcd, Proc, PROMPT};
use nanoinfer_proto::worker::worker_service_client::WorkerServiceClient;
use nanoinfer_proto::worker::{FinishReason, GenerateRequest, GenerateResponse};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Starts a worker (one thread, small context) without waiting for it.
fn spawn_worker(etcd: &str, id: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(bin("nanoinfer-worker"));
    cmd.arg("--model")
        .arg(model_path())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--threads", "1", "--ctx-size", "512"])
        .args(["--id", id, "--etcd-endpoints", etcd])
        .args(extra);
    if !extra.contains(&"--lease-ttl") {
        cmd.args(["--lease-ttl", "3"]);
    }
    // Fault injection goes to the child only; this process's env is never
    // touched.
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(id, &mut cmd)
}

/// A registered worker and a client connected to it.
async fn worker(
    etcd: &Etcd,
    id: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, WorkerServiceClient<Channel>) {
    let mut proc = spawn_worker(&etcd.endpoint, id, extra, env);
    proc.wait_for_line("worker ready", Duration::from_secs(60))
        .await;
    let addr = proc.listen_addr().await;
    let client = WorkerServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the worker");
    (proc, client)
}

/// A greedy request.
fn greedy(id: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt: prompt.into(),
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        ..Default::default()
    }
}

/// Every message of a call, and the error that ended it, if any.
async fn run(
    client: &mut WorkerServiceClient<Channel>,
    req: impl tonic::IntoRequest<GenerateRequest>,
) -> (Vec<GenerateResponse>, Option<Status>) {
    let mut stream = match client.generate(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut out = Vec::new();
    loop {
        match stream.message().await {
            // The `admitted` message comes first, once, without a token.
            Ok(Some(m)) if m.admitted => {
                assert!(out.is_empty(), "admitted after a token: {m:?}");
                assert!(m.token_id.is_none() && m.finished.is_none(), "{m:?}");
            }
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(status) => return (out, Some(status)),
        }
    }
}

/// A metric's value (0 when absent) from the `/metrics` at `addr`.
async fn metric(addr: &str, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    parse_metrics(&body).get(name).copied().unwrap_or(0.0)
}

/// The text of the messages.
fn text(msgs: &[GenerateResponse]) -> String {
    msgs.iter().map(|m| m.text.as_str()).collect()
}

/// Token ids of the token messages.
fn ids(msgs: &[GenerateResponse]) -> Vec<i32> {
    msgs.iter().filter_map(|m| m.token_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_continues_where_the_first_worker_stopped() {
    let etcd = Etcd::start().await;
    let (_w, mut client) = worker(&etcd, "resume", &["--parallel", "1"], &[]).await;
    const N: u32 = 16;
    let (whole, err) = run(&mut client, greedy("whole", PROMPT, N)).await;
    assert!(err.is_none(), "{err:?}");
    let whole_ids = ids(&whole);
    let done = whole.last().unwrap().finished.unwrap();
    assert_eq!((whole_ids.len() as u32, done.generated_tokens), (N, N));
    let whole_text = text(&whole);

    let mut same_text = 0;
    let mut same_first = 0;
    let cuts = [1usize, 4, 8, 12];
    for k in cuts {
        let req = GenerateRequest {
            resume_token_ids: whole_ids[..k].to_vec(),
            ..greedy(&format!("resume-{k}"), PROMPT, N)
        };
        let (msgs, err) = run(&mut client, req).await;
        assert!(err.is_none(), "resume at {k}: {err:?}");
        let (tokens, last) = msgs.split_at(msgs.len() - 1);
        // Indexes continue at K, contiguous; usage counts the prompt alone
        // as prompt tokens, and every generated token.
        let indexes: Vec<u32> = tokens.iter().map(|m| m.index).collect();
        assert_eq!(indexes, (k as u32..N).collect::<Vec<_>>(), "resume at {k}");
        let fin = last[0].finished.unwrap();
        assert_eq!(fin.prompt_tokens, done.prompt_tokens, "resume at {k}");
        assert_eq!(fin.generated_tokens, N, "resume at {k}");
        let resumed_ids = ids(tokens);
        same_first += usize::from(resumed_ids[0] == whole_ids[k]);
        // The text the first worker sent for the first K tokens, then ours.
        let first_part: String = whole[..k].iter().map(|m| m.text.as_str()).collect();
        let joined = first_part + &text(&msgs);
        if joined == whole_text {
            same_text += 1;
        } else {
            println!("resume at {k}: {joined:?}\n  uninterrupted: {whole_text:?}");
        }
    }
    println!(
        "greedy resume (gemma-3-270m, {N} tokens, cuts {cuts:?}): first resumed token equal \
         {same_first}/{n}, whole text equal {same_text}/{n}",
        n = cuts.len()
    );
    // This worker still holds the stream's cells (its prefix cache), so a
    // resume recomputes only the last delivered token, alone, as the decode
    // step did: the logits, hence the text, are the same (docs/operations.md "When
    // resumed text is identical").
    assert_eq!(
        (same_first, same_text),
        (cuts.len(), cuts.len()),
        "first token equal {same_first}/{n}, whole text equal {same_text}/{n}",
        n = cuts.len()
    );

    // Held-back text survives the cut: a stop sequence spanning tokens K-1
    // and K. The first worker held token K-1's text back (a possible stop);
    // the resumed one, replaying it, still completes the stop at token K.
    let texts: Vec<&str> = whole.iter().map(|m| m.text.as_str()).collect();
    let offset = |k: usize| texts[..k].concat().len();
    let k = (6..N as usize - 1)
        .find(|&k| {
            let stop = texts[k - 1].to_string() + texts[k];
            !texts[k - 1].is_empty()
                && !texts[k].is_empty()
                && whole_text.find(&stop) == Some(offset(k - 1))
        })
        .expect("two adjacent non-empty token texts");
    let stop = texts[k - 1].to_string() + texts[k];
    let with_stop = |id: &str, resume: &[i32]| GenerateRequest {
        stop: vec![stop.clone()],
        resume_token_ids: resume.to_vec(),
        ..greedy(id, PROMPT, N)
    };
    let (first, err) = run(&mut client, with_stop("stop-whole", &[])).await;
    assert!(err.is_none(), "{err:?}");
    let fin = first.last().unwrap().finished.unwrap();
    assert_eq!(fin.reason, FinishReason::StopSequence as i32);
    assert_eq!(fin.generated_tokens as usize, k + 1);
    assert_eq!(first[k - 1].text, "", "token K-1's text is held back");
    let (resumed, err) = run(&mut client, with_stop("stop-resumed", &whole_ids[..k])).await;
    assert!(err.is_none(), "{err:?}");
    let fin = resumed.last().unwrap().finished.unwrap();
    assert_eq!(fin.reason, FinishReason::StopSequence as i32, "{resumed:?}");
    assert_eq!(fin.generated_tokens as usize, k + 1);
    let joined = text(&first[..k]) + &text(&resumed);
    assert_eq!(joined, text(&first));
    assert_eq!(joined, whole_text[..offset(k - 1)]);

    // Bad resumes name the field.
    for (ids, max_tokens) in [(vec![-1], 4), (vec![i32::MAX], 4), (vec![1, 2], 2)] {
        let req = GenerateRequest {
            resume_token_ids: ids,
            ..greedy("bad-resume", PROMPT, max_tokens)
        };
        let (_, err) = run(&mut client, req).await;
        let err = err.expect("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("resume_token_ids"), "{err:?}");
        assert!(
            err.message().contains("bad-resume"),
            "names the request: {err:?}"
        );
    }
}

/// A prompt whose answer copies text from it (what speculation proposes).
const COPY_PROMPT: &str = "Passage:\nThe harbour town of Kessel sits where two rivers meet the \
sea. Its fishermen leave before dawn in narrow boats painted blue and yellow, and they return \
in the early afternoon with herring and mackerel.\n\nThe same passage, copied word for word:\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speculating_worker_streams_and_resumes_the_same_greedy_text() {
    let etcd = Etcd::start().await;
    let (_plain, mut plain) = worker(&etcd, "plain", &["--parallel", "1"], &[]).await;
    let (mut spec_proc, mut spec) =
        worker(&etcd, "spec", &["--parallel", "1", "--draft-max", "8"], &[]).await;
    const N: u32 = 32;
    let (want, err) = run(&mut plain, greedy("plain", COPY_PROMPT, N)).await;
    assert!(err.is_none(), "{err:?}");
    let (got, err) = run(&mut spec, greedy("spec", COPY_PROMPT, N)).await;
    assert!(err.is_none(), "{err:?}");
    // One message per token, indexes in order, the same text.
    let indexes: Vec<u32> = got
        .iter()
        .filter(|m| m.token_id.is_some())
        .map(|m| m.index)
        .collect();
    assert_eq!(indexes, (0..N).collect::<Vec<_>>());
    assert_eq!(
        ids(&got),
        ids(&want),
        "{:?} / {:?}",
        text(&got),
        text(&want)
    );
    let m = spec_proc.metrics_addr().await;
    let kept = metric(&m, "nanoinfer_worker_spec_accepted_tokens_total").await;
    let proposed = metric(&m, "nanoinfer_worker_spec_proposed_tokens_total").await;
    assert!(kept > 0.0 && kept <= proposed, "kept {kept} of {proposed}");
    // Resumed mid-copy (the resume point is the last token the client
    // has), the rest is the same text.
    let whole = ids(&want);
    let req = GenerateRequest {
        resume_token_ids: whole[..10].to_vec(),
        ..greedy("spec-resumed", COPY_PROMPT, N)
    };
    let (rest, err) = run(&mut spec, req).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(rest.first().map(|m| m.index), Some(10));
    assert_eq!(ids(&rest), whole[10..].to_vec());
    assert_eq!(rest.last().unwrap().finished.unwrap().generated_tokens, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_draft_model_streams_and_resumes_the_same_greedy_text() {
    let etcd = Etcd::start().await;
    // A draft with another vocabulary: the worker stops at start, naming
    // the flag.
    let chat = common::chat_model_path();
    let args = ["--draft-max", "4", "--draft-model", chat.to_str().unwrap()];
    let mut wrong = spawn_worker(&etcd.endpoint, "wrong-draft", &args, &[]);
    let line = wrong
        .wait_for_line("its vocabulary has", Duration::from_secs(60))
        .await;
    assert!(line.contains("--draft-model"), "{line}");
    let code = wrong.wait_exit(Duration::from_secs(30)).await;
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");

    // The served model drafting for itself, on prose (little to copy, so
    // the proposals come from the draft).
    let model = model_path();
    let (_plain, mut plain) = worker(&etcd, "plain", &["--parallel", "1"], &[]).await;
    let args = [
        "--parallel",
        "1",
        "--draft-max",
        "4",
        "--draft-model",
        model.to_str().unwrap(),
    ];
    let (mut drafted_proc, mut drafted) = worker(&etcd, "drafted", &args, &[]).await;
    const N: u32 = 32;
    let with_leads = |id: &str| GenerateRequest {
        logprobs: true,
        top_logprobs: 2,
        ..greedy(id, PROMPT, N)
    };
    let (want, err) = run(&mut plain, with_leads("plain")).await;
    assert!(err.is_none(), "{err:?}");
    let (got, err) = run(&mut drafted, with_leads("drafted")).await;
    assert!(err.is_none(), "{err:?}");
    same_up_to_a_near_tie(&want, &ids(&got));
    let m = drafted_proc.metrics_addr().await;
    let kept = metric(&m, "nanoinfer_worker_spec_accepted_tokens_total").await;
    let proposed = metric(&m, "nanoinfer_worker_spec_proposed_tokens_total").await;
    assert!(
        proposed >= 8.0 && kept * 2.0 >= proposed,
        "kept {kept} of {proposed}"
    );
    // Resumed mid-stream: the draft computes the resumed tokens too, and
    // the rest is the drafted stream's.
    let whole = ids(&got);
    let req = GenerateRequest {
        resume_token_ids: whole[..10].to_vec(),
        ..with_leads("drafted-resumed")
    };
    let (rest, err) = run(&mut drafted, req).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(rest.first().map(|m| m.index), Some(10));
    let tail: Vec<GenerateResponse> = got
        .iter()
        .filter(|m| m.token_id.is_some())
        .skip(10)
        .cloned()
        .collect();
    same_up_to_a_near_tie(&tail, &ids(&rest));
}

/// `other`'s token ids equal `reference`'s, or part from them where
/// `reference`'s top two tokens were under 1.5 nats apart: a verify step's
/// rows take other ggml kernels than one-token decodes, whose logits were
/// measured up to 1.4 nats apart (docs/operations.md, "Same seed, same
/// text"), which can flip a near tie.
fn same_up_to_a_near_tie(reference: &[GenerateResponse], other: &[i32]) {
    let tokens: Vec<&GenerateResponse> =
        reference.iter().filter(|m| m.token_id.is_some()).collect();
    assert_eq!(tokens.len(), other.len());
    if let Some(at) = tokens
        .iter()
        .zip(other)
        .position(|(m, &id)| m.token_id != Some(id))
    {
        let top = &tokens[at].top_logprobs;
        let lead = top[0].logprob - top[1].logprob;
        println!("parted at token {at}, where the top two were {lead} nats apart");
        assert!(
            lead < 1.5,
            "parted at token {at}, not a near tie ({lead} nats)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_requests_leave_the_queue_and_deadlines_stop_running_ones() {
    let etcd = Etcd::start().await;
    let (mut w, mut client) = worker(
        &etcd,
        "deadlines",
        &["--parallel", "1", "--queue-timeout", "2"],
        &[],
    )
    .await;
    let m = w.metrics_addr().await;
    // A long request takes the only slot.
    let mut busy = client
        .generate(greedy("busy", PROMPT, 400))
        .await
        .unwrap()
        .into_inner();
    busy.message().await.unwrap().unwrap();

    // Queued with a 1 s deadline: DEADLINE_EXCEEDED, and out of the queue.
    let mut req = tonic::Request::new(greedy("queued-deadline", PROMPT, 8));
    req.set_timeout(Duration::from_secs(1));
    let sent = Instant::now();
    let (msgs, err) = run(&mut client, req).await;
    let err = err.expect("a deadline error");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(msgs.is_empty());
    assert!(err.message().contains("queued-deadline"), "{err:?}");
    let deadline = sent + Duration::from_secs(1);
    eventually(Duration::from_secs(3), "the queue to empty", || async {
        metric(&m, "nanoinfer_worker_num_requests_waiting").await == 0.0
    })
    .await;
    println!(
        "deadline -> waiting 0 after {:?}",
        Instant::now().saturating_duration_since(deadline)
    );
    assert_eq!(
        metric(&m, "nanoinfer_worker_num_requests_running").await,
        1.0
    );

    // A queued request whose client left frees its queue place at once.
    let mut gone = client.clone();
    let call = tokio::spawn(async move {
        let mut s = gone
            .generate(greedy("gone", PROMPT, 8))
            .await
            .unwrap()
            .into_inner();
        s.message().await
    });
    eventually(Duration::from_secs(3), "the request to queue", || async {
        metric(&m, "nanoinfer_worker_num_requests_waiting").await == 1.0
    })
    .await;
    call.abort();
    let left = Instant::now();
    eventually(
        Duration::from_secs(1),
        "the abandoned request to leave",
        || async { metric(&m, "nanoinfer_worker_num_requests_waiting").await == 0.0 },
    )
    .await;
    println!("client gone -> waiting 0 after {:?}", left.elapsed());

    // Waiting past --queue-timeout: RESOURCE_EXHAUSTED (busy, not broken),
    // so a coordinator holds it and tries again.
    let queued = Instant::now();
    let (_, err) = run(&mut client, greedy("queue-timeout", PROMPT, 8)).await;
    let err = err.expect("a queue timeout");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let waited = queued.elapsed();
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(4)).contains(&waited),
        "{waited:?}"
    );
    drop(busy);
    eventually(Duration::from_secs(3), "the slot to free", || async {
        metric(&m, "nanoinfer_worker_num_requests_running").await == 0.0
    })
    .await;

    // Running with a short deadline: some tokens, then DEADLINE_EXCEEDED,
    // and the slot frees.
    let mut req = tonic::Request::new(greedy("running-deadline", PROMPT, 400));
    req.set_timeout(Duration::from_millis(1500));
    let sent = Instant::now();
    let (msgs, err) = run(&mut client, req).await;
    let err = err.expect("a deadline error");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(!msgs.is_empty(), "tokens before the deadline");
    assert!(msgs.iter().all(|m| m.finished.is_none()));
    let deadline = sent + Duration::from_millis(1500);
    eventually(Duration::from_secs(3), "the slot to free", || async {
        metric(&m, "nanoinfer_worker_num_requests_running").await == 0.0
    })
    .await;
    println!(
        "running: {} tokens, then deadline -> running 0 after {:?}",
        msgs.len(),
        Instant::now().saturating_duration_since(deadline)
    );
    let (msgs, err) = run(&mut client, greedy("after", PROMPT, 3)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(msgs.last().unwrap().finished.unwrap().generated_tokens, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_engine_fails_its_streams_and_the_worker_leaves() {
    let etcd = Etcd::start().await;
    let (mut w, mut client) = worker(
        &etcd,
        "dies",
        &["--lease-ttl", "30"],
        &[("NANOINFER_FAILPOINT", "engine-panic-after-tokens=5")],
    )
    .await;
    assert_eq!(etcd.worker_ids().await, vec!["dies".to_string()]);
    let (msgs, err) = run(&mut client, greedy("doomed", PROMPT, 20)).await;
    let err = err.expect("the stream fails");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("doomed"), "{err:?}");
    assert_eq!(ids(&msgs).len(), 5, "the tokens before the panic arrive");
    let died = Instant::now();
    let code = w.wait_exit(Duration::from_secs(10)).await;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    // The lease was revoked, not left to expire (30 s).
    eventually(Duration::from_secs(5), "the worker's key to go", || async {
        etcd.worker_ids().await.is_empty()
    })
    .await;
    println!(
        "engine death -> exit code {code:?}, key gone within {:?}",
        died.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_still_delivers_every_token_to_a_slow_reader() {
    let etcd = Etcd::start().await;
    let mut w = spawn_worker(&etcd.endpoint, "drains", &[], &[]);
    w.wait_for_line("worker ready", Duration::from_secs(60))
        .await;
    // A stream window of a few messages: what the reader has not read stays
    // in the worker (its buffers), not in this process's socket.
    let addr = w.listen_addr().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(Some(128))
        .connect()
        .await
        .unwrap();
    let mut client = WorkerServiceClient::new(channel);
    const N: u32 = 20;
    let mut stream = client
        .generate(greedy("slow-reader", PROMPT, N))
        .await
        .unwrap()
        .into_inner();
    let admitted = stream.message().await.unwrap().unwrap();
    assert!(admitted.admitted, "{admitted:?}");
    let first = stream.message().await.unwrap().unwrap();
    w.terminate();
    // The engine finishes (every token now sits in the stream's buffer)
    // while the reader sleeps.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut msgs = vec![first];
    while let Some(m) = stream.message().await.expect("no error") {
        msgs.push(m);
    }
    assert_eq!(ids(&msgs).len() as u32, N);
    let fin = msgs.last().unwrap().finished.expect("the final message");
    assert_eq!(fin.generated_tokens, N);
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_etcd_registers_once_etcd_is_up() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut w = spawn_worker(&endpoint, "early", &[], &[]);
    w.wait_for_line(
        "registration in etcd failed; retrying",
        Duration::from_secs(60),
    )
    .await;
    // Not ready while unregistered.
    let metrics = w.metrics_addr().await;
    assert_eq!(http_get(&metrics, "/readyz").await.0, 503);
    let started = Instant::now();
    let _etcd = Etcd::start_on(port).await;
    w.wait_for_line("worker ready", Duration::from_secs(15))
        .await;
    println!("etcd up -> worker registered after {:?}", started.elapsed());
    assert_eq!(http_get(&metrics, "/readyz").await.0, 200);
    let mut c = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let got = c.get("/nanoinfer/workers/early", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1);
    // Shutdown still works, and leaves the cluster.
    w.terminate();
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await, Some(0));
    let got = c.get("/nanoinfer/workers/early", None).await.unwrap();
    assert!(got.kvs().is_empty());
    let _ =
        std::fs::remove_dir_all(std::env::temp_dir().join(format!("nanoinfer-etcd-late-{port}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_caller_gets_the_coordinators_limits() {
    let etcd = Etcd::start().await;
    let (_w, mut client) = worker(&etcd, "limits", &[], &[]).await;
    let cases = [
        (greedy("big", PROMPT, u32::MAX), "max_tokens"),
        (greedy(&"r".repeat(100_000), PROMPT, 2), "request_id"),
        (
            GenerateRequest {
                stop: vec!["s".into(); 12_000],
                ..greedy("stops", PROMPT, 2)
            },
            "stop",
        ),
        (
            GenerateRequest {
                stop: vec!["x".repeat(300)],
                ..greedy("long-stop", PROMPT, 2)
            },
            "stop",
        ),
        (greedy("prompt", &"p".repeat((1 << 20) + 1), 2), "prompt"),
    ];
    for (req, field) in cases {
        let (msgs, err) = run(&mut client, req).await;
        assert!(msgs.is_empty());
        let err = err.expect("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{field}: {err:?}"
        );
    }
    // Within the limits it serves.
    let (msgs, err) = run(&mut client, greedy("fine", PROMPT, 2)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(msgs.last().unwrap().finished.unwrap().generated_tokens, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_caller_cannot_forge_a_worker_log_line() {
    let etcd = Etcd::start().await;
    let (mut w, mut client) = worker(&etcd, "escape", &[], &[]).await;
    let forged = "x\nINFO forged line\r\u{1b}[0m";
    let (_, err) = run(&mut client, greedy(forged, PROMPT, 2)).await;
    let err = err.expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("request_id: "), "{err:?}");
    // (The reply can arrive before the worker's log line is read.)
    let refused = w
        .wait_for_line("generate refused", Duration::from_secs(10))
        .await;
    // Findable, escaped (a span field's text is escaped once more).
    assert!(
        refused.contains("nINFO forged line"),
        "the refusal is logged with the id escaped: {refused}"
    );
    let log = w.log();
    assert!(
        !log.lines().any(|l| l.starts_with("INFO forged")),
        "no forged line:\n{log}"
    );
    // A prompt (field 2) that is not UTF-8: refused, counted.
    let addr = w.listen_addr().await;
    let body = vec![0x12, 2, 0xff, 0xfe, 0x18, 2];
    let path = "/nanoinfer.worker.v1.WorkerService/Generate";
    let err = common::raw::call(&addr, path, body).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("prompt"), "{err:?}");
    let metrics = w.metrics_addr().await;
    assert_eq!(
        metric(&metrics, "nanoinfer_worker_request_decode_errors_total").await,
        1.0
    );
}
