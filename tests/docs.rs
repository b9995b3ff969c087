//! The documentation's promises, checked: every relative link in README.md
//! and docs/*.md reaches a file (and, with `#anchor`, a heading in it), every
//! repository path written as a code span exists, the flag tables of
//! docs/configuration.md and each command's `--help` agree both ways (flags
//! and environment variables); and every script answers `--help` without
//! side effects (tests/doc_commands.rs runs the docs' commands). Reads files and runs
//! `--help`: no cluster, no network.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Code spans starting with one of these are paths from the repository root.
const PATH_PREFIXES: [&str; 11] = [
    "scripts/",
    "deploy/",
    "tests/",
    "docs/",
    "proto/",
    "coordinator/",
    "worker/",
    "registry/",
    "telemetry/",
    "src/",
    "examples/",
];

/// A code span holding one of these is a pattern or a placeholder, not a path.
const NOT_A_PATH: [char; 5] = ['*', '<', '{', '$', '…'];

/// The commands whose flags docs/configuration.md lists, each under a heading
/// that is exactly its name: (heading, binary, arguments before `--help`).
const BINARIES: [(&str, &str, &[&str]); 3] = [
    ("nanoinfer-coordinator", "nanoinfer-coordinator", &[]),
    ("nanoinfer-worker", "nanoinfer-worker", &[]),
    ("nanoinfer serve", "nanoinfer", &["serve"]),
];

/// A Markdown file: where it is, its name for messages, its text.
struct Doc {
    path: PathBuf,
    name: String,
    text: String,
}

impl Doc {
    fn read(path: &Path) -> Doc {
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let name = path
            .strip_prefix(common::repo_root())
            .unwrap_or(path)
            .display()
            .to_string();
        Doc {
            path: path.to_path_buf(),
            name,
            text,
        }
    }
}

/// README.md, then docs/*.md in name order.
fn docs() -> Vec<Doc> {
    let root = common::repo_root();
    let dir = root.join("docs");
    let mut in_docs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "md"))
        .collect();
    in_docs.sort();
    assert!(!in_docs.is_empty(), "docs/ holds no .md file");
    let mut paths = vec![root.join("README.md")];
    paths.extend(in_docs);
    paths.iter().map(|p| Doc::read(p)).collect()
}

/// The text with the lines of every fenced code block emptied (line numbers
/// stay), so that shell comments and JSON in examples are not read as prose.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // The open fence's character and length.
    let mut fence: Option<(char, usize)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let fence_char = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        // '`' and '~' are one byte each, so the run's length is a byte index.
        let run = fence_char.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match (fence, fence_char) {
            (None, Some(c)) if run >= 3 => fence = Some((c, run)),
            (Some((c, n)), Some(d)) if c == d && run >= n && trimmed[run..].trim().is_empty() => {
                fence = None
            }
            (None, _) => out.push_str(line),
            (Some(_), _) => {}
        }
        out.push('\n');
    }
    out
}

/// 1-based line number of byte offset `pos`.
fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn backtick_run(bytes: &[u8], from: usize) -> usize {
    bytes[from..].iter().take_while(|b| **b == b'`').count()
}

/// Where the run of exactly `n` backticks closing a code span opened before
/// `from` starts; `None` when the paragraph (a blank line) ends first.
fn closing_run(bytes: &[u8], from: usize, n: usize) -> Option<usize> {
    let mut j = from;
    while j < bytes.len() {
        match bytes[j] {
            b'\n' if bytes.get(j + 1) == Some(&b'\n') => return None,
            b'`' => {
                let m = backtick_run(bytes, j);
                if m == n {
                    return Some(j);
                }
                j += m;
            }
            _ => j += 1,
        }
    }
    None
}

/// An inline code span: the line it starts on, its content, and the byte
/// range it covers, backticks included.
struct Span {
    line: usize,
    content: String,
    range: std::ops::Range<usize>,
}

/// A code span's content as CommonMark reads it: line breaks become spaces,
/// and one space is dropped on each side when both are there and the
/// content is not all spaces.
fn span_content(raw: &str) -> String {
    let raw = raw.replace('\n', " ");
    match raw.strip_prefix(' ').and_then(|r| r.strip_suffix(' ')) {
        Some(inner) if !inner.trim().is_empty() => inner.to_string(),
        _ => raw,
    }
}

