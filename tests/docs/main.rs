//! The documents under `docs/`, checked against the real thing so they cannot drift:
//! `docs/api.md`'s request/response examples are replayed against a fresh `turbocat dev`, and
//! `docs/schema.md`'s tables, columns and indexes are compared with freshly migrated PostgreSQL
//! and SQLite databases.

#[path = "../support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, Row};
use support::start_dev;

fn read_document(relative: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {relative}: {error}"))
}

// ---------------------------------------------------------------------------------------------
// docs/api.md
// ---------------------------------------------------------------------------------------------

/// One ```http block of docs/api.md: a request and the response it must get.
#[derive(Debug)]
struct Example {
    /// The line of the opening fence, for messages.
    line: usize,
    /// How many times the request is sent; the response shown is the last one's.
    repeat: usize,
    method: String,
    path: String,
    request_headers: Vec<(String, String)>,
    request_body: Option<String>,
    status: u16,
    response_headers: Vec<(String, String)>,
    response_body: Option<Value>,
}

/// The ```http blocks of a Markdown document, in order.
fn parse_examples(document: &str) -> Vec<Example> {
    let lines: Vec<&str> = document.lines().collect();
    let mut examples = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let Some(info) = lines[index].strip_prefix("```http") else {
            index += 1;
            continue;
        };
        let fence_line = index + 1;
        let repeat = info
            .split_whitespace()
            .find_map(|word| word.strip_prefix("repeat="))
            .map(|count| count.parse().expect("repeat=N is a number"))
            .unwrap_or(1);
        let mut block = Vec::new();
        index += 1;
        while index < lines.len() && !lines[index].starts_with("```") {
            block.push(lines[index]);
            index += 1;
        }
        index += 1;
        examples.push(parse_example(fence_line, repeat, &block));
    }
    examples
}

fn parse_header(line: &str, fence_line: usize) -> (String, String) {
    let (name, value) = line
        .split_once(':')
        .unwrap_or_else(|| panic!("docs/api.md:{fence_line}: `{line}` is not a header"));
    (name.trim().to_ascii_lowercase(), value.trim().to_owned())
}

fn parse_example(fence_line: usize, repeat: usize, block: &[&str]) -> Example {
    let context = |what: &str| format!("docs/api.md:{fence_line}: {what}");
    let mut lines = block.iter().copied().peekable();
    let request_line = lines.next().unwrap_or_else(|| panic!("{}", context("empty block")));
    let mut words = request_line.split_whitespace();
    let method = words.next().expect("method").to_owned();
    let path = words.next().unwrap_or_else(|| panic!("{}", context("no path"))).to_owned();

    let mut request_headers = Vec::new();
    while let Some(line) = lines.peek().copied() {
        if line.trim().is_empty() || line.starts_with("HTTP/") {
            break;
        }
        request_headers.push(parse_header(line, fence_line));
        lines.next();
    }
    let mut body_lines = Vec::new();
    for line in lines.by_ref() {
        if line.starts_with("HTTP/") {
            body_lines.push(line);
            break;
        }
        body_lines.push(line);
    }
    let status_line = body_lines.pop().filter(|line| line.starts_with("HTTP/"));
    let status_line =
        status_line.unwrap_or_else(|| panic!("{}", context("no `HTTP/1.1 <status>`")));
    let request_body = body_lines.join("\n").trim().to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("{}", context("bad status line")));

    let mut response_headers = Vec::new();
    while let Some(line) = lines.peek().copied() {
        if line.trim().is_empty() || line.starts_with('{') || line.starts_with('[') {
            break;
        }
        response_headers.push(parse_header(line, fence_line));
        lines.next();
    }
    let response_text: Vec<&str> = lines.collect();
    let response_text = response_text.join("\n");
    let response_body = if response_text.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&response_text).unwrap_or_else(|error| {
            panic!("{}", context(&format!("the response is not JSON: {error}")))
        }))
    };
    Example {
        line: fence_line,
        repeat,
        method,
        path,
        request_headers,
        request_body: (!request_body.is_empty()).then_some(request_body),
        status,
        response_headers,
        response_body,
    }
}

