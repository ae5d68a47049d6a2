//! Import circles between a crate's files: which file's code names which
//! other file's module (`crate::a::b` paths, `use` trees included, and a
//! top-level `use super::...`), and whether any files reach each other
//! both ways. Doc comments and comments do not count, nor does a file's
//! own `mod` declarations (a parent holds its children; it is their use of
//! each other that makes a circle). A re-export in a `mod.rs` is followed
//! to the file that defines the item when the name says which.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// A module path (`["gap", "classify"]`; the crate root is empty).
type Module = Vec<String>;

/// The crates whose files must not import each other in a circle.
pub const CRATES: [&str; 2] = ["tracegap-agent", "lab"];

/// Every circle among `crate_dir/src`'s files: one way around it, its
/// files in order, then every file caught in it.
pub fn circles(crate_dir: &Path) -> anyhow::Result<Vec<(Vec<PathBuf>, Vec<PathBuf>)>> {
    let src = crate_dir.join("src");
    let files = rust_files(&src)?;
    let mut modules: BTreeMap<Module, PathBuf> = BTreeMap::new();
    for f in &files {
        modules.insert(module_of(&src, f), f.clone());
    }
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, f) in &modules {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let code = strip_comments(&text);
        let mut to = BTreeSet::new();
        for path in crate_paths(&code) {
            if let Some(t) = resolve(&modules, &path) {
                to.insert(t);
            }
        }
        for path in super_paths(&code) {
            let mut full: Module = m[..m.len().saturating_sub(1)].to_vec();
            full.extend(path);
            if let Some(t) = resolve(&modules, &full) {
                to.insert(t);
            }
        }
        to.remove(m);
        edges.insert(m.clone(), to);
    }
    let file = |m: &Module| {
        modules[m]
            .strip_prefix(crate_dir)
            .unwrap_or(&modules[m])
            .to_path_buf()
    };
    Ok(strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|mut c| {
            c.sort();
            (
                cycle_through(&edges, &c).iter().map(file).collect(),
                c.iter().map(file).collect(),
            )
        })
        .collect())
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(rust_files(&p)?);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut m: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        m.pop();
    }
    m
}

/// The code without comments (line, block and doc) or string literals'
/// contents, so a `crate::` in prose or a URL is not an import.
fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => {
                out.push('"');
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                out.push('"');
                i += 1;
            }
            // A char literal ('"', '\''), not a lifetime ('a).
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or(' ');
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// Every path that starts with `crate::`, `use` trees expanded.
fn crate_paths(code: &str) -> Vec<Module> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        tree(rest, Vec::new(), &mut out);
    }
    out
}

/// Top-level `use super::...` lines (not indented: inside an inline
/// module, `super` is the file itself).
fn super_paths(code: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("use super::") {
        let line_start = code[..i].rfind('\n').map_or(0, |n| n + 1);
        let lead = &code[line_start..i];
        if lead.is_empty() || lead == "pub " || lead == "pub(crate) " {
            tree(&code[i + "use super::".len()..], Vec::new(), &mut out);
        }
    }
    out
}

/// Reads a path or `{a::b, c}` tree at the start of `s` after `prefix`.
fn tree(s: &str, prefix: Module, out: &mut Vec<Module>) -> usize {
    let mut path = prefix;
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b.get(i) == Some(&b'{') {
            i += 1;
            loop {
                while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    return i + 1;
                }
                let used = tree(&s[i..], path.clone(), out);
                if used == 0 {
                    return i;
                }
                i += used;
            }
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i == start {
            break;
        }
        let ident = &s[start..i];
        if ident != "self" {
            path.push(ident.to_owned());
        }
        if s[i..].starts_with("::") {
            i += 2;
            continue;
        }
        break;
    }
    if !path.is_empty() {
        out.push(path);
    }
    i
}

/// The file module a path names: its longest prefix that is one.
fn resolve(modules: &BTreeMap<Module, PathBuf>, path: &Module) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains_key(p))
}

/// Tarjan's strongly connected components.
fn strongly_connected(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            let Some((w, _)) = s.edges.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut c = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                c.push(w.clone());
                if w == v {
                    break;
                }
            }
            s.out.push(c);
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

/// One circle through a component's files, for the message: from its
/// first file, the shortest way back to it.
fn cycle_through(edges: &BTreeMap<Module, BTreeSet<Module>>, component: &[Module]) -> Vec<Module> {
    let inside: BTreeSet<&Module> = component.iter().collect();
    let Some(first) = component.iter().min() else {
        return Vec::new();
    };
    // Breadth first from `first` back to it, within the component.
    let mut prev: BTreeMap<&Module, &Module> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([first]);
    while let Some(v) = queue.pop_front() {
        for w in edges.get(v).into_iter().flatten() {
            if !inside.contains(w) {
                continue;
            }
            if w == first {
                let mut path = vec![v.clone()];
                let mut at = v;
                while at != first {
                    at = prev[at];
                    path.push(at.clone());
                }
                path.reverse();
                path.push(first.clone());
                return path;
            }
            if let Some((w, _)) = edges.get_key_value(w)
                && !prev.contains_key(w)
            {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    component.to_vec()
}

/// `cargo xtask lint`'s step: fails on any circle, printing each.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let mut found = Vec::new();
    for c in CRATES {
        let show = |files: &[PathBuf], sep: &str| {
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(sep)
        };
        for (circle, all) in circles(&root.join(c))? {
            found.push(format!(
                "{c}: {} (caught in it: {})",
                show(&circle, " -> "),
                show(&all, ", ")
            ));
        }
    }
    if found.is_empty() {
        println!(
            "layers: no import circle between the files of {}",
            CRATES.join(", ")
        );
        return Ok(());
    }
    anyhow::bail!(
        "files that import each other in a circle (each module's types and config belong to it; the one below must not name the one above):\n  {}",
        found.join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_trees_and_inline_paths_are_read_and_prose_is_not() {
        let code = strip_comments(
            "use crate::{a::{b, c::D}, e};\n/// see [`crate::f`]\nfn x() { crate::g::h(); let s = \"crate::i\"; }\n",
        );
        let mut paths = crate_paths(&code);
        paths.sort();
        let p = |s: &str| -> Module { s.split("::").map(str::to_owned).collect() };
        assert_eq!(paths, [p("a::b"), p("a::c::D"), p("e"), p("g::h")]);
        assert_eq!(
            super_paths("use super::{x, y::Z};\nmod t {\n    use super::*;\n}\n"),
            [p("x"), p("y::Z")]
        );
    }

    #[test]
    fn a_circle_is_found_and_printed_in_order() {
        let dir = std::env::temp_dir().join(format!("tracegap-layers-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("b")).unwrap_or_default();
        let write = |f: &str, s: &str| std::fs::write(src.join(f), s);
        let written = [
            write("lib.rs", "pub mod a; pub mod b; pub mod c;"),
            write("a.rs", "use crate::b::{T, inner::V};"),
            write("b/mod.rs", "pub mod inner; pub struct T;"),
            write("b/inner.rs", "use crate::c::U; pub struct V;"),
            write("c.rs", "pub struct U; fn f() { crate::a::g(); }"),
        ];
        assert!(written.iter().all(Result::is_ok));
        let found = circles(&dir).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        let shown: Vec<Vec<String>> = found
            .iter()
            .map(|(c, _)| c.iter().map(|p| p.display().to_string()).collect())
            .collect();
        assert_eq!(
            shown,
            [["src/a.rs", "src/b/inner.rs", "src/c.rs", "src/a.rs"].map(str::to_owned)],
            "{found:?}"
        );
    }
}
