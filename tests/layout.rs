//! The code's layout, checked from the source text (no process is started):
//!
//! - **No import circle**: within every crate, the modules' references to
//!   one another (`crate::…`, `super::…`, `self::…` paths outside comments
//!   and `#[cfg(test)]` modules) form no cycle. A module's references to its
//!   own ancestors and descendants do not count (a parent and the children
//!   it declares are one unit); references between any other two do, at
//!   the file level (`http::tools` and `http::request` are two modules).
//! - **Every module is in its layout**: a file that declares child modules
//!   and has a `# Layout` section names each of them there, and every
//!   crate's root has one.
//!
//! `cargo test --test suite -- layout::` prints each circle with the names that tie
//! it, or each module a layout misses (`NANOINFER_LAYOUT_ROOT=DIR` checks
//! another checkout).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's library crates (their `src/lib.rs`; `.` is the root
/// package, the command-line client's library).
const CRATES: &[&str] = &[
    ".",
    "coordinator",
    "worker",
    "proto",
    "registry",
    "telemetry",
    "vocab",
];

/// One source file as a module: its path from the crate root (`[]` for
/// `lib.rs`) and its text without comments and test modules.
struct Module {
    path: Vec<String>,
    file: PathBuf,
    code: String,
    children: Vec<String>,
    doc: String,
}

/// This checkout, or the one `NANOINFER_LAYOUT_ROOT` names (to check
/// another tree with the same test binary).
fn workspace() -> PathBuf {
    std::env::var_os("NANOINFER_LAYOUT_ROOT")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The file's code without `//` comments (doc comments included; a line
/// with a string before its `//` is kept whole) and without its test
/// modules (`#[cfg(test)]` before a `mod` at the start of a line).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("#[cfg(test)]") {
            match lines.peek() {
                // A test module in a file of its own: leave the declaration out.
                Some(next) if next.starts_with("mod ") && next.ends_with(';') => {
                    lines.next();
                    continue;
                }
                // The test module every file keeps last.
                Some(next) if next.starts_with("mod ") => break,
                _ => {}
            }
        }
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// `mod name;` and `pub mod name;` declarations (files of their own, not
/// inline `mod name { … }` blocks, which are part of this file).
fn children_of(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in code.lines() {
        let line = line.trim();
        let rest = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("pub(crate) mod "))
            .or_else(|| line.strip_prefix("mod "));
        if let Some(rest) = rest {
            if let Some(name) = rest.strip_suffix(';') {
                names.push(name.trim().to_string());
            }
        }
    }
    names
}