/// The inline code spans of `prose` (fenced blocks already emptied). A span
/// may continue over a line break, as in CommonMark, but not past a blank line.
fn code_spans(prose: &str) -> Vec<Span> {
    let bytes = prose.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            // A backslash escape outside a span: the next character is literal.
            b'\\' => i += 2,
            b'`' => {
                let n = backtick_run(bytes, i);
                let start = i + n;
                match closing_run(bytes, start, n) {
                    Some(close) => {
                        spans.push(Span {
                            line: line_of(prose, i),
                            content: span_content(&prose[start..close]),
                            range: i..close + n,
                        });
                        i = close + n;
                    }
                    // An unmatched run is literal text.
                    None => i = start,
                }
            }
            _ => i += 1,
        }
    }
    spans
}

/// `prose` with every code span blanked out (newlines kept), so that
/// `[a-z](…)` inside a span is not taken for a link.
fn without_code_spans(prose: &str) -> String {
    let mut bytes = prose.as_bytes().to_vec();
    for span in code_spans(prose) {
        for b in &mut bytes[span.range] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    }
    // Spans start and end on ASCII backticks, so whole characters were blanked.
    String::from_utf8(bytes).expect("blanking code spans keeps UTF-8")
}

/// Index of the byte that closes the bracket (`open`/`close`) opened at
/// `from`, counting nested pairs; `None` past a blank line.
fn matching(bytes: &[u8], from: usize, open: u8, close: u8) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = from;
    while j < bytes.len() {
        let b = bytes[j];
        if b == b'\\' {
            j += 2;
            continue;
        }
        if b == b'\n' && bytes.get(j + 1) == Some(&b'\n') {
            return None;
        }
        if b == open {
            depth += 1;
        } else if b == close {
            depth -= 1;
            if depth == 0 {
                return Some(j);
            }
        }
        j += 1;
    }
    None
}

/// The inline links `[text](target)` (and images) of a document: the line
/// each starts on and its target, without an optional title.
fn links(doc: &Doc) -> Vec<(usize, String)> {
    let text = without_code_spans(&prose(&doc.text));
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] != b'[' {
            i += 1;
            continue;
        }
        let Some(close) = matching(bytes, i, b'[', b']') else {
            i += 1;
            continue;
        };
        if bytes.get(close + 1) != Some(&b'(') {
            // Not a link (yet): brackets inside may still hold one.
            i += 1;
            continue;
        }
        let Some(end) = matching(bytes, close + 1, b'(', b')') else {
            i += 1;
            continue;
        };
        let inside = text[close + 2..end].trim();
        let target = inside.split_whitespace().next().unwrap_or("");
        let target = target
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(target);
        found.push((line_of(&text, i), target.to_string()));
        i = end + 1;
    }
    found
}

/// GitHub's anchor for a heading: lower case, spaces to '-', every other
/// character that is not a letter, digit, '-' or '_' dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The ATX headings outside fenced blocks: line number, level and text.
fn headings(text: &str) -> Vec<(usize, usize, String)> {
    let mut found = Vec::new();
    for (n, line) in prose(text).lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if indent > 3 {
            continue;
        }
        let line = line.trim_start_matches(' ');
        let level = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&level) {
            continue;
        }
        let rest = &line[level..];
        if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
            continue;
        }
        // An optional closing sequence of '#'s, after a space.
        let mut title = rest.trim();
        let without_closing = title.trim_end_matches('#');
        if without_closing.is_empty() || without_closing.ends_with(' ') {
            title = without_closing.trim_end();
        }
        found.push((n + 1, level, title.to_string()));
    }
    found
}

/// Every anchor a file's headings produce, duplicates numbered as GitHub does.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, _, title) in headings(text) {
        let base = slug(&title);
        let count = seen.entry(base.clone()).or_insert(0);
        out.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    out
}

fn is_external(target: &str) -> bool {
    target.contains("://") || target.starts_with("mailto:")
}

