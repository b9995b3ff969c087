//! What rendering a conversation costs per request, on a real vocabulary:
//! llama.cpp's built-in template matcher (plain conversations) against the
//! Jinja renderer (`minijinja`, conversations with tools), both through
//! `nanoinfer_vocab::render_chat` with tokenizing; and what compiling a
//! forced tool call's constraint costs, as a JSON Schema (the generic
//! format) and as a Lark grammar in Hermes' `<tool_call>` form. The worker
//! and the coordinator each render every chat request once.
//!
//! cargo run --release -p nanoinfer-worker --example template_bench -- MODEL TEMPLATE_FILE [ROUNDS]
//!
//! (TEMPLATE_FILE: a Jinja template with a tool section, e.g.
//! tests/fixtures/hermes-style.jinja.)

use std::time::Instant;

use nanoinfer_vocab::{ChatMessage, ToolCall};
use nanoinfer_worker::model;

fn median_us(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn time(rounds: usize, mut f: impl FnMut()) -> f64 {
    f();
    median_us(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model_path), Some(template)) = (args.first(), args.get(1)) else {
        eprintln!("usage: template_bench MODEL TEMPLATE_FILE [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(200);
    let source = std::fs::read_to_string(template).expect("read the template file");
    let m = model::load(model_path.as_ref(), None, Some(source)).expect("load the model");
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
           "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The local time in a city.",
         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
           "required": ["city"], "additionalProperties": false}}}
    ]);
    let plain = vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "What is the weather in Paris?"),
        ChatMessage::new("assistant", "It is sunny, 18 degrees."),
        ChatMessage::new("user", "And in Rome?"),
    ];
    let with_calls = vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "What is the weather in Paris?"),
        ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris", "unit": "celsius"}"#.into(),
            }],
            ..ChatMessage::default()
        },
        ChatMessage {
            role: "tool".into(),
            content: "18 degrees and sunny".into(),
            tool_call_id: "call_1".into(),
            ..ChatMessage::default()
        },
    ];
    let (_, plain_tokens) = m.render_chat(&plain, None).unwrap();
    let (_, tool_tokens) = m.render_chat(&with_calls, Some(&tools)).unwrap();
    let matcher = time(rounds, || {
        m.render_chat(&plain, None).unwrap();
    });
    let jinja = time(rounds, || {
        m.render_chat(&with_calls, Some(&tools)).unwrap();
    });
    println!("model {} ({} rounds, median)", m.name, rounds);
    println!(
        "render + tokenize, plain 4 messages (llama.cpp matcher): {matcher:.0} us ({} tokens)",
        plain_tokens.len()
    );
    println!(
        "render + tokenize, 2 tools + a call + its result (Jinja): {jinja:.0} us ({} tokens)",
        tool_tokens.len()
    );

    // The constraints of a forced call (compiled per request).
    let t = Instant::now();
    m.grammars.compile(r#"{"type": "object"}"#).unwrap();
    println!(
        "token trie (first constrained request): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let call = |name: &str, params: &serde_json::Value| {
        serde_json::json!({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": false})
    };
    let calls = serde_json::json!({"anyOf": [
        call("get_weather", &tools[0]["function"]["parameters"]),
        call("get_time", &tools[1]["function"]["parameters"])]});
    let schema = serde_json::json!({"type": "object", "properties": {"tool_calls":
        {"type": "array", "items": calls, "minItems": 1, "maxItems": 8}},
        "required": ["tool_calls"], "additionalProperties": false})
    .to_string();
    let prepared = nanoinfer_proto::schema::prepare(calls).unwrap();
    let lark = format!(
        "start: call (\"\\n\" call)*\ncall: \"<tool_call>\\n\" %json {prepared} \"\\n</tool_call>\"\n"
    );
    let schema_us = time(rounds.min(50), || {
        m.grammars.compile(&schema).unwrap();
    });
    let lark_us = time(rounds.min(50), || {
        m.grammars.compile_lark(&lark).unwrap();
    });
    println!("compile, generic format (JSON Schema): {schema_us:.0} us");
    println!("compile, Hermes form (Lark with the schemas): {lark_us:.0} us");
}
