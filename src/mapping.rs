//! `{{…}}` templates: step input mappings (`{{input.…}}`, `{{steps.<key>.output.…}}`), agent
//! request templates and template parameters (`{{params.…}}`), parsed and rendered against a
//! JSON scope.
//!
//! A placeholder holds a path: names separated by dots, with array positions written as a
//! number segment (`items.0.name`) or in brackets (`items[0].name`); spaces inside the braces
//! are ignored. Rendering follows one rule: a string that is exactly one placeholder becomes the
//! JSON value the path names, type kept (an object stays an object, a number a number); a
//! placeholder inside longer text becomes text (strings as they are, `null` as nothing, anything
//! else as compact JSON). Object keys are never rendered. A path that names nothing in the
//! scope is an error, never a silent `null`.
//! May call: nothing but serde_json.

use serde_json::Value;

/// A template that does not parse, or a path that names nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if location.is_empty() { String::new() } else { format!("{location}: ") })]
pub struct MappingError {
    /// Where in the template: a JSON path such as `body.items[2]`, empty for a whole text.
    pub location: String,
    pub message: String,
}

impl MappingError {
    fn new(location: &str, message: impl Into<String>) -> Self {
        Self { location: location.to_owned(), message: message.into() }
    }
}

/// One step of a placeholder's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// A parsed placeholder: its text between the braces (trimmed) and its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub text: String,
    pub segments: Vec<PathSegment>,
}

impl Reference {
    /// The first name of the path (`input`, `steps`, `params`).
    pub fn root(&self) -> Option<&str> {
        match self.segments.first() {
            Some(PathSegment::Key(key)) => Some(key),
            _ => None,
        }
    }

    /// The key of the `n`th segment, if that segment is a name.
    pub fn key_at(&self, position: usize) -> Option<&str> {
        match self.segments.get(position) {
            Some(PathSegment::Key(key)) => Some(key),
            _ => None,
        }
    }
}

/// A piece of a template text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(Reference),
}

/// Every placeholder of a JSON template with its location, parsing only.
pub fn references(template: &Value) -> Result<Vec<(String, Reference)>, MappingError> {
    let mut found = Vec::new();
    collect_references(template, "", &mut found)?;
    Ok(found)
}

/// Every placeholder of a text template.
pub fn text_references(template: &str) -> Result<Vec<Reference>, MappingError> {
    let parts = parse_text(template).map_err(|message| MappingError::new("", message))?;
    Ok(parts
        .into_iter()
        .filter_map(|part| match part {
            Part::Placeholder(reference) => Some(reference),
            Part::Literal(_) => None,
        })
        .collect())
}

/// Renders every string of a JSON template against `scope`.
pub fn render(template: &Value, scope: &Value) -> Result<Value, MappingError> {
    render_at(template, scope, "")
}

/// Renders a text template against `scope`; every placeholder becomes text.
pub fn render_text(template: &str, scope: &Value) -> Result<String, MappingError> {
    let parts = parse_text(template).map_err(|message| MappingError::new("", message))?;
    join_parts(&parts, scope, "")
}

/// The value a path names in `scope`, if any.
pub fn lookup<'scope>(scope: &'scope Value, segments: &[PathSegment]) -> Option<&'scope Value> {
    let mut current = scope;
    for segment in segments {
        current = match (segment, current) {
            (PathSegment::Key(key), Value::Object(object)) => object.get(key)?,
            (PathSegment::Index(index), Value::Array(items)) => items.get(*index)?,
            (PathSegment::Index(index), Value::Object(object)) => object.get(&index.to_string())?,
            _ => return None,
        };
    }
    Some(current)
}

