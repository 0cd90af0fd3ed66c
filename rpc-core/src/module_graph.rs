//! A test that keeps rpc-core's top-level modules free of import cycles: it reads
//! the sources, finds which modules each one names through `crate::` paths (in
//! code, not comments), and fails on any cycle, printing it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 10, "modules found: {:?}", graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between rpc-core modules: {}\nthe graph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_checker_sees_grouped_paths_and_re_exports_and_finds_cycles() {
    let names: BTreeMap<String, String> = [("Error", "error"), ("Client", "client")]
        .map(|(name, module)| (name.to_owned(), module.to_owned()))
        .into();
    let modules: BTreeSet<String> = ["error", "client", "target", "wire"]
        .map(str::to_owned)
        .into();
    let code = "use crate::{\n    target::Target,\n    wire::{self, Reply},\n};\n\
                /// See [`crate::client`].\n\
                fn f() -> crate::Error { crate::Error::Closed }\n";
    let named = referenced(code, &modules, &names);
    assert_eq!(named, ["error", "target", "wire"].map(str::to_owned).into());

    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    graph.entry("c".into()).or_default();
    assert_eq!(find_cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&graph),
        Some(["a", "b", "c", "a"].map(str::to_owned).to_vec())
    );
}

/// Which top-level modules each top-level module names.
fn module_graph(src: &Path) -> Graph {
    let lib = read(&src.join("lib.rs"));
    let modules = declared_modules(&lib);
    let names = re_exports(&lib, &modules);
    let mut graph = Graph::new();
    // This test's own sources quote `crate::` paths in strings.
    for module in modules.iter().filter(|m| *m != "module_graph") {
        let from = module.as_str();
        let named = graph.entry(from.to_owned()).or_default();
        for file in files_of(src, module) {
            for to in referenced(&read(&file), &modules, &names) {
                if to != from {
                    named.insert(to);
                }
            }
        }
    }
    graph
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The names of the `mod x;` lines of lib.rs.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    code_lines(lib)
        .filter_map(|line| {
            let line = line.trim().strip_prefix("pub ").unwrap_or(line.trim());
            let name = line.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_owned())
        })
        .collect()
}

/// What lib.rs re-exports by name (`pub use client::{Client, RetryPolicy};`), so that
/// `crate::Client` counts as naming `client`.
fn re_exports(lib: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let code = code_lines(lib).collect::<Vec<_>>().join("\n");
    let mut names = BTreeMap::new();
    for statement in code.split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        if !modules.contains(module.trim()) {
            continue;
        }
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.trim().rsplit("::").next().unwrap_or("").trim();
            if !name.is_empty() {
                names.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    names
}

/// The source files of a top-level module: `x.rs`, or every file under `x/`.
fn files_of(src: &Path, module: &str) -> Vec<PathBuf> {
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut files = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs")
                // A module's tests may reach for test helpers anywhere in the crate.
                && path.file_name().is_some_and(|name| name != "tests.rs")
            {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "no source for module {module}");
    files
}

/// Lines that are not comments: a doc link names a module without importing it.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
}

/// The top-level modules `code` names through `crate::` paths, grouped
/// (`crate::{a, b::C}`) or not, and through the names lib.rs re-exports.
fn referenced(
    code: &str,
    modules: &BTreeSet<String>,
    names: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let code = code_lines(code).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    let mut resolve = |segment: &str| {
        let segment = segment.trim();
        if modules.contains(segment) {
            found.insert(segment.to_owned());
        } else if let Some(module) = names.get(segment) {
            found.insert(module.clone());
        }
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                for item in top_level_items(group) {
                    resolve(item.split("::").next().unwrap_or(""));
                }
            }
            None => resolve(leading_ident(rest)),
        }
    }
    found
}

/// The comma-separated items of a `{ ... }` group whose `{` was just passed, up to
/// its matching `}`.
fn top_level_items(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

fn leading_ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// A cycle, as the path that closes it (`a -> b -> a`), if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a Graph,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|n| n.to_string()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}
