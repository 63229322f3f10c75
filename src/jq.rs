//! jq programs as DATA agents write them: compiled by jaq with jq's standard library, less the
//! filters that would read the process's environment (`env`, `$ENV`) or write to its log
//! (`debug` and `stderr` are captured per run instead, `take_program_logs`); and the values
//! they run on, as JSON. Pure code shared by the service layer (which checks that a DATA
//! agent's program compiles before saving it) and the runner (which runs it).
//! May call: jaq, serde_json, `crate::text`.

use std::cell::RefCell;

use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::native::{self, Fun};
use jaq_core::{Compiler, RunPtr, ValT as _, data::JustLut};
use jaq_json::Val;
use serde_json::Value;

use crate::text::truncate_text;

pub type JqData = JustLut<Val>;
pub type JqProgram = jaq_core::Filter<JqData>;

/// Native jq filters of the standard library a DATA program may not use.
const FORBIDDEN_FILTERS: [&str; 3] = [
    // The runner's environment variables, API keys included.
    "env",
    // Replaced by `captured_log_filters`: the standard ones write to the runner's own log.
    "debug_empty",
    "stderr_empty",
];

/// Why `import` and `include` fail.
const IMPORTS_REFUSED: &str =
    "import and include are not allowed (a DATA program cannot read files)";

/// `debug` and `stderr` messages kept at most per run.
const MAX_PROGRAM_LOG_LINES: usize = 1000;

thread_local! {
    /// The `debug`/`stderr` messages of the program running on this thread.
    static PROGRAM_LOGS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn capture_log_line(line: String) {
    PROGRAM_LOGS.with(|logs| {
        let mut logs = logs.borrow_mut();
        if logs.len() < MAX_PROGRAM_LOG_LINES {
            logs.push(truncate_text(&line, 2000));
        }
    });
}

/// `debug` (as jq prints it: `["DEBUG:",<value>]`) and `stderr` (strings raw), kept for the
/// step's log instead of the runner's.
fn captured_log_filters() -> impl Iterator<Item = Fun<JqData>> {
    let debug: RunPtr<JqData> = |(_, value)| {
        capture_log_line(format!("[\"DEBUG:\",{value}]"));
        Box::new(core::iter::empty())
    };
    let stderr: RunPtr<JqData> = |(_, value)| {
        capture_log_line(match &value {
            Val::TStr(bytes) | Val::BStr(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            other => other.to_string(),
        });
        Box::new(core::iter::empty())
    };
    let filters: [native::Filter<RunPtr<JqData>>; 2] =
        [("debug_empty", native::v(0), debug), ("stderr_empty", native::v(0), stderr)];
    filters.into_iter().map(native::run::<JqData>)
}

/// Programs of at most this many bytes that compiled are remembered (`known_to_compile`).
const REMEMBERED_PROGRAM_BYTES: usize = 4 * 1024;

/// How many compiled programs are remembered; all are forgotten when that many are.
const REMEMBERED_PROGRAMS: usize = 1024;

fn compiled_programs() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static COMPILED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    COMPILED.get_or_init(Default::default)
}

/// Whether `program` is one `check_program` saw compile (a short one, recently): compiling
/// parses jq's standard library every time, most of what creating or saving a DATA agent
/// costs the server, and the same programs come back (duplicates, templates, edits of other
/// fields). Whether a text compiles depends on nothing but the text.
pub fn known_to_compile(program: &str) -> bool {
    compiled_programs().lock().is_ok_and(|compiled| compiled.contains(program))
}

/// Checks that a jq program compiles; the error says what is wrong and where.
pub fn check_program(program: &str) -> Result<(), String> {
    if known_to_compile(program) {
        return Ok(());
    }
    compile(program)?;
    if program.len() <= REMEMBERED_PROGRAM_BYTES
        && let Ok(mut compiled) = compiled_programs().lock()
    {
        if compiled.len() >= REMEMBERED_PROGRAMS {
            compiled.clear();
        }
        compiled.insert(program.to_owned());
    }
    Ok(())
}

pub fn compile(program: &str) -> Result<JqProgram, String> {
    let definitions = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
    let functions = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .filter(|(name, _, _)| !FORBIDDEN_FILTERS.contains(name))
        .chain(captured_log_filters());
    let loader = Loader::new(definitions);
    let arena = Arena::default();
    // A DATA program is self-contained: modules (`include`, `import "m" as m`) and data files
    // (`import "f" as $f`) would read the runner's file system, so both are refused here,
    // before anything is compiled or run.
    let loader = loader.with_read(|import: load::Import<&str, ()>| {
        Err(format!("`{}`: {IMPORTS_REFUSED}", truncate_text(import.path, 100)))
    });
    let modules = loader
        .load(&arena, File { code: program, path: () })
        .map_err(|errors| describe_load_errors(program, errors))?;
    load::import(&modules, |import| {
        Err(format!("`{}`: {IMPORTS_REFUSED}", truncate_text(import.path, 100)))
    })
    .map_err(|errors| describe_load_errors(program, errors))?;
    Compiler::default().with_funs(functions).compile(modules).map_err(|errors| {
        let described: Vec<String> = errors
            .into_iter()
            .flat_map(|(_file, undefined)| undefined)
            .map(|(name, undefined)| {
                format!(
                    "undefined {} `{name}` at character {}",
                    undefined.as_str(),
                    position(program, name)
                )
            })
            .collect();
        described.join("; ")
    })
}

fn describe_load_errors(program: &str, errors: load::Errors<&str, ()>) -> String {
    let mut described = Vec::new();
    for (_file, error) in errors {
        match error {
            load::Error::Io(failures) => {
                for (_path, message) in failures {
                    described.push(message);
                }
            }
            load::Error::Lex(failures) => {
                for (expected, found) in failures {
                    let expected = match expected {
                        load::lex::Expect::Digit => "a digit",
                        load::lex::Expect::Ident => "an identifier",
                        load::lex::Expect::Delim("(") => "a closing parenthesis",
                        load::lex::Expect::Delim("[") => "a closing bracket",
                        load::lex::Expect::Delim("{") => "a closing brace",
                        load::lex::Expect::Delim("\"") => "a closing quote",
                        load::lex::Expect::Escape => "a string escape sequence",
                        load::lex::Expect::Unicode => "a 4-digit hexadecimal code point",
                        _ => "a token",
                    };
                    described.push(format!(
                        "expected {expected} at character {}",
                        position(program, found)
                    ));
                }
            }
            load::Error::Parse(failures) => {
                for (expected, found) in failures {
                    let found_text = if found.is_empty() {
                        "the end of the program".to_owned()
                    } else {
                        format!("`{}`", truncate_text(found, 20))
                    };
                    described.push(format!(
                        "expected {} at character {}, found {found_text}",
                        expected.as_str(),
                        position(program, found)
                    ));
                }
            }
        }
    }
    if described.is_empty() {
        return "the program does not parse".to_owned();
    }
    described.join("; ")
}

/// Where `part` (a slice of `program`) starts, counted in characters from 1.
fn position(program: &str, part: &str) -> usize {
    let program_start = program.as_ptr() as usize;
    let part_start = part.as_ptr() as usize;
    if part_start < program_start || part_start > program_start + program.len() {
        return 0;
    }
    program[..part_start - program_start].chars().count() + 1
}

/// Forgets the `debug`/`stderr` messages captured on this thread.
pub fn clear_program_logs() {
    PROGRAM_LOGS.with(|logs| logs.borrow_mut().clear());
}

/// The `debug`/`stderr` messages the programs run on this thread wrote since the last call.
pub fn take_program_logs() -> Vec<String> {
    PROGRAM_LOGS.with(|logs| std::mem::take(&mut *logs.borrow_mut()))
}

/// A JSON value as jaq's value.
pub fn json_to_val(value: &Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(boolean) => Val::from(*boolean),
        Value::Number(number) => {
            match number.as_i64().and_then(|integer| isize::try_from(integer).ok()) {
                Some(integer) => Val::from(integer),
                None => Val::from(number.as_f64().unwrap_or(f64::NAN)),
            }
        }
        Value::String(text) => Val::from(text.clone()),
        Value::Array(items) => items.iter().map(json_to_val).collect(),
        Value::Object(fields) => {
            let pairs =
                fields.iter().map(|(key, field)| (Val::from(key.clone()), json_to_val(field)));
            // Building an object from string keys cannot fail.
            Val::from_map(pairs).unwrap_or(Val::Null)
        }
    }
}

