//! The house rules, executable: which top-level module of `src/` may use which. Each rule is a
//! row of `RULES`; every `crate::…` path (in `use` lines, grouped `use crate::{…}` imports and
//! inline paths) and every `super::…` path that climbs out of its module is checked against it,
//! and a break is reported with its file and line. Each module's `//! May call:` sentence must
//! name every module its row allows, so the prose and the table cannot drift apart.
//!
//! To change a rule, change the row and the sentence together, in the same commit; the README's
//! architecture section shows this table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every top-level module of the library and what it may use. `main` (the binary) may use
/// anything and is not listed; no module may use `server`.
const RULES: &[(&str, &[&str])] = &[
    // Below everything: pure code the server and the runner share.
    ("text", &[]),
    ("mapping", &[]),
    ("outage", &[]),
    ("jq", &["text"]),
    ("store", &[]),
    ("error", &["store"]),
    ("proto", &["error"]),
    ("redis_pool", &[]),
    ("ssrf", &[]),
    // Seams: queue and bus know nothing of the store, the engine or proto.
    ("queue", &["redis_pool"]),
    ("bus", &["redis_pool"]),
    ("config", &["auth", "engine", "runner"]),
    ("auth", &["bus", "config", "error", "outage", "redis_pool", "store"]),
    ("engine", &["bus", "error", "mapping", "outage", "proto", "queue", "redis_pool", "store"]),
    // The runner program reaches the server only through the proto.
    ("runner", &["jq", "mapping", "proto", "ssrf", "text"]),
    ("app", &["auth", "bus", "config", "engine", "queue", "store"]),
    (
        "service",
        &[
            "app", "auth", "bus", "engine", "error", "jq", "mapping", "outage", "proto", "queue",
            "ssrf", "store",
        ],
    ),
    ("api", &["app", "auth", "engine", "error", "proto", "service", "store"]),
    ("seed", &["auth", "config", "store"]),
    // The fuzz targets' bodies call the code they fuzz; only the fuzz crate calls them.
    ("fuzzing", &["api", "engine", "error", "mapping", "proto", "runner", "service", "store"]),
    (
        "server",
        &[
            "api",
            "app",
            "auth",
            "bus",
            "config",
            "engine",
            "queue",
            "redis_pool",
            "runner",
            "seed",
            "service",
            "store",
        ],
    ),
];

/// One use of a module that its rule does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{}:{}: `{}` may not use `{}` (see RULES in tests/architecture/main.rs)",
            self.file, self.line, self.from, self.to
        )
    }
}

fn allowed(module: &str) -> Option<&'static [&'static str]> {
    RULES.iter().find(|(name, _)| *name == module).map(|(_, allowed)| *allowed)
}

/// The module path of a file below `src/`: `engine/attached_runners.rs` is
/// `["engine", "attached_runners"]`, `engine/mod.rs` is `["engine"]`, `lib.rs` is `[]`.
fn module_path(relative: &str) -> Vec<String> {
    let without_extension = relative.trim_end_matches(".rs");
    let mut parts: Vec<String> = without_extension.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|last| last == "mod" || last == "lib") {
        parts.pop();
    }
    parts
}