fn load(crate_dir: &Path) -> Vec<Module> {
    let src = crate_dir.join("src");
    let mut modules = Vec::new();
    let mut todo = vec![(Vec::<String>::new(), src.join("lib.rs"))];
    while let Some((path, file)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let code = code_of(&text);
        let children = children_of(&code);
        let dir = if path.is_empty() {
            src.clone()
        } else if file.ends_with("mod.rs") {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for child in &children {
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(child).join("mod.rs");
            let child_file = if flat.exists() { flat } else { nested };
            let mut child_path = path.clone();
            child_path.push(child.clone());
            todo.push((child_path, child_file));
        }
        let doc = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        modules.push(Module {
            path,
            file,
            code,
            children,
            doc,
        });
    }
    modules
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The modules `module` refers to, each with the names it takes from it
/// (the path segment after the module, or `*` for a bare module path).
fn references(
    module: &Module,
    known: &BTreeSet<Vec<String>>,
) -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let mut out: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    let code = &module.code;
    // The module whose path `super` starts from: a `mod.rs` or `lib.rs`
    // file is the module itself, so `super` is its parent.
    let base = module.path.clone();
    for (at, _) in code.match_indices("::") {
        // The whole path this `::` belongs to: back to its first segment.
        let start = code[..at]
            .rfind(|c: char| !(is_ident(c) || c == ':'))
            .map_or(0, |i| i + 1);
        if code[start..at].contains("::") {
            continue; // not the first `::` of its path
        }
        let end = code[at..]
            .find(|c: char| {
                !(is_ident(c) || c == ':' || c == '{' || c == '}' || c == ',' || c == ' ')
            })
            .map_or(code.len(), |i| at + i);
        let path_text = &code[start..end];
        for path in expand(path_text) {
            let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let mut resolved: Vec<String> = match segs.first().copied() {
                Some("crate") => Vec::new(),
                Some("self") => base.clone(),
                Some("super") => {
                    let mut b = base.clone();
                    while segs.first() == Some(&"super") {
                        b.pop();
                        segs.remove(0);
                    }
                    segs.insert(0, "super");
                    b
                }
                _ => continue,
            };
            segs.remove(0);
            // The longest known module this path names.
            let mut target = resolved.clone();
            let mut taken = "*".to_string();
            for seg in &segs {
                resolved.push(seg.to_string());
                if known.contains(&resolved) {
                    target = resolved.clone();
                    taken = "*".to_string();
                } else {
                    taken = seg.to_string();
                    break;
                }
            }
            let related = target.starts_with(&module.path) || module.path.starts_with(&target);
            if !related {
                out.entry(target).or_default().insert(taken);
            }
        }
    }
    out
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e` (enough of `use`
/// trees for module paths).
fn expand(text: &str) -> Vec<String> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = text.find('{') else {
        return vec![text.trim_end_matches([',', '}']).to_string()];
    };
    let prefix = &text[..open];
    let mut depth = 0;
    let mut items = Vec::new();
    let mut item = String::new();
    for c in text[open + 1..].chars() {
        match c {
            '{' => {
                depth += 1;
                item.push(c);
            }
            '}' if depth == 0 => break,
            '}' => {
                depth -= 1;
                item.push(c);
            }
            ',' if depth == 0 => items.push(std::mem::take(&mut item)),
            _ => item.push(c),
        }
    }
    items.push(item);
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .flat_map(|i| expand(&format!("{prefix}{i}")))
        .collect()
}

fn name(path: &[String]) -> String {
    if path.is_empty() {
        "(crate root)".into()
    } else {
        path.join("::")
    }
}

/// Every cycle's modules, found by a depth-first search (each strongly
/// connected group of two or more modules once).
fn circles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    // Tarjan's strongly connected components.
    struct State<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                let Some((w, _)) = s.edges.get_key_value(w) else {
                    continue;
                };
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[v].min(s.low[w]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.low[v].min(s.index[w]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.push(w.clone());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.out.push(group);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn no_crate_has_an_import_circle() {
    let mut report = Vec::new();
    for krate in CRATES {
        let modules = load(&workspace().join(krate));
        let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
        let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
        let mut names: BTreeMap<(Vec<String>, Vec<String>), BTreeSet<String>> = BTreeMap::new();
        for m in &modules {
            let refs = references(m, &known);
            edges.entry(m.path.clone()).or_default();
            for (target, taken) in refs {
                edges
                    .entry(m.path.clone())
                    .or_default()
                    .insert(target.clone());
                names.insert((m.path.clone(), target), taken);
            }
        }
        for group in circles(&edges) {
            let mut lines = vec![format!(
                "{krate}: a circle of {}:",
                group.iter().map(|p| name(p)).collect::<Vec<_>>().join(", ")
            )];
            for ((from, to), taken) in &names {
                if group.contains(from) && group.contains(to) {
                    let taken: Vec<_> = taken.iter().map(String::as_str).collect();
                    lines.push(format!(
                        "  {} -> {}: {}",
                        name(from),
                        name(to),
                        taken.join(", ")
                    ));
                }
            }
            report.push(lines.join("\n"));
        }
    }
    assert!(report.is_empty(), "import circles:\n{}", report.join("\n"));
}

#[test]
fn every_module_is_named_in_its_layout() {
    let mut missing = Vec::new();
    for krate in CRATES {
        for m in load(&workspace().join(krate)) {
            let Some(at) = m.doc.find("# Layout") else {
                if m.path.is_empty() && !m.children.is_empty() {
                    missing.push(format!("{krate}: {} has no `# Layout`", m.file.display()));
                }
                continue;
            };
            let layout = &m.doc[at..];
            for child in &m.children {
                if !layout.contains(&format!("`{child}`")) {
                    missing.push(format!(
                        "{krate}: {}'s `# Layout` does not name `{child}`",
                        m.file.display()
                    ));
                }
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The checks themselves: a circle between two files is found with the
/// names that tie it; a child's reference to its parent is not a circle.
#[test]
fn the_circle_check_finds_a_circle_and_only_that() {
    let module = |path: &[&str], text: &str| Module {
        path: path.iter().map(|s| s.to_string()).collect(),
        file: PathBuf::new(),
        code: code_of(text),
        children: Vec::new(),
        doc: String::new(),
    };
    let modules = [
        module(&[], "pub mod a;\npub mod b;\npub mod c;\n"),
        module(
            &["a"],
            "use crate::b::{Thing, other::More};\n// crate::c::Comment\n",
        ),
        module(&["b"], "pub fn f() { crate::a::g(); }\n"),
        module(&["b", "other"], "use super::Thing;\n"),
        module(
            &["c"],
            "use crate::a;\n#[cfg(test)]\nmod tests { use crate::b::X; }\n",
        ),
    ];
    let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for m in &modules {
        let refs = references(m, &known);
        edges.insert(m.path.clone(), refs.keys().cloned().collect());
    }
    let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        edges[&v(&["a"])],
        BTreeSet::from([v(&["b"]), v(&["b", "other"])])
    );
    assert!(edges[&v(&["b", "other"])].is_empty(), "a child's parent");
    assert_eq!(
        edges[&v(&["c"])],
        BTreeSet::from([v(&["a"])]),
        "tests left out"
    );
    let found = circles(&edges);
    assert_eq!(found, vec![vec![v(&["a"]), v(&["b"])]]);
    let refs = references(&modules[1], &known);
    assert_eq!(refs[&v(&["b"])], BTreeSet::from(["Thing".to_string()]));
}