/// `$name` in a request replaced by what an earlier response captured; `<N × c>` by `c` repeated
/// `N` times (a body too large to print).
fn substitute(text: &str, variables: &HashMap<String, String>, line: usize) -> String {
    let characters: Vec<char> = text.chars().collect();
    let mut output = String::new();
    let mut index = 0;
    while index < characters.len() {
        let character = characters[index];
        if character == '$' {
            let start = index + 1;
            let mut end = start;
            while end < characters.len()
                && (characters[end].is_ascii_alphanumeric() || characters[end] == '_')
            {
                end += 1;
            }
            let name: String = characters[start..end].iter().collect();
            if !name.is_empty() {
                let value = variables.get(&name).unwrap_or_else(|| {
                    panic!("docs/api.md:{line}: ${name} is used before a response captured it")
                });
                output.push_str(value);
                index = end;
                continue;
            }
        }
        if character == '<'
            && let Some(close) = characters[index..].iter().position(|c| *c == '>')
        {
            let inner: String = characters[index + 1..index + close].iter().collect();
            if let Some((count, filler)) = inner.split_once(" × ")
                && let Ok(count) = count.parse::<usize>()
            {
                output.push_str(&filler.repeat(count));
                index += close + 1;
                continue;
            }
        }
        output.push(character);
        index += 1;
    }
    output
}

/// Whether `actual` has the shape and values `expected` shows: `"…"` stands for any value,
/// `"$name"` captures a string or number (or, once captured, must equal it), `"…": "…"` in an
/// object allows further keys, and a trailing `"…"` in an array allows further elements. Every
/// other key, element and value must be there and equal.
fn compare(
    expected: &Value,
    actual: &Value,
    path: &str,
    variables: &mut HashMap<String, String>,
    problems: &mut Vec<String>,
) {
    if let Value::String(text) = expected {
        if text == "…" {
            return;
        }
        if let Some(name) = text.strip_prefix('$')
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            let value = match actual {
                Value::String(value) => value.clone(),
                Value::Number(number) => number.to_string(),
                other => {
                    problems.push(format!("{path}: ${name} captures a string, got {other}"));
                    return;
                }
            };
            match variables.get(name) {
                Some(known) if *known != value => {
                    problems.push(format!("{path}: ${name} was {known}, now {value}"));
                }
                Some(_) => {}
                None => {
                    variables.insert(name.to_owned(), value);
                }
            }
            return;
        }
    }
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            let open = expected.get("…").is_some();
            for (key, expected_value) in expected.iter().filter(|(key, _)| *key != "…") {
                match actual.get(key) {
                    Some(actual_value) => compare(
                        expected_value,
                        actual_value,
                        &format!("{path}.{key}"),
                        variables,
                        problems,
                    ),
                    None => problems.push(format!("{path}.{key}: missing")),
                }
            }
            if !open {
                for key in actual.keys().filter(|key| !expected.contains_key(*key)) {
                    problems.push(format!("{path}.{key}: not in the example (add it or `\"…\"`)"));
                }
            }
        }
        (Value::Array(expected), Value::Array(actual)) => {
            let open = expected.last() == Some(&Value::String("…".to_owned()));
            let shown = if open { &expected[..expected.len() - 1] } else { &expected[..] };
            if actual.len() < shown.len() || (!open && actual.len() != shown.len()) {
                problems.push(format!(
                    "{path}: {} elements, the example shows {}{}",
                    actual.len(),
                    shown.len(),
                    if open { " or more" } else { "" }
                ));
            }
            for (position, (expected_value, actual_value)) in shown.iter().zip(actual).enumerate() {
                compare(
                    expected_value,
                    actual_value,
                    &format!("{path}[{position}]"),
                    variables,
                    problems,
                );
            }
        }
        (expected, actual) if expected == actual => {}
        (expected, actual) => problems.push(format!("{path}: expected {expected}, got {actual}")),
    }
}