/// The source with comments, string literals and character literals blanked out (newlines
/// kept, so line numbers stay right).
fn code_only(source: &str) -> String {
    let characters: Vec<char> = source.chars().collect();
    let mut output = String::with_capacity(source.len());
    let mut index = 0;
    let blank = |character: char| if character == '\n' { '\n' } else { ' ' };
    while index < characters.len() {
        let current = characters[index];
        let next = characters.get(index + 1).copied().unwrap_or('\0');
        if current == '/' && next == '/' {
            while index < characters.len() && characters[index] != '\n' {
                output.push(' ');
                index += 1;
            }
        } else if current == '/' && next == '*' {
            let mut depth = 0;
            while index < characters.len() {
                if characters[index] == '/' && characters.get(index + 1) == Some(&'*') {
                    depth += 1;
                    output.push_str("  ");
                    index += 2;
                } else if characters[index] == '*' && characters.get(index + 1) == Some(&'/') {
                    depth -= 1;
                    output.push_str("  ");
                    index += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    output.push(blank(characters[index]));
                    index += 1;
                }
            }
        } else if current == 'r'
            && (next == '#' || next == '"')
            && !is_identifier_tail(&characters, index)
        {
            // A raw string: r"…", r#"…"#, r##"…"##.
            let mut hashes = 0;
            let mut cursor = index + 1;
            while characters.get(cursor) == Some(&'#') {
                hashes += 1;
                cursor += 1;
            }
            if characters.get(cursor) != Some(&'"') {
                output.push(current);
                index += 1;
                continue;
            }
            cursor += 1;
            let closing: String =
                std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            while cursor < characters.len() {
                let rest: String = characters
                    [cursor..(cursor + closing.len()).min(characters.len())]
                    .iter()
                    .collect();
                if rest == closing {
                    cursor += closing.len();
                    break;
                }
                cursor += 1;
            }
            for character in &characters[index..cursor] {
                output.push(blank(*character));
            }
            index = cursor;
        } else if current == '"' {
            output.push(' ');
            index += 1;
            while index < characters.len() && characters[index] != '"' {
                if characters[index] == '\\' {
                    output.push(' ');
                    index += 1;
                }
                if index < characters.len() {
                    output.push(blank(characters[index]));
                    index += 1;
                }
            }
            output.push(' ');
            index += 1;
        } else if current == '\'' && (characters.get(index + 2) == Some(&'\'') || next == '\\') {
            // A character literal ('"', '\''); lifetimes ('a) have no closing quote here.
            let end = if next == '\\' {
                characters[index + 2..]
                    .iter()
                    .position(|&character| character == '\'')
                    .map(|at| index + 3 + at)
            } else {
                Some(index + 3)
            };
            let end = end.unwrap_or(index + 1).min(characters.len());
            for _ in index..end {
                output.push(' ');
            }
            index = end;
        } else {
            output.push(current);
            index += 1;
        }
    }
    output
}

fn is_identifier_tail(characters: &[char], index: usize) -> bool {
    index > 0 && (characters[index - 1].is_alphanumeric() || characters[index - 1] == '_')
}

fn identifier_at(text: &str, start: usize) -> &str {
    let end = text[start..]
        .find(|character: char| !(character.is_alphanumeric() || character == '_'))
        .map_or(text.len(), |offset| start + offset);
    &text[start..end]
}