#[test]
fn relative_links_reach_a_file_and_a_heading() {
    let mut failures = Vec::new();
    let mut anchor_cache: HashMap<PathBuf, BTreeSet<String>> = HashMap::new();
    let mut checked = 0;
    for doc in docs() {
        for (line, target) in links(&doc) {
            if is_external(&target) {
                continue;
            }
            checked += 1;
            let at = format!("{}:{line}: link ({target})", doc.name);
            let (path_part, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            if path_part.starts_with('/') {
                failures.push(format!("{at}: write the path relative to {}", doc.name));
                continue;
            }
            let file = if path_part.is_empty() {
                doc.path.clone()
            } else {
                doc.path.parent().expect("a file's folder").join(path_part)
            };
            if !file.exists() {
                failures.push(format!("{at}: {} does not exist", file.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if file.extension().is_none_or(|ext| ext != "md") {
                failures.push(format!(
                    "{at}: #{anchor} on {}, which is not a Markdown file",
                    file.display()
                ));
                continue;
            }
            let key = fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            let known = anchor_cache.entry(key).or_insert_with(|| {
                anchors(
                    &fs::read_to_string(&file)
                        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display())),
                )
            });
            if !known.contains(anchor) {
                failures.push(format!(
                    "{at}: no heading in {} makes the anchor #{anchor} (it has: {})",
                    file.display(),
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    assert!(
        checked > 0,
        "no relative link found: is the link parser broken?"
    );
    assert!(
        failures.is_empty(),
        "{} broken link(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The path a code span names, if it names one: its first word, trailing
/// punctuation dropped, when that starts with a repository folder.
fn span_path(content: &str) -> Option<&str> {
    let word = content.split_whitespace().next()?;
    let word = word.trim_end_matches(['.', ',', ';', ':', ')', '\'', '"']);
    if !PATH_PREFIXES.iter().any(|p| word.starts_with(p)) {
        return None;
    }
    if word.contains(NOT_A_PATH) {
        return None;
    }
    Some(word)
}

#[test]
fn paths_in_code_spans_exist() {
    let root = common::repo_root();
    let mut failures = Vec::new();
    let mut checked = 0;
    for doc in docs() {
        for span in code_spans(&prose(&doc.text)) {
            let Some(path) = span_path(&span.content) else {
                continue;
            };
            checked += 1;
            if !root.join(path).exists() {
                failures.push(format!(
                    "{}:{}: `{}` names {path}, which is not in the repository",
                    doc.name, span.line, span.content
                ));
            }
        }
    }
    assert!(
        checked > 0,
        "no path in a code span found: is the span parser broken?"
    );
    assert!(
        failures.is_empty(),
        "{} missing path(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The cells of a table row, split on '|' that is not escaped as `\|`.
fn cells(row: &str) -> Vec<String> {
    let row = row.trim();
    let row = row.strip_prefix('|').unwrap_or(row);
    let row = row.strip_suffix('|').unwrap_or(row);
    let mut out = vec![String::new()];
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("a cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("a cell").push(c),
        }
    }
    out
}

/// The flags in the first column of each binary's table in
/// docs/configuration.md: binary → (line, flag) in order.
fn documented_flags(doc: &Doc) -> HashMap<&'static str, Vec<(usize, String)>> {
    let titles: HashMap<usize, String> = headings(&doc.text)
        .into_iter()
        .map(|(line, _, title)| (line, title.replace('`', "")))
        .collect();
    let mut flags: HashMap<&'static str, Vec<(usize, String)>> = HashMap::new();
    let mut binary: Option<&'static str> = None;
    for (n, line) in prose(&doc.text).lines().enumerate() {
        let line_no = n + 1;
        if let Some(title) = titles.get(&line_no) {
            binary = BINARIES
                .iter()
                .map(|(heading, _, _)| *heading)
                .find(|b| title.trim() == *b);
            continue;
        }
        let Some(binary) = binary else { continue };
        if !line.trim_start().starts_with('|') {
            continue;
        }
        let row = cells(line);
        let first = &row[0];
        // The separator row holds only '-', ':' and spaces.
        if first.chars().all(|c| c == '-' || c == ':' || c == ' ') {
            continue;
        }
        for span in code_spans(first) {
            let word = span.content.split_whitespace().next().unwrap_or("");
            if let Some(name) = word.strip_prefix("--") {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                flags
                    .entry(binary)
                    .or_default()
                    .push((line_no, format!("--{name}")));
            }
        }
    }
    flags
}

/// The `--help` text of a command of [`BINARIES`].
fn help_text(binary: &str, args: &[&str]) -> String {
    let path = common::bin(binary);
    let out = Command::new(&path)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {} --help: {e}", path.display()));
    common::assert_ok(&out, &format!("{binary} {} --help", args.join(" ")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every `--flag` word in a `--help` text.
fn help_flags(help: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in help.match_indices("--") {
        let name: String = help[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !name.is_empty() {
            found.insert(format!("--{name}"));
        }
    }
    found
}

/// The options a `--help` text defines: the `--flag` that starts a line
/// (after `-x, `), not those its descriptions mention.
fn help_options(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.split_once(", ") {
                Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                _ => line,
            };
            let name: String = line
                .strip_prefix("--")?
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect()
}

/// The environment variables a `--help` text names (`[env: NAME=…]`).
fn help_env(help: &str) -> BTreeSet<String> {
    help.match_indices("[env: ")
        .map(|(i, m)| {
            help[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Both ways: every flag in a table is in its command's `--help`, every
/// flag in `--help` has a row, and every full environment variable name in
/// a table's flag and env columns (`NANOINFER_…`, `OTEL_…`) is one
/// `--help` names.
#[test]
fn configuration_matches_help() {
    let doc = Doc::read(&common::repo_root().join("docs/configuration.md"));
    let flags = documented_flags(&doc);
    let mut failures = Vec::new();
    for (heading, binary, args) in BINARIES {
        let documented = flags.get(heading).map(Vec::as_slice).unwrap_or_default();
        assert!(
            documented.len() >= 5,
            "{}: found {} flags under a \"{heading}\" heading; expected its flag table there",
            doc.name,
            documented.len()
        );
        let help = help_text(binary, args);
        let in_help = help_flags(&help);
        for (line, flag) in documented {
            if !in_help.contains(flag) {
                failures.push(format!(
                    "{}:{line}: {flag} is in the {heading} table but not in its --help",
                    doc.name
                ));
            }
        }
        let in_table: BTreeSet<&String> = documented.iter().map(|(_, f)| f).collect();
        // The CLI's global options (the client's address, TLS and key,
        // under "Clients") show in every subcommand's help.
        let global = if args.is_empty() {
            BTreeSet::new()
        } else {
            help_options(&help_text(binary, &[]))
        };
        for flag in help_options(&help).difference(&global) {
            if flag != "--help" && flag != "--version" && !in_table.contains(flag) {
                failures.push(format!(
                    "{}: `{heading} --help` has {flag}, the {heading} table has no row for it",
                    doc.name
                ));
            }
        }
        let env = help_env(&help);
        for (line, name) in documented_env(&doc, heading) {
            if !env.contains(&name) {
                failures.push(format!(
                    "{}:{line}: {name} is in the {heading} table but `{heading} --help` reads no such variable",
                    doc.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "docs/configuration.md and --help differ ({}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Full environment variable names (`NANOINFER_…`, `OTEL_…`) in the first
/// column and the "env" column of the table under `heading`: (line, name).
fn documented_env(doc: &Doc, heading: &str) -> Vec<(usize, String)> {
    let titles: HashMap<usize, String> = headings(&doc.text)
        .into_iter()
        .map(|(line, _, title)| (line, title.replace('`', "")))
        .collect();
    let mut inside = false;
    // The first column, and the one headed "env" where there is one.
    let mut columns: Option<Vec<usize>> = None;
    let mut out = Vec::new();
    for (n, line) in prose(&doc.text).lines().enumerate() {
        if let Some(title) = titles.get(&(n + 1)) {
            inside = title.trim() == heading;
            columns = None;
            continue;
        }
        if !inside || !line.trim_start().starts_with('|') {
            continue;
        }
        let row = cells(line);
        let Some(columns) = &columns else {
            let mut first = vec![0];
            first.extend(row.iter().position(|c| c.trim() == "env"));
            columns = Some(first);
            continue;
        };
        for cell in columns.iter().filter_map(|&i| row.get(i)) {
            for span in code_spans(cell) {
                let name = span.content.trim();
                if (name.starts_with("NANOINFER_") || name.starts_with("OTEL_"))
                    && name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    out.push((n + 1, name.to_string()));
                }
            }
        }
    }
    out
}

/// Every script a reader is told to run answers `--help` with its usage
/// and exit 0, without side effects: nothing is installed, built, started
/// or written (its cache dir, which the scripts create first thing, stays
/// absent).
#[test]
fn every_script_answers_help_without_side_effects() {
    let root = common::repo_root();
    let cache = std::env::temp_dir().join(format!("nanoinfer-help-{}", std::process::id()));
    let _ = fs::remove_dir_all(&cache);
    let scripts = [
        "scripts/setup",
        "scripts/test",
        "scripts/demo",
        "scripts/fetch-model",
        "scripts/gen-certs",
        "scripts/load-test",
        "scripts/bench-router",
        "scripts/bench-routing",
        "scripts/bench-ram-tier",
        "scripts/bench-spec",
        "scripts/bench-tls",
        "scripts/build-base-image",
        "scripts/build-image",
        "deploy/local-cluster.sh",
        "deploy/etcd-auth.sh",
        "deploy/jaeger.sh",
        "deploy/k8s/validate",
        "deploy/k8s/run-on-docker",
        "test.sh",
    ];
    for script in scripts {
        for flag in ["--help", "-h"] {
            let out = Command::new(root.join(script))
                .arg(flag)
                .env("NANOINFER_CACHE_DIR", &cache)
                // Endpoints that would be touched if the script ran.
                .env("ETCDCTL_ENDPOINTS", "http://127.0.0.1:1")
                .output()
                .unwrap_or_else(|e| panic!("run {script}: {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{script} {flag}: {}\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
                "{script} {flag} printed no usage: {stdout:?}"
            );
            assert!(!cache.exists(), "{script} {flag} wrote {}", cache.display());
        }
    }
}