async fn replay(
    http: &reqwest::Client,
    base_url: &str,
    example: &Example,
    variables: &mut HashMap<String, String>,
) -> Vec<String> {
    let path = substitute(&example.path, variables, example.line);
    let method: reqwest::Method = example.method.parse().expect("an HTTP method");
    let body = example.request_body.as_ref().map(|body| substitute(body, variables, example.line));
    let mut response = None;
    for _ in 0..example.repeat {
        let mut request = http.request(method.clone(), format!("{base_url}{path}"));
        for (name, value) in &example.request_headers {
            request = request.header(name, substitute(value, variables, example.line));
        }
        if let Some(body) = &body {
            request = request.body(body.clone());
        }
        response = Some(request.send().await.expect("send the example's request"));
    }
    let response = response.expect("repeat is at least 1");
    let mut problems = Vec::new();
    if response.status().as_u16() != example.status {
        problems.push(format!(
            "status {} (the example shows {})",
            response.status(),
            example.status
        ));
    }
    for (name, expected) in &example.response_headers {
        let actual = response.headers().get(name).and_then(|value| value.to_str().ok());
        match actual {
            Some(actual) => compare(
                &Value::String(expected.clone()),
                &Value::String(actual.to_owned()),
                &format!("header {name}"),
                variables,
                &mut problems,
            ),
            None => problems.push(format!("header {name}: missing")),
        }
    }
    let text = response.text().await.expect("response body");
    match &example.response_body {
        Some(expected) => match serde_json::from_str::<Value>(&text) {
            Ok(actual) => compare(expected, &actual, "body", variables, &mut problems),
            Err(_) => problems.push(format!("body is not JSON: {text}")),
        },
        None if !text.is_empty() => problems.push(format!("body {text}, the example shows none")),
        None => {}
    }
    if !problems.is_empty() {
        problems.insert(0, format!("the answer was: {text}"));
    }
    problems
}