fn collect_references(
    template: &Value,
    location: &str,
    found: &mut Vec<(String, Reference)>,
) -> Result<(), MappingError> {
    match template {
        Value::String(text) => {
            for part in parse_text(text).map_err(|message| MappingError::new(location, message))? {
                if let Part::Placeholder(reference) = part {
                    found.push((location.to_owned(), reference));
                }
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                collect_references(item, &format!("{location}[{index}]"), found)?;
            }
        }
        Value::Object(object) => {
            for (key, value) in object {
                collect_references(value, &child_location(location, key), found)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

fn render_at(template: &Value, scope: &Value, location: &str) -> Result<Value, MappingError> {
    match template {
        Value::String(text) => {
            let parts = parse_text(text).map_err(|message| MappingError::new(location, message))?;
            if let [Part::Placeholder(reference)] = parts.as_slice() {
                return resolve(reference, scope, location).cloned();
            }
            join_parts(&parts, scope, location).map(Value::String)
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| render_at(item, scope, &format!("{location}[{index}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(object) => {
            let mut rendered = serde_json::Map::with_capacity(object.len());
            for (key, value) in object {
                rendered
                    .insert(key.clone(), render_at(value, scope, &child_location(location, key))?);
            }
            Ok(Value::Object(rendered))
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(template.clone()),
    }
}

fn child_location(location: &str, key: &str) -> String {
    if location.is_empty() { key.to_owned() } else { format!("{location}.{key}") }
}

fn resolve<'scope>(
    reference: &Reference,
    scope: &'scope Value,
    location: &str,
) -> Result<&'scope Value, MappingError> {
    lookup(scope, &reference.segments).ok_or_else(|| {
        MappingError::new(location, format!("{{{{{}}}}} names nothing", reference.text))
    })
}

fn join_parts(parts: &[Part], scope: &Value, location: &str) -> Result<String, MappingError> {
    let mut text = String::new();
    for part in parts {
        match part {
            Part::Literal(literal) => text.push_str(literal),
            Part::Placeholder(reference) => match resolve(reference, scope, location)? {
                Value::String(value) => text.push_str(value),
                Value::Null => {}
                other => text.push_str(&other.to_string()),
            },
        }
    }
    Ok(text)
}

/// Splits a text into literals and placeholders. A `}}` without an opening `{{` is literal.
fn parse_text(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Literal(rest[..start].to_owned()));
        }
        let after_open = &rest[start + 2..];
        let Some(end) = after_open.find("}}") else {
            return Err("a {{ is never closed with }}".to_owned());
        };
        parts.push(Part::Placeholder(parse_reference(&after_open[..end])?));
        rest = &after_open[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_owned()));
    }
    Ok(parts)
}

fn parse_reference(inside: &str) -> Result<Reference, String> {
    let text = inside.trim();
    if text.is_empty() {
        return Err("an empty {{ }} placeholder".to_owned());
    }
    let mut segments = Vec::new();
    for name in text.split('.') {
        let (key, mut brackets) = match name.find('[') {
            Some(open) => (&name[..open], &name[open..]),
            None => (name, ""),
        };
        if key.is_empty() && (segments.is_empty() || brackets.is_empty()) {
            return Err(format!("{{{{{text}}}}} has an empty name in its path"));
        }
        if !key.is_empty() {
            if !key.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-') {
                return Err(format!(
                    "{{{{{text}}}}}: {key:?} may hold only letters, digits, _ and -"
                ));
            }
            segments.push(match key.parse::<usize>() {
                Ok(index) if key.chars().all(|c| c.is_ascii_digit()) => PathSegment::Index(index),
                _ => PathSegment::Key(key.to_owned()),
            });
        }
        while !brackets.is_empty() {
            let close =
                brackets.find(']').ok_or_else(|| format!("{{{{{text}}}}}: a [ is never closed"))?;
            let index = brackets[1..close].parse::<usize>().map_err(|_| {
                format!("{{{{{text}}}}}: [{}] is not an array position", &brackets[1..close])
            })?;
            segments.push(PathSegment::Index(index));
            brackets = &brackets[close + 1..];
            if !brackets.is_empty() && !brackets.starts_with('[') {
                return Err(format!(
                    "{{{{{text}}}}}: text after ] must start a new segment with ."
                ));
            }
        }
    }
    Ok(Reference { text: text.to_owned(), segments })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn scope() -> Value {
        json!({
            "input": { "name": "Ada", "count": 3, "tags": ["x", "y"], "nested": { "ok": true }, "none": null },
            "steps": { "fetch": { "output": { "items": [{ "id": 7 }, { "id": 8 }] } } },
        })
    }

    #[test]
    fn a_whole_placeholder_keeps_its_json_type() {
        let rendered = render(
            &json!({
                "count": "{{input.count}}",
                "nested": "{{ input.nested }}",
                "first": "{{steps.fetch.output.items.0.id}}",
                "second": "{{steps.fetch.output.items[1].id}}",
                "list": ["{{input.tags}}", 5, null],
                "none": "{{input.none}}",
            }),
            &scope(),
        )
        .expect("renders");
        assert_eq!(
            rendered,
            json!({
                "count": 3, "nested": { "ok": true }, "first": 7, "second": 8,
                "list": [["x", "y"], 5, null], "none": null,
            })
        );
    }

    #[test]
    fn embedded_placeholders_become_text() {
        let text = render_text(
            "Hi {{input.name}}, {{input.count}} items {{input.tags}} {{input.none}}!",
            &scope(),
        )
        .expect("renders");
        assert_eq!(text, r#"Hi Ada, 3 items ["x","y"] !"#);
        assert_eq!(render(&json!("n={{input.count}}"), &scope()).expect("renders"), json!("n=3"));
        assert_eq!(
            render_text("no placeholders }} here", &scope()).expect("renders"),
            "no placeholders }} here"
        );
    }

    #[test]
    fn a_missing_path_is_an_error_with_its_location() {
        let error = render(&json!({ "a": { "b": ["ok", "{{input.missing}}"] } }), &scope())
            .expect_err("missing");
        assert_eq!(error.location, "a.b[1]");
        assert!(error.message.contains("input.missing"), "{error}");
        assert!(render_text("{{steps.fetch.output.items.5}}", &scope()).is_err());
        assert!(render_text("{{input.name.first}}", &scope()).is_err(), "a key of a string");
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "{{input.name",
            "{{}}",
            "{{ }}",
            "{{input..name}}",
            "{{input.na me}}",
            "{{input[x]}}",
            "{{input[0}}",
            "{{.input}}",
        ] {
            assert!(text_references(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_are_listed_with_locations() {
        let found = references(&json!({
            "url": "https://x/{{input.id}}/{{steps.fetch.output.items[0].id}}",
            "list": [1, "{{params.size}}"],
        }))
        .expect("parses");
        let summary: Vec<(String, String, Option<String>)> = found
            .iter()
            .map(|(location, reference)| {
                (location.clone(), reference.text.clone(), reference.key_at(1).map(str::to_owned))
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("list[1]".to_owned(), "params.size".to_owned(), Some("size".to_owned())),
                ("url".to_owned(), "input.id".to_owned(), Some("id".to_owned())),
                (
                    "url".to_owned(),
                    "steps.fetch.output.items[0].id".to_owned(),
                    Some("fetch".to_owned())
                ),
            ]
        );
        assert_eq!(found[2].1.segments[4], PathSegment::Index(0));
        assert_eq!(found[0].1.root(), Some("params"));
    }
}

/// Properties over generated templates: the parser never panics, a placeholder path
/// round-trips through its text form, and rendering keeps the one rule of the module comment.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    /// A name that parses as a key, not as a position: letters, digits, `_` and `-`, not all
    /// digits.
    fn key_name() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_-]{0,8}"
    }

    fn path() -> impl Strategy<Value = Vec<PathSegment>> {
        let segment = prop_oneof![
            3 => key_name().prop_map(PathSegment::Key),
            1 => (0usize..4).prop_map(PathSegment::Index),
        ];
        (key_name(), proptest::collection::vec(segment, 0..5)).prop_map(|(root, rest)| {
            let mut segments = vec![PathSegment::Key(root)];
            segments.extend(rest);
            segments
        })
    }

    /// The text of a path, each position written as `.3` or `[3]` as `brackets` says.
    fn path_text(segments: &[PathSegment], brackets: &[bool]) -> String {
        let mut text = String::new();
        for (position, segment) in segments.iter().enumerate() {
            match segment {
                PathSegment::Key(key) => {
                    if position > 0 {
                        text.push('.');
                    }
                    text.push_str(key);
                }
                PathSegment::Index(index) if brackets.get(position).copied().unwrap_or(false) => {
                    text.push_str(&format!("[{index}]"));
                }
                PathSegment::Index(index) => text.push_str(&format!(".{index}")),
            }
        }
        text
    }

    /// The smallest scope in which `segments` names `value`.
    fn scope_holding(segments: &[PathSegment], value: Value) -> Value {
        segments.iter().rev().fold(value, |inner, segment| match segment {
            PathSegment::Key(key) => object(key, inner),
            PathSegment::Index(index) => {
                let mut items = vec![Value::Null; *index + 1];
                items[*index] = inner;
                Value::Array(items)
            }
        })
    }

    fn object(key: &str, value: Value) -> Value {
        Value::Object(serde_json::Map::from_iter([(key.to_owned(), value)]))
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z ]{0,8}".prop_map(Value::from),
        ]
    }

    /// Any JSON value, strings drawn from `text`.
    fn json_value(text: BoxedStrategy<String>) -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            text.prop_map(Value::from),
        ];
        scalar.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Literal text that cannot open a placeholder.
    fn literal() -> impl Strategy<Value = String> {
        "[^{]{0,12}"
    }

    proptest! {
        #[test]
        fn parsing_and_rendering_any_text_never_panics(text in any::<String>(), scope in json_value(any::<String>().boxed())) {
            let parsed = text_references(&text);
            let rendered = render_text(&text, &scope);
            if let Err(error) = &parsed {
                prop_assert!(!error.message.is_empty());
                prop_assert_eq!(rendered.as_ref().err(), Some(error), "render reports the parse error");
            }
            if let Err(error) = rendered {
                prop_assert!(!error.message.is_empty());
            }
        }

        #[test]
        fn text_without_an_opening_brace_pair_renders_as_itself(text in "[^{]*|[^{]*\\{[^{]*", scope in json_value("[a-z]{0,4}".boxed())) {
            prop_assert_eq!(text_references(&text), Ok(Vec::new()));
            prop_assert_eq!(render_text(&text, &scope), Ok(text.clone()));
            prop_assert_eq!(render(&Value::String(text.clone()), &scope), Ok(Value::String(text)));
        }

        #[test]
        fn a_path_round_trips_through_its_text(
            segments in path(),
            brackets in proptest::collection::vec(any::<bool>(), 6),
            padding in ("[ \t]{0,2}", "[ \t]{0,2}"),
        ) {
            let text = path_text(&segments, &brackets);
            let template = format!("{{{{{}{text}{}}}}}", padding.0, padding.1);
            let found = text_references(&template).expect("a generated path parses");
            prop_assert_eq!(found.len(), 1);
            prop_assert_eq!(&found[0].segments, &segments);
            prop_assert_eq!(&found[0].text, &text);
        }

        #[test]
        fn a_whole_placeholder_keeps_the_type_and_embedded_ones_become_text(
            segments in path(),
            value in leaf(),
            before in literal(),
            after in literal(),
        ) {
            let reference = path_text(&segments, &[]);
            let scope = scope_holding(&segments, value.clone());
            prop_assert_eq!(lookup(&scope, &segments), Some(&value));
            let whole = Value::String(format!("{{{{{reference}}}}}"));
            prop_assert_eq!(render(&whole, &scope), Ok(value.clone()));
            let as_text = match &value {
                Value::String(text) => text.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let embedded = format!("{before}{{{{ {reference} }}}}{after}");
            prop_assert_eq!(render_text(&embedded, &scope), Ok(format!("{before}{as_text}{after}")));
        }

        #[test]
        fn a_missing_path_is_an_error_at_its_location_never_a_null(
            segments in path(),
            keys in proptest::collection::vec("[a-z]{1,4}", 1..4),
        ) {
            let reference = path_text(&segments, &[]);
            let template = keys.iter().rev().fold(
                Value::String(format!("x {{{{{reference}}}}}")),
                |inner, key| object(key, inner),
            );
            let error = render(&template, &json!({})).expect_err("nothing to name");
            prop_assert_eq!(error.location, keys.join("."));
            prop_assert!(error.message.contains(&reference), "{}", error.message);
            let listed = references(&template).expect("parses");
            prop_assert_eq!(listed.len(), 1);
            prop_assert_eq!(&listed[0].0, &keys.join("."));
        }

        #[test]
        fn templates_without_placeholders_render_unchanged(template in json_value("[^{]{0,6}".boxed()), scope in json_value("[a-z]{0,4}".boxed())) {
            prop_assert_eq!(references(&template), Ok(Vec::new()));
            prop_assert_eq!(render(&template, &scope), Ok(template));
        }
    }
}
