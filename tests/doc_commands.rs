//! Every command the docs show, run or checked, as a reader would meet them.
//!
//! The `sh` and `python` blocks of README.md and docs/*.md are read in
//! order and split into commands (quotes, `$(…)`, `\` continuations and
//! comments understood). Each command is either
//!
//! - **run**, when it is local and safe: `./test.sh`, the `nanoinfer` CLI
//!   (`infer`, `health`, `chat` with a question on stdin), grpcurl, curl,
//!   `deploy/local-cluster.sh start|status|stop` (plain, secure, with
//!   another model or with OTLP), `scripts/fetch-model`, the Python OpenAI
//!   client, and the `export`/assignment/`. file` lines the later commands
//!   rely on. A run must exit 0, and one that asks for the capital of France
//!   must print "Paris";
//! - or **checked**, when it builds, deploys, benchmarks, talks to
//!   Kubernetes, Docker or etcd, or holds a placeholder (`PID`, `REGISTRY`,
//!   `[a|b]`, `path/to/`): the program exists (a repository path or a built
//!   binary) and every `--flag` it is given is in that program's `--help`;
//!   for kubectl, docker and etcdctl, every repository path it names
//!   exists. Those commands are run by other tests (tests/serve.rs,
//!   tests/e2e.rs, tests/load.rs, tests/container.rs …) or by CI itself.
//!
//! The cluster lives on free ports in its own run dir, not on the docs'
//! defaults (a developer's cluster may hold those): `127.0.0.1:50052`,
//! `:8080` and `:9052` in a command are rewritten to the test cluster's
//! ports and `<cache dir>/cluster` to its run dir; `NANOINFER_ADDR`, `PATH`
//! (binaries and the venv, as the README's `export` line sets it) and
//! `target` are set as the README sets them. A command that needs a
//! running cluster when none runs starts the default one first, as the
//! text before it tells the reader to (`scripts/demo --keep`); a cluster a
//! block starts and does not stop is stopped at the block's end.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::free_port;

/// A fenced block: where it starts, its language, its text.
struct Block {
    doc: String,
    line: usize,
    lang: String,
    text: String,
}