/// The top-level modules a file's code names, each with its line.
fn references(relative: &str, source: &str) -> Vec<(usize, String)> {
    let module = module_path(relative);
    let code = code_only(source);
    let mut found = Vec::new();
    for (line_index, line) in code.lines().enumerate() {
        let line_number = line_index + 1;
        let mut search_from = 0;
        while let Some(offset) = line[search_from..].find("crate::") {
            let start = search_from + offset;
            search_from = start + "crate::".len();
            if start > 0
                && line[..start]
                    .ends_with(|character: char| character.is_alphanumeric() || character == '_')
            {
                continue;
            }
            let rest = &line[search_from..];
            if rest.starts_with('{') {
                // use crate::{a, b::c, d::{e, f}}: the first segment of each top-level item.
                let mut depth = 0;
                let mut item_start = true;
                for (position, character) in rest.char_indices() {
                    match character {
                        '{' => {
                            depth += 1;
                            if depth == 1 {
                                item_start = true;
                                continue;
                            }
                        }
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        ',' if depth == 1 => {
                            item_start = true;
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 1 && item_start && (character.is_alphanumeric() || character == '_')
                    {
                        found.push((line_number, identifier_at(rest, position).to_owned()));
                        item_start = false;
                    }
                }
            } else {
                let name = identifier_at(rest, 0);
                if !name.is_empty() {
                    found.push((line_number, name.to_owned()));
                }
            }
        }
        // super::super::x from a nested module can leave its top-level module.
        let mut search_from = 0;
        while let Some(offset) = line[search_from..].find("super::") {
            let start = search_from + offset;
            if start > 0
                && line[..start].ends_with(|character: char| {
                    character.is_alphanumeric() || character == '_' || character == ':'
                })
            {
                search_from = start + "super::".len();
                continue;
            }
            let mut cursor = start;
            let mut current = module.clone();
            while line[cursor..].starts_with("super::") {
                current.pop();
                cursor += "super::".len();
            }
            search_from = cursor;
            if current.is_empty() {
                let name = identifier_at(line, cursor);
                if !name.is_empty() && name != "self" {
                    found.push((line_number, name.to_owned()));
                }
            }
        }
    }
    found
}

/// Every break of `RULES` among `files` (paths relative to `src/`, with their text).
fn violations(files: &[(String, String)]) -> Vec<Violation> {
    let mut broken = Vec::new();
    for (relative, source) in files {
        let module = module_path(relative);
        let Some(from) = module.first() else { continue };
        if from == "main" {
            continue;
        }
        let permitted = allowed(from).unwrap_or(&[]);
        for (line, to) in references(relative, source) {
            let is_top_level_module = RULES.iter().any(|(name, _)| *name == to);
            if to == *from || !is_top_level_module || permitted.contains(&to.as_str()) {
                continue;
            }
            broken.push(Violation {
                file: format!("src/{relative}"),
                line,
                from: from.clone(),
                to,
            });
        }
    }
    broken
}

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn read_tree(root: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).expect("read src") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let relative = path
                    .strip_prefix(root)
                    .expect("below src")
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push((relative, std::fs::read_to_string(&path).expect("read source")));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_module_keeps_to_its_rule() {
    let files = read_tree(&source_root());
    assert!(files.len() > 50, "the tree under src/ was read ({} files)", files.len());
    let broken = violations(&files);
    let report: Vec<String> = broken.iter().map(ToString::to_string).collect();
    assert!(report.is_empty(), "the house rules are broken:\n{}", report.join("\n"));
}

#[test]
fn every_top_level_module_has_a_rule_and_nobody_uses_the_server() {
    let library = std::fs::read_to_string(source_root().join("lib.rs")).expect("read lib.rs");
    let declared: BTreeSet<String> = library
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod "))
        .map(|name| name.trim_end_matches(';').to_owned())
        .collect();
    let ruled: BTreeSet<String> = RULES.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(declared, ruled, "src/lib.rs and RULES must list the same modules");
    for (name, permitted) in RULES {
        assert!(!permitted.contains(&"server"), "`{name}` may not use `server`: only main does");
        assert!(!permitted.contains(name), "`{name}` lists itself");
    }
}

#[test]
fn every_may_call_sentence_names_what_its_rule_allows() {
    let root = source_root();
    for (name, permitted) in RULES {
        let file = [root.join(format!("{name}.rs")), root.join(name).join("mod.rs")]
            .into_iter()
            .find(|path| path.exists())
            .unwrap_or_else(|| panic!("no source for `{name}`"));
        let text = std::fs::read_to_string(&file).expect("read module");
        let header: String = text
            .lines()
            .take_while(|line| line.starts_with("//!"))
            .map(|line| line.trim_start_matches("//!").trim())
            .collect::<Vec<_>>()
            .join(" ");
        let sentence = header
            .find("May call:")
            .map(|at| &header[at..])
            .unwrap_or_else(|| panic!("{}: no `May call:` sentence", file.display()));
        for other in *permitted {
            let spoken = other.replace('_', " ");
            assert!(
                sentence.contains(other) || sentence.contains(&spoken),
                "{}: its `May call:` sentence does not name `{other}`, which RULES allows: {sentence}",
                file.display()
            );
        }
    }
}

#[test]
fn a_break_is_reported_with_its_file_and_line() {
    let fixture = vec![
        (
            "engine/bad.rs".to_owned(),
            "//! crate::service in a comment is fine.\nuse crate::store::Store;\nuse crate::service::executions;\n"
                .to_owned(),
        ),
        (
            "runner/executors/worse.rs".to_owned(),
            "use crate::{mapping, store::Store};\nfn f() { let text = \"crate::engine\"; super::super::super::engine::x(); }\n"
                .to_owned(),
        ),
        ("store/ok.rs".to_owned(), "use super::Store;\nuse crate::store::PageRequest;\n".to_owned()),
        ("queue/uses_server.rs".to_owned(), "fn f() { crate::server::run(); }\n".to_owned()),
    ];
    let broken: Vec<String> = violations(&fixture).iter().map(ToString::to_string).collect();
    assert_eq!(
        broken,
        vec![
            "src/engine/bad.rs:3: `engine` may not use `service` (see RULES in tests/architecture/main.rs)",
            "src/runner/executors/worse.rs:1: `runner` may not use `store` (see RULES in tests/architecture/main.rs)",
            "src/runner/executors/worse.rs:2: `runner` may not use `engine` (see RULES in tests/architecture/main.rs)",
            "src/queue/uses_server.rs:1: `queue` may not use `server` (see RULES in tests/architecture/main.rs)",
        ]
    );
}
