//! DATA agents: a jq program (run by jaq, jq's standard library included) applied to the
//! step's input.
//!
//! The output is the program's single result; an array of the results when it yields several
//! (`.items[]` over three items gives a three-element array); `null` when it yields none
//! (`empty`). A program that does not compile, a run-time error (`error("…")`, `.a` on a
//! number) and `halt_error` fail without retry; `halt` ends the program with the results so
//! far. `env` and `$ENV` do not exist here: the runner's environment holds its secrets.
//! `debug` and `stderr` messages become the step's stderr log lines (at most 1,000), sent when
//! the program ends. Programs run on a thread of their own; results past `maxOutputBytes`, the
//! deadline or a cancel stop them between two results.
//! May call: jaq.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::native::{self, Fun};
use jaq_core::{Compiler, Ctx, RunPtr, ValT as _, Vars, data::JustLut};
use jaq_json::Val;
use serde_json::Value;
use tokio::sync::oneshot;

use super::{LogStream, RunContext, StepError, StepErrorKind, truncate_text};
use crate::proto::v1 as pb;

type JqData = JustLut<Val>;
type JqProgram = jaq_core::Filter<JqData>;

/// Native jq filters of the standard library a DATA program may not use.
const FORBIDDEN_FILTERS: [&str; 3] = [
    // The runner's environment variables, API keys included.
    "env",
    // Replaced by `captured_log_filters`: the standard ones write to the runner's own log.
    "debug_empty",
    "stderr_empty",
];

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

/// Stack of the thread a program runs on: deep (non-tail) recursion in jq recurses in Rust.
const PROGRAM_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Checks that a jq program compiles; the error says what is wrong and where.
pub fn check_program(program: &str) -> Result<(), String> {
    compile(program).map(|_| ())
}

fn compile(program: &str) -> Result<JqProgram, String> {
    let definitions = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
    let functions = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .filter(|(name, _, _)| !FORBIDDEN_FILTERS.contains(name))
        .chain(captured_log_filters());
    let loader = Loader::new(definitions);
    let arena = Arena::default();
    let modules = loader
        .load(&arena, File { code: program, path: () })
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
                for (path, message) in failures {
                    described.push(format!("cannot load module `{path}`: {message}"));
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

pub(super) async fn run(
    config: &pb::DataAgentConfig,
    input: Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (result_sender, result_receiver) = oneshot::channel();
    let program = config.jq_program.clone();
    let max_output_bytes = context.limits.max_output_bytes;
    let thread_stop = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("turbocat-jq".to_owned())
        .stack_size(PROGRAM_STACK_BYTES)
        .spawn(move || {
            PROGRAM_LOGS.with(|logs| logs.borrow_mut().clear());
            let outcome = run_program(&program, &input, max_output_bytes, &thread_stop);
            let log_lines = PROGRAM_LOGS.with(|logs| std::mem::take(&mut *logs.borrow_mut()));
            // The receiver is gone when the attempt timed out or was cancelled.
            let _ = result_sender.send((outcome, log_lines));
        })
        .map_err(|error| StepError::retryable(format!("cannot start the jq thread: {error}")))?;
    let finished = context
        .guard(async {
            result_receiver
                .await
                .map_err(|_| StepError::retryable("the jq thread ended without result"))
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let (outcome, log_lines) = finished?;
    for line in &log_lines {
        context.logs.send(LogStream::Stderr, line).await;
    }
    outcome
}

fn run_program(
    program: &str,
    input: &Value,
    max_output_bytes: usize,
    stop: &AtomicBool,
) -> Result<Value, StepError> {
    let filter = compile(program).map_err(|message| {
        StepError::non_retryable(format!("the jq program does not compile: {message}"))
    })?;
    let context = Ctx::<JqData>::new(&filter.lut, Vars::new([]));
    let mut results = Vec::new();
    let mut output_bytes = 0usize;
    for result in filter.id.run((context, json_to_val(input))) {
        if stop.load(Ordering::Relaxed) {
            return Err(StepError::cancelled());
        }
        let value = match result {
            Ok(value) => val_to_json(&value),
            Err(exception) => match exception.get_err() {
                Ok(error) => {
                    return Err(StepError::non_retryable(format!(
                        "the jq program failed: {}",
                        truncate_text(&error.to_string(), 1000)
                    )));
                }
                Err(other) => match other.get_halt() {
                    Ok(0) => break,
                    Ok(code) => {
                        return Err(StepError::non_retryable(format!(
                            "the jq program halted with exit code {code}"
                        )));
                    }
                    Err(_) => return Err(StepError::non_retryable("the jq program failed")),
                },
            },
        };
        output_bytes += serde_json::to_vec(&value).map(|bytes| bytes.len()).unwrap_or(0) + 1;
        if output_bytes > max_output_bytes {
            return Err(StepError::new(
                StepErrorKind::LimitExceeded,
                format!("the jq program's results exceed the limit of {max_output_bytes} bytes"),
            ));
        }
        results.push(value);
    }
    Ok(match results.len() {
        0 => Value::Null,
        1 => results.pop().unwrap_or(Value::Null),
        _ => Value::Array(results),
    })
}

fn json_to_val(value: &Value) -> Val {
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

fn val_to_json(value: &Val) -> Value {
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
    use serde_json::json;

    use super::*;

    fn run_now(program: &str, input: Value) -> Result<Value, StepError> {
        run_program(program, &input, 1 << 20, &AtomicBool::new(false))
    }

    #[test]
    fn values_survive_the_round_trip_through_jaq() {
        let input = json!({"a": [1, -2, 3.5, "x", null, true, {"b": 12345678901234i64}]});
        assert_eq!(run_now(".", input.clone()), Ok(input));
        assert_eq!(run_now("1 / 3 | . * 3", json!(null)), Ok(json!(1.0)));
        assert_eq!(run_now("nan", json!(null)), Ok(Value::Null));
    }

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
    fn halt_ends_the_program_and_halt_error_fails_it() {
        assert_eq!(run_now("1, halt, 2", json!(null)), Ok(json!(1)));
        let error = run_now("\"bad\" | halt_error(3)", json!(null)).unwrap_err();
        assert_eq!(error.kind, StepErrorKind::NonRetryable);
    }
}