/// The flags the examples' server runs with (docs/api.md names them where they matter).
const EXAMPLE_SERVER_FLAGS: &[&str] = &["--max-body-bytes", "65536"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_examples_match_a_live_server() {
    let document = read_document("docs/api.md");
    let examples = parse_examples(&document);
    assert!(examples.len() >= 20, "docs/api.md shows {} examples", examples.len());

    // Every error code of the API has a section of its own.
    for code in turbocat::error::ErrorCode::ALL {
        let heading = format!("### `{}`", code.as_str());
        assert!(document.contains(&heading), "docs/api.md has no `{heading}` section");
    }

    let (server, _directory) = start_dev(EXAMPLE_SERVER_FLAGS);
    let http =
        reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client");
    let mut variables = HashMap::new();
    let mut failures = Vec::new();
    for example in &examples {
        let problems = replay(&http, &server.base_url(), example, &mut variables).await;
        if !problems.is_empty() {
            failures.push(format!(
                "docs/api.md:{} {} {}:\n  {}",
                example.line,
                example.method,
                example.path,
                problems.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "examples that no longer hold:\n{}", failures.join("\n"));
}

#[test]
fn the_example_checker_can_fail() {
    let mut variables = HashMap::new();
    let mut problems = Vec::new();
    let expected: Value =
        serde_json::json!({"id": "$id", "role": "ADMIN", "list": [1, "…"], "meta": "…"});
    let actual = serde_json::json!({"id": "a", "role": "ADMIN", "list": [1, 2, 3], "meta": {}});
    compare(&expected, &actual, "body", &mut variables, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(variables.get("id").map(String::as_str), Some("a"));

    let drifted = serde_json::json!({"id": "b", "role": "USER", "list": [], "extra": 1, "meta": 1});
    compare(&expected, &drifted, "body", &mut variables, &mut problems);
    assert_eq!(
        problems,
        [
            "body.id: $id was a, now b",
            "body.list: 0 elements, the example shows 1 or more",
            "body.role: expected \"ADMIN\", got \"USER\"",
            "body.extra: not in the example (add it or `\"…\"`)",
        ]
    );
    assert_eq!(substitute("/a/$id?x=<3 × z>", &variables, 1), "/a/a?x=zzz");
}

// ---------------------------------------------------------------------------------------------
// docs/schema.md
// ---------------------------------------------------------------------------------------------

/// What docs/schema.md says: tables → columns (name → "type, null") and indexes (name →
/// definition), each index with a reason.
#[derive(Debug, Default, PartialEq)]
struct Schema {
    columns: BTreeMap<String, BTreeMap<String, String>>,
    indexes: BTreeMap<String, BTreeMap<String, String>>,
}

fn parse_schema_document(document: &str) -> Schema {
    let mut schema = Schema::default();
    let mut table: Option<String> = None;
    for (number, line) in document.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("### `") {
            let name = heading.trim_end_matches('`').to_owned();
            schema.columns.entry(name.clone()).or_default();
            schema.indexes.entry(name.clone()).or_default();
            table = Some(name);
            continue;
        }
        if line.starts_with("## ") {
            table = None;
            continue;
        }
        let Some(table) = &table else { continue };
        if let Some(row) = line.strip_prefix("| `") {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let column = cells[0].trim_end_matches('`').to_owned();
            let description = format!("{}, null {}", cells[1], cells[2]);
            schema.columns.entry(table.clone()).or_default().insert(column, description);
        } else if let Some(item) = line.strip_prefix("- `") {
            let (name, rest) = item.split_once('`').expect("an index name in backticks");
            let definition =
                rest.trim_start().strip_prefix("on `").and_then(|rest| rest.split_once('`')).map(
                    |(definition, reason)| (definition, reason.trim_start_matches(':').trim()),
                );
            let (definition, reason) = definition.unwrap_or_else(|| {
                panic!("docs/schema.md:{}: write `- `name` on `definition`: why`", number + 1)
            });
            assert!(!reason.is_empty(), "docs/schema.md:{}: say why {name} exists", number + 1);
            schema
                .indexes
                .entry(table.clone())
                .or_default()
                .insert(name.to_owned(), definition.to_owned());
        }
    }
    schema
}

async fn migrated_postgres_schema() -> Schema {
    let database = support::postgres().await;
    let mut connection = sqlx::PgConnection::connect(&database.url).await.expect("connect");
    let mut schema = Schema::default();
    let columns = sqlx::query(
        "SELECT table_name::text, column_name::text, udt_name::text, is_nullable::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("read information_schema.columns");
    for row in columns {
        let table: String = row.get(0);
        let nullable: String = row.get(3);
        let null = if nullable == "YES" { "yes" } else { "no" };
        schema
            .columns
            .entry(table.clone())
            .or_default()
            .insert(row.get::<String, _>(1), format!("{}, null {null}", row.get::<String, _>(2)));
        schema.indexes.entry(table).or_default();
    }
    let indexes = sqlx::query(
        "SELECT tablename::text, indexname::text, regexp_replace(indexdef, '^.* USING ', '') \
         FROM pg_indexes WHERE schemaname = 'public' AND tablename NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("read pg_indexes");
    for row in indexes {
        schema
            .indexes
            .entry(row.get::<String, _>(0))
            .or_default()
            .insert(row.get::<String, _>(1), row.get::<String, _>(2));
    }
    schema
}

/// The differences between two schemas, as sentences.
fn differences(documented: &Schema, migrated: &Schema) -> Vec<String> {
    let mut problems = Vec::new();
    let mut compare_maps =
        |kind: &str,
         documented: &BTreeMap<String, BTreeMap<String, String>>,
         migrated: &BTreeMap<String, BTreeMap<String, String>>| {
            let tables: BTreeSet<&String> = documented.keys().chain(migrated.keys()).collect();
            for table in tables {
                let empty = BTreeMap::new();
                let documented = documented.get(table).unwrap_or(&empty);
                let migrated = migrated.get(table).unwrap_or(&empty);
                let names: BTreeSet<&String> = documented.keys().chain(migrated.keys()).collect();
                for name in names {
                    match (documented.get(name), migrated.get(name)) {
                        (Some(_), None) => {
                            problems.push(format!("{kind} {table}.{name} is documented but absent"))
                        }
                        (None, Some(actual)) => problems.push(format!(
                            "{kind} {table}.{name} ({actual}) is missing from the doc"
                        )),
                        (Some(said), Some(actual)) if said != actual => problems.push(format!(
                            "{kind} {table}.{name}: the doc says `{said}`, the database `{actual}`"
                        )),
                        _ => {}
                    }
                }
            }
        };
    compare_maps("column", &documented.columns, &migrated.columns);
    compare_maps("index", &documented.indexes, &migrated.indexes);
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_document_matches_the_postgres_migrations() {
    let documented = parse_schema_document(&read_document("docs/schema.md"));
    let migrated = migrated_postgres_schema().await;
    assert!(migrated.columns.len() >= 20, "the migrations made {} tables", migrated.columns.len());
    let problems = differences(&documented, &migrated);
    assert!(problems.is_empty(), "docs/schema.md has drifted:\n{}", problems.join("\n"));

    // The checker itself notices a column, an index and a definition that drifted.
    let mut drifted = migrated;
    let users = drifted.columns.get_mut("users").expect("users");
    users.remove("email");
    users.insert("nickname".to_owned(), "text, null yes".to_owned());
    drifted
        .indexes
        .get_mut("users")
        .expect("users")
        .insert("users_email_unique".to_owned(), "btree (lower(email))".to_owned());
    assert_eq!(differences(&documented, &drifted).len(), 3);
}

/// SQLite has the same tables and columns (types differ: see docs/schema.md), and each of its
/// named indexes is one the document lists for PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_of_sqlite_has_the_documented_tables_columns_and_indexes() {
    let documented = parse_schema_document(&read_document("docs/schema.md"));
    let database = support::sqlite().await;
    let mut connection =
        sqlx::SqliteConnection::connect(&database.url).await.expect("connect sqlite");
    let columns = sqlx::query(
        "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE '\\_%' ESCAPE '\\' \
         AND m.name NOT LIKE 'sqlite%'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("read the sqlite tables");
    let sqlite_columns: BTreeSet<(String, String)> =
        columns.iter().map(|row| (row.get(0), row.get(1))).collect();
    let documented_columns: BTreeSet<(String, String)> = documented
        .columns
        .iter()
        .flat_map(|(table, columns)| columns.keys().map(|column| (table.clone(), column.clone())))
        .collect();
    let only_in_sqlite: Vec<_> = sqlite_columns.difference(&documented_columns).collect();
    let only_documented: Vec<_> = documented_columns.difference(&sqlite_columns).collect();
    assert!(
        only_in_sqlite.is_empty() && only_documented.is_empty(),
        "SQLite's columns differ from docs/schema.md: only in SQLite {only_in_sqlite:?}, \
         missing from SQLite {only_documented:?}"
    );

    let indexes = sqlx::query(
        "SELECT tbl_name, name FROM sqlite_master \
         WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("read the sqlite indexes");
    assert!(indexes.len() >= 50, "SQLite has {} named indexes", indexes.len());
    for row in indexes {
        let (table, name): (String, String) = (row.get(0), row.get(1));
        let known = documented.indexes.get(&table).is_some_and(|names| names.contains_key(&name));
        assert!(known, "SQLite index {table}.{name} is not in docs/schema.md");
    }
}