/// A jaq value as JSON.
pub fn val_to_json(value: &Val) -> Value {
    match value {
        Val::Null => Value::Null,
        Val::Bool(boolean) => Value::Bool(*boolean),
        // Integers, big integers, floats and decimals print as JSON numbers; NaN and infinities
        // do not parse and become null, as in jq.
        Val::Num(_) => serde_json::from_str(&value.to_string()).unwrap_or(Value::Null),
        Val::TStr(bytes) | Val::BStr(bytes) => {
            Value::String(String::from_utf8_lossy(bytes).into_owned())
        }
        Val::Arr(items) => Value::Array(items.iter().map(val_to_json).collect()),
        Val::Obj(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, field)| {
                    let key_text = match key {
                        Val::TStr(bytes) | Val::BStr(bytes) => {
                            String::from_utf8_lossy(bytes).into_owned()
                        }
                        other => other.to_string(),
                    };
                    (key_text, val_to_json(field))
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_say_where() {
        let message = check_program(".a | ").unwrap_err();
        assert!(message.contains("expected"), "{message}");
        let message = check_program("nosuchfilter(1)").unwrap_err();
        assert!(message.contains("undefined filter `nosuchfilter`"), "{message}");
        let message = check_program("env.HOME").unwrap_err();
        assert!(message.contains("`env`"), "{message}");
        assert_eq!(check_program("{open: [.issues[] | select(.state == \"open\")]}"), Ok(()));
    }

    #[test]
    fn imports_and_includes_are_refused_before_anything_runs() {
        for program in [
            "import \"/etc/passwd\" as $f; $f",
            "import \"/etc/passwd\" as $f; .",
            "include \"/etc/passwd\"; .",
            "import \"lib\" as lib; lib::x",
        ] {
            let message = check_program(program).unwrap_err();
            assert!(message.contains("import and include are not allowed"), "{program}: {message}");
        }
        assert!(compile("import \"/etc/passwd\" as $f; $f").is_err());
        assert_eq!(check_program("def imported: 1; {imported: imported}"), Ok(()));
    }

    #[test]
    fn a_program_that_compiled_is_remembered_and_one_that_did_not_is_checked_again() {
        let good = "{remembered: (.a + 1)}";
        assert!(!known_to_compile(good));
        assert_eq!(check_program(good), Ok(()));
        assert!(known_to_compile(good));
        assert_eq!(check_program(good), Ok(()));
        let bad = "{forgotten: nosuchfilter_for_the_memo}";
        assert!(check_program(bad).is_err());
        assert!(!known_to_compile(bad));
        assert!(check_program(bad).unwrap_err().contains("nosuchfilter_for_the_memo"));
        let long = format!("{{long: \"{}\"}}", "x".repeat(REMEMBERED_PROGRAM_BYTES));
        assert!(long.len() > REMEMBERED_PROGRAM_BYTES);
        assert_eq!(check_program(&long), Ok(()));
        assert!(!known_to_compile(&long));
    }
}