fn blocks(doc: &Path) -> Vec<Block> {
    let text = fs::read_to_string(doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
    let name = doc
        .strip_prefix(common::repo_root())
        .unwrap_or(doc)
        .display()
        .to_string();
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (n, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("```") {
            match open.take() {
                Some((start, lang, body)) => out.push(Block {
                    doc: name.clone(),
                    line: start,
                    lang,
                    text: body,
                }),
                None => open = Some((n + 1, rest.trim().to_string(), String::new())),
            }
            continue;
        }
        if let Some((_, _, body)) = open.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The commands of a shell block, comments removed and continuation lines
/// joined: a newline ends a command only outside quotes and `$(…)`, and not
/// after a `\`.
fn commands(block: &str) -> Vec<String> {
    #[derive(PartialEq)]
    enum Ctx {
        Double,
        Subst,
    }
    let chars: Vec<char> = block.chars().collect();
    let mut stack: Vec<Ctx> = Vec::new();
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let in_double = stack.last() == Some(&Ctx::Double);
        match c {
            '\\' if i + 1 < chars.len() => {
                if chars[i + 1] == '\n' {
                    cur.push(' ');
                } else {
                    cur.push(c);
                    cur.push(chars[i + 1]);
                }
                i += 2;
                continue;
            }
            '\'' if !in_double => {
                // Single quotes: everything up to the next one, newlines too.
                let end = (i + 1..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .unwrap_or(chars.len() - 1);
                cur.extend(&chars[i..=end]);
                i = end + 1;
                continue;
            }
            '"' if in_double => {
                stack.pop();
            }
            '"' => stack.push(Ctx::Double),
            '$' if chars.get(i + 1) == Some(&'(') => {
                stack.push(Ctx::Subst);
                cur.push_str("$(");
                i += 2;
                continue;
            }
            ')' if stack.last() == Some(&Ctx::Subst) => {
                stack.pop();
            }
            '#' if !in_double && (cur.is_empty() || cur.ends_with([' ', '\t', '\n'])) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '\n' if stack.is_empty() => {
                let command = cur.trim().to_string();
                if !command.is_empty() {
                    out.push(command);
                }
                cur.clear();
                i += 1;
                continue;
            }
            _ => {}
        }
        cur.push(c);
        i += 1;
    }
    let command = cur.trim().to_string();
    if !command.is_empty() {
        out.push(command);
    }
    out
}

/// The words of a command as bash splits them: on whitespace outside
/// quotes and `$(…)`, quotes kept.
fn words(command: &str) -> Vec<String> {
    let chars: Vec<char> = command.chars().collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    // Open double quotes and `$(`: true for a `$(`.
    let mut stack: Vec<bool> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let in_double = stack.last() == Some(&false);
        match c {
            '\\' if i + 1 < chars.len() => {
                cur.push(c);
                cur.push(chars[i + 1]);
                i += 2;
                continue;
            }
            '\'' if !in_double => {
                let end = (i + 1..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .unwrap_or(chars.len() - 1);
                cur.extend(&chars[i..=end]);
                i = end + 1;
                continue;
            }
            '"' if in_double => {
                stack.pop();
            }
            '"' => stack.push(false),
            '$' if chars.get(i + 1) == Some(&'(') => {
                stack.push(true);
                cur.push_str("$(");
                i += 2;
                continue;
            }
            ')' if stack.last() == Some(&true) => {
                stack.pop();
            }
            c if c.is_whitespace() && stack.is_empty() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                i += 1;
                continue;
            }
            _ => {}
        }
        cur.push(c);
        i += 1;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `NAME=value`, as a word.
fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The program of a command: its first word after `NAME=value` prefixes.
fn program(command: &str) -> Option<String> {
    words(command).into_iter().find(|w| !is_assignment(w))
}

/// The words after the program.
fn args(command: &str) -> Vec<String> {
    words(command)
        .into_iter()
        .skip_while(|w| is_assignment(w))
        .skip(1)
        .collect()
}

/// A line that only sets the shell's state for the lines after it.
fn is_state(command: &str) -> bool {
    command.starts_with("export ") || command.starts_with(". ") || program(command).is_none()
}

/// An unquoted word that stands for something the reader fills in.
fn has_placeholder(command: &str) -> bool {
    const PLACEHOLDERS: [&str; 8] = [
        "PID", "REGISTRY", "THREADS", "PARALLEL", "PP", "TG", "REPS", "DIR",
    ];
    words(command).iter().any(|w| {
        !w.starts_with(['\'', '"'])
            && (w.starts_with('[')
                || w.contains("path/to/")
                || w.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .any(|part| PLACEHOLDERS.contains(&part)))
    })
}

#[derive(Debug, PartialEq)]
enum Action {
    /// Sets state for the commands after it; run as part of each of them.
    State,
    /// Run, needing a running cluster (or not).
    Run { cluster: bool },
    /// Checked: program and flags.
    Check,
}

fn classify(command: &str) -> Action {
    if is_state(command) {
        return Action::State;
    }
    if has_placeholder(command) {
        return Action::Check;
    }
    let Some(program) = program(command) else {
        return Action::Check;
    };
    let args = args(command);
    let sub = args.first().map(String::as_str).unwrap_or("");
    match program.as_str() {
        "./test.sh" | "grpcurl" | "curl" => Action::Run { cluster: true },
        "nanoinfer" | "$target/nanoinfer" => match sub {
            "infer" | "health" | "chat" => Action::Run { cluster: true },
            _ => Action::Check,
        },
        "deploy/local-cluster.sh" => match sub {
            "status" => Action::Run { cluster: true },
            "start" | "stop" => Action::Run { cluster: false },
            _ => Action::Check,
        },
        "scripts/fetch-model" => Action::Run { cluster: false },
        _ => Action::Check,
    }
}

/// The test's cluster: its environment and whether it runs.
struct Env {
    vars: Vec<(String, String)>,
    grpc: u16,
    http: u16,
    metrics: u16,
    run_dir: PathBuf,
    running: bool,
}

impl Env {
    fn new() -> Env {
        let run_dir = common::temp_dir("doc-commands");
        let (grpc, http, metrics) = (free_port(), free_port(), free_port());
        let bin_dir = common::bin("nanoinfer")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        let venv_bin = common::venv_python()
            .parent()
            .expect("venv bin")
            .to_path_buf();
        let path = format!(
            "{}:{}:{}",
            bin_dir.display(),
            venv_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let target_dir = bin_dir.parent().expect("target dir").display().to_string();
        let vars = vec![
            ("NANOINFER_RUN_DIR".into(), run_dir.display().to_string()),
            ("NANOINFER_COORDINATOR_PORT".into(), grpc.to_string()),
            ("NANOINFER_COORDINATOR_HTTP_PORT".into(), http.to_string()),
            (
                "NANOINFER_COORDINATOR_METRICS_PORT".into(),
                metrics.to_string(),
            ),
            (
                "NANOINFER_WORKER_PORTS".into(),
                format!("{} {}", free_port(), free_port()),
            ),
            (
                "NANOINFER_WORKER_METRICS_PORTS".into(),
                format!("{} {}", free_port(), free_port()),
            ),
            ("NANOINFER_ETCD_PORT".into(), free_port().to_string()),
            ("NANOINFER_ETCD_PEER_PORT".into(), free_port().to_string()),
            ("NANOINFER_ADDR".into(), format!("127.0.0.1:{grpc}")),
            ("CARGO_TARGET_DIR".into(), target_dir),
            ("target".into(), bin_dir.display().to_string()),
            ("PATH".into(), path),
        ];
        Env {
            vars,
            grpc,
            http,
            metrics,
            run_dir,
            running: false,
        }
    }

    /// The command as it runs here: the docs' default ports and run dir
    /// rewritten to the test cluster's.
    fn rewrite(&self, command: &str) -> String {
        command
            .replace("127.0.0.1:50052", &format!("127.0.0.1:{}", self.grpc))
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", self.http))
            .replace("127.0.0.1:9052", &format!("127.0.0.1:{}", self.metrics))
            .replace(
                "$(. scripts/common.sh; echo \"$NANOINFER_CACHE_DIR\")/cluster",
                &self.run_dir.display().to_string(),
            )
    }

    /// Runs `script` in bash from the repository root; (ok, stdout, stderr).
    fn bash(&self, script: &str, stdin: &str) -> (bool, String, String) {
        let mut child = Command::new("timeout")
            .args(["300", "bash", "-c", script])
            .current_dir(common::repo_root())
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bash");
        {
            use std::io::Write;
            let mut input = child.stdin.take().expect("stdin");
            let _ = input.write_all(stdin.as_bytes());
        }
        let out = child.wait_with_output().expect("wait for bash");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn cluster(&mut self, args: &str) {
        let (ok, out, err) = self.bash(&format!("deploy/local-cluster.sh {args}"), "");
        assert!(ok, "deploy/local-cluster.sh {args} failed:\n{out}{err}");
        self.running = args.starts_with("start");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.running {
            let _ = self.bash("deploy/local-cluster.sh stop", "");
        }
    }
}

/// Every `--flag` the program of `command` is given is in its `--help`
/// (for the `nanoinfer` CLI, its subcommand's); for kubectl, docker and
/// etcdctl, every repository path it names exists. Returns the failures.
fn check(env: &Env, command: &str) -> Vec<String> {
    let root = common::repo_root();
    let mut failures = Vec::new();
    let Some(prog) = program(command) else {
        return vec!["no program".into()];
    };
    let args = args(command);
    if ["kubectl", "docker", "etcdctl", "kind"].contains(&prog.as_str()) {
        for word in &args {
            let word = word.trim_matches(|c| c == '"' || c == '\'');
            if (word.starts_with("deploy/") || word.starts_with("scripts/"))
                && !root.join(word).exists()
            {
                failures.push(format!("{word} does not exist"));
            }
        }
        return failures;
    }
    let sub = args.first().map(String::as_str).unwrap_or("");
    let (exe, help_args): (PathBuf, Vec<&str>) = if let Some(name) = prog.strip_prefix("$target/") {
        let path =
            PathBuf::from(&env.vars.iter().find(|(k, _)| k == "target").unwrap().1).join(name);
        if name == "nanoinfer" && !sub.is_empty() && !sub.starts_with('-') {
            (path, vec![sub, "--help"])
        } else {
            (path, vec!["--help"])
        }
    } else if prog.starts_with("scripts/") || prog.starts_with("deploy/") || prog.starts_with("./")
    {
        (root.join(&prog), vec!["--help"])
    } else {
        return vec![format!("no rule to check `{prog}`")];
    };
    if !exe.exists() {
        return vec![format!("{} does not exist", exe.display())];
    }
    if name_of(&exe).starts_with("raw_decode") || name_of(&exe).starts_with("sampler_bench") {
        // Examples take positional arguments only; existing is the check.
        return failures;
    }
    let out = Command::new(&exe)
        .args(&help_args)
        .env(
            "NANOINFER_CACHE_DIR",
            std::env::temp_dir().join("nanoinfer-doc-help"),
        )
        .output()
        .unwrap_or_else(|e| panic!("{} --help: {e}", exe.display()));
    let help =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let known: BTreeSet<String> = help
        .match_indices("--")
        .map(|(i, _)| {
            let name: String = help[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("--{name}")
        })
        .collect();
    for word in &args {
        let word = word.trim_matches(|c| c == '[' || c == ']');
        if let Some(name) = word.strip_prefix("--") {
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() && !known.contains(&format!("--{name}")) {
                failures.push(format!(
                    "--{name} is not in `{prog} {}`",
                    help_args.join(" ")
                ));
            }
        }
    }
    failures
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn the_docs_commands_run() {
    let root = common::repo_root();
    let mut docs = vec![root.join("README.md")];
    let mut others: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    others.sort();
    docs.extend(others);

    let mut env = Env::new();
    let python = common::venv_python();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let (mut ran, mut checked) = (0, 0);
    for doc in &docs {
        // `export` and `name=value` lines hold for the rest of the file;
        // `. file` only for the rest of its block.
        let mut doc_state: Vec<String> = Vec::new();
        for block in blocks(doc) {
            let at = format!("{}:{}", block.doc, block.line);
            // Whether a command of this block started a cluster.
            let mut started_here = false;
            let mut block_state: Vec<String> = Vec::new();
            if block.lang == "python" {
                if !env.running {
                    env.cluster("start");
                }
                let code = env.rewrite(&block.text);
                let script = format!("{} - <<'PY'\n{code}PY\n", python.display());
                let (ok, out, err) = env.bash(&script, "");
                ran += 1;
                report.push(format!("run   {at} python block"));
                if !ok {
                    failures.push(format!("{at}: the python block failed:\n{out}{err}"));
                } else if code.contains("capital of France") && !out.contains("Paris") {
                    failures.push(format!("{at}: the python block did not name Paris: {out}"));
                }
                continue;
            }
            if block.lang != "sh" {
                continue;
            }
            for command in commands(&block.text) {
                // The benchmarks take minutes each and start their own
                // clusters on fixed ports: checked only.
                let action = match classify(&command) {
                    // Their variables set nothing the test runs.
                    Action::State if block.doc == "docs/benchmarks.md" => continue,
                    _ if block.doc == "docs/benchmarks.md" => Action::Check,
                    action => action,
                };
                let line = format!("{at} {command}");
                match action {
                    Action::Check => {
                        checked += 1;
                        report.push(format!("check {line}"));
                        for f in check(&env, &command) {
                            failures.push(format!("{at}: `{command}`: {f}"));
                        }
                    }
                    Action::State | Action::Run { .. } => {
                        if action == (Action::Run { cluster: true }) && !env.running {
                            env.cluster("start");
                        }
                        let is_start = command.contains("deploy/local-cluster.sh start");
                        let is_stop = command.contains("deploy/local-cluster.sh stop");
                        if is_start && env.running {
                            env.cluster("stop");
                        }
                        let rewritten = env.rewrite(&command);
                        let mut script = String::from("set -e\n");
                        for s in doc_state.iter().chain(&block_state) {
                            script += &format!("{s} >/dev/null\n");
                        }
                        script += &rewritten;
                        let chat = command.contains("nanoinfer chat");
                        let stdin = if chat {
                            "What is the capital of France?\n/exit\n"
                        } else {
                            ""
                        };
                        let (ok, out, err) = env.bash(&script, stdin);
                        ran += 1;
                        report.push(format!("run   {line}"));
                        if is_start {
                            env.running = ok;
                            started_here = true;
                        }
                        if is_stop {
                            env.running = false;
                        }
                        if !ok {
                            failures.push(format!("{at}: `{command}` failed:\n{out}{err}"));
                        } else if (command.contains("capital of France") || chat)
                            && !out.contains("Paris")
                        {
                            failures.push(format!("{at}: `{command}` did not name Paris:\n{out}"));
                        }
                        if action == Action::State {
                            if command.starts_with(". ") {
                                block_state.push(rewritten);
                            } else {
                                doc_state.push(rewritten);
                            }
                        }
                    }
                }
            }
            // A cluster the block's commands started and left running is
            // stopped, so the next block starts from the state its text
            // describes (one the test started for it keeps running).
            if started_here && env.running {
                env.cluster("stop");
            }
        }
    }
    println!("{}", report.join("\n"));
    println!("{ran} commands run, {checked} checked");
    assert!(
        failures.is_empty(),
        "{} of the docs' commands failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        ran >= 25 && checked >= 15,
        "{ran} run, {checked} checked: the docs lost their commands?"
    );
}

#[test]
fn commands_are_split_as_bash_would() {
    let block = "a 1 # note\nb \"x $(c \"y\") z\" \\\n  --f 2\ncurl -d '{\n \"k\": 1}'\n# only a comment\nexport P=\"$(. s; echo \"$A:$B\"):$P\"   # c\n";
    assert_eq!(
        commands(block),
        vec![
            "a 1".to_string(),
            "b \"x $(c \"y\") z\"    --f 2".into(),
            "curl -d '{\n \"k\": 1}'".into(),
            "export P=\"$(. s; echo \"$A:$B\"):$P\"".into(),
        ]
    );
    assert_eq!(classify("./test.sh health"), Action::Run { cluster: true });
    assert_eq!(
        classify("target=$(. scripts/common.sh; echo \"$X\")/release"),
        Action::State
    );
    assert_eq!(
        classify("NANOINFER_MODEL=$(scripts/fetch-model gemma3-270m | tail -1) deploy/local-cluster.sh start"),
        Action::Run { cluster: false }
    );
    assert_eq!(classify("scripts/fetch-model [a|b]"), Action::Check);
    assert_eq!(classify("$target/nanoinfer serve"), Action::Check);
    assert_eq!(
        classify("$target/nanoinfer-load --kill-pid PID"),
        Action::Check
    );
    assert_eq!(
        classify("kubectl apply -k deploy/k8s/overlays/dev"),
        Action::Check
    );
}
