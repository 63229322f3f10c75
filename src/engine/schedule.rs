//! Cron schedules of deployments: standard 5-field expressions (or 6 with seconds) in an IANA
//! time zone, validated and turned into the next run time.
//! May call: croner and chrono-tz (pure computation, no I/O).

use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use chrono_tz::Tz;

/// The time zone of a schedule that names none.
pub const DEFAULT_TIMEZONE: &str = "UTC";
/// The longest cron expression accepted.
pub const MAX_EXPRESSION_CHARS: usize = 200;

/// A parsed cron expression and the time zone its fields are read in.
#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    timezone: Tz,
    cron: croner::Cron,
}

/// Why a schedule was refused, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The expression is malformed; the message says what is wrong.
    #[error("{0}")]
    Expression(String),
    /// The time zone is not an IANA name.
    #[error("{0}")]
    Timezone(String),
}

impl Schedule {
    /// Parses `expression` (5 fields: minute hour day-of-month month day-of-week, or 6 with
    /// seconds first) read in `timezone` (an IANA name such as `Europe/Paris`; empty means UTC).
    /// Both are checked, so a caller can report the two problems at once with `check`.
    pub fn parse(expression: &str, timezone: &str) -> Result<Self, ScheduleError> {
        let cron = parse_expression(expression)?;
        let timezone = parse_timezone(timezone)?;
        Ok(Self { expression: expression.trim().to_owned(), timezone, cron })
    }

    /// The expression as given (trimmed).
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The IANA name of the time zone.
    pub fn timezone(&self) -> &str {
        self.timezone.name()
    }
}

/// Checks an expression and a time zone separately: `(expression problem, time zone problem)`.
/// An expression that can never fire (such as February 30) is a problem too.
pub fn check(expression: &str, timezone: &str) -> (Option<String>, Option<String>) {
    let expression_problem = match parse_expression(expression) {
        Err(error) => Some(error.to_string()),
        Ok(cron) => {
            // croner searches up to the year 5000 for a match: from now, an expression that
            // never fires took seconds of CPU (found by the cron fuzz target). The calendar
            // repeats every 400 years and any date that exists at all (even February 29 on a
            // Monday) recurs within 40, so a search over the last 50 years croner knows finds a
            // fire exactly when there is one, at a fraction of the cost.
            let probe = Tz::UTC.with_ymd_and_hms(NEVER_FIRES_PROBE_YEAR, 1, 1, 0, 0, 0).single();
            let fires = probe.is_some_and(|probe| cron.find_next_occurrence(&probe, false).is_ok());
            (!fires).then(|| "never fires: no date matches every field".to_owned())
        }
    };
    let timezone_problem = parse_timezone(timezone).err().map(|error| error.to_string());
    (expression_problem, timezone_problem)
}

/// Where `check` looks for a fire time: 50 years before croner's last year (see `check`).
const NEVER_FIRES_PROBE_YEAR: i32 = croner::YEAR_UPPER_LIMIT - 50;

/// Fire times sampled to find a schedule's shortest interval (`shortest_interval`).
const INTERVAL_SAMPLES: usize = 1_000;

/// The shortest time between two consecutive fires among the next `INTERVAL_SAMPLES` after
/// `instant`; `None` when it fires at most once more.
pub fn shortest_interval(schedule: &Schedule, instant: DateTime<Utc>) -> Option<chrono::Duration> {
    let mut previous = next_after(schedule, instant)?;
    let mut shortest: Option<chrono::Duration> = None;
    for _ in 1..INTERVAL_SAMPLES {
        let Some(next) = next_after(schedule, previous) else { break };
        let gap = next - previous;
        shortest = Some(shortest.map_or(gap, |known| known.min(gap)));
        previous = next;
    }
    shortest
}

/// The first fire time strictly after `instant`, on a whole second, or `None` when the
/// schedule never fires again.
pub fn next_after(schedule: &Schedule, instant: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // croner keeps the fraction of a second it is given: from 10:00:00.4 the next "every
    // second" would be 10:00:01.4. Fire times are whole seconds, and a whole second after the
    // truncated instant is also after the instant itself.
    let whole_second = instant.trunc_subsecs(0).with_timezone(&schedule.timezone);
    schedule
        .cron
        .find_next_occurrence(&whole_second, false)
        .ok()
        .map(|next| next.with_timezone(&Utc).trunc_subsecs(0))
}

fn parse_expression(expression: &str) -> Result<croner::Cron, ScheduleError> {
    let trimmed = expression.trim();
    if trimmed.is_empty() {
        return Err(ScheduleError::Expression("is required".to_owned()));
    }
    if trimmed.chars().count() > MAX_EXPRESSION_CHARS {
        return Err(ScheduleError::Expression(format!(
            "must be at most {MAX_EXPRESSION_CHARS} characters"
        )));
    }
    let field_count = trimmed.split_whitespace().count();
    // croner takes `1,,2` or a lone `,` as a list (found by the cron fuzz target: `0 2 , 2 *`
    // parsed, and never fired).
    if trimmed.split_whitespace().any(|field| field.split(',').any(str::is_empty)) {
        return Err(ScheduleError::Expression(
            "is not a valid cron expression: a list has an empty item".to_owned(),
        ));
    }
    if !trimmed.starts_with('@') && !(5..=6).contains(&field_count) {
        return Err(ScheduleError::Expression(format!(
            "must have 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds \
             first, not {field_count}"
        )));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|error| ScheduleError::Expression(describe_cron_error(&error)))
}

/// croner's messages, in our lowercase style.
fn describe_cron_error(error: &croner::errors::CronError) -> String {
    use croner::errors::CronError;
    let detail = match error {
        CronError::EmptyPattern => return "is required".to_owned(),
        CronError::InvalidPattern(message)
        | CronError::IllegalCharacters(message)
        | CronError::ComponentError(message) => message.clone(),
        other => other.to_string(),
    };
    let detail = detail.trim_end_matches('.');
    let mut characters = detail.chars();
    let lowercased = match characters.next() {
        Some(first) => first.to_lowercase().chain(characters).collect::<String>(),
        None => String::new(),
    };
    format!("is not a valid cron expression: {lowercased}")
}

fn parse_timezone(timezone: &str) -> Result<Tz, ScheduleError> {
    let trimmed = timezone.trim();
    let name = if trimmed.is_empty() { DEFAULT_TIMEZONE } else { trimmed };
    name.parse::<Tz>().map_err(|_| {
        ScheduleError::Timezone(format!(
            "{name:?} is not an IANA time zone (for example UTC or Europe/Paris)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("a time").with_timezone(&Utc)
    }

    #[test]
    fn five_fields_fire_on_the_minute_and_six_fields_on_the_second() {
        let every_five_minutes = Schedule::parse("*/5 * * * *", "").expect("parses");
        assert_eq!(every_five_minutes.timezone(), "UTC");
        assert_eq!(
            next_after(&every_five_minutes, utc("2026-01-01T10:02:30Z")),
            Some(utc("2026-01-01T10:05:00Z"))
        );
        assert_eq!(
            next_after(&every_five_minutes, utc("2026-01-01T10:05:00Z")),
            Some(utc("2026-01-01T10:10:00Z")),
            "strictly after"
        );
        let every_second = Schedule::parse("* * * * * *", "UTC").expect("parses");
        assert_eq!(
            next_after(&every_second, utc("2026-01-01T10:02:30.999Z")),
            Some(utc("2026-01-01T10:02:31Z")),
            "on the whole second, never with the fraction of the instant"
        );
        assert_eq!(
            next_after(&every_five_minutes, utc("2026-01-01T10:04:59.5Z")),
            Some(utc("2026-01-01T10:05:00Z"))
        );
        let every_ten_seconds = Schedule::parse("*/10 * * * * *", "UTC").expect("parses");
        assert_eq!(
            next_after(&every_ten_seconds, utc("2026-01-01T10:02:31Z")),
            Some(utc("2026-01-01T10:02:40Z"))
        );
        let weekdays = Schedule::parse(" 0 9 * * MON-FRI ", "UTC").expect("parses");
        assert_eq!(weekdays.expression(), "0 9 * * MON-FRI");
        // 2026-01-03 is a Saturday.
        assert_eq!(
            next_after(&weekdays, utc("2026-01-03T12:00:00Z")),
            Some(utc("2026-01-05T09:00:00Z"))
        );
    }

    #[test]
    fn fields_are_read_in_the_time_zone_across_daylight_saving_changes() {
        let nine_in_new_york = Schedule::parse("0 9 * * *", "America/New_York").expect("parses");
        // Winter: UTC-5. New York moves to UTC-4 on 2026-03-08.
        assert_eq!(
            next_after(&nine_in_new_york, utc("2026-03-06T20:00:00Z")),
            Some(utc("2026-03-07T14:00:00Z"))
        );
        assert_eq!(
            next_after(&nine_in_new_york, utc("2026-03-07T20:00:00Z")),
            Some(utc("2026-03-08T13:00:00Z"))
        );
        // 02:30 does not exist in Paris on 2026-03-29 (02:00 jumps to 03:00): the fire that
        // day is not at a time that does not exist, and the next day is back at 02:30 CEST.
        let half_past_two = Schedule::parse("30 2 * * *", "Europe/Paris").expect("parses");
        let on_gap_day = next_after(&half_past_two, utc("2026-03-28T12:00:00Z")).expect("fires");
        assert!(on_gap_day >= utc("2026-03-29T01:00:00Z"), "{on_gap_day}");
        let after_gap = next_after(&half_past_two, on_gap_day).expect("fires");
        assert_eq!(after_gap, Utc.with_ymd_and_hms(2026, 3, 30, 0, 30, 0).unwrap());
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        for (expression, expected) in [
            ("", "is required"),
            ("* * * *", "not 4"),
            ("* * * * * * *", "not 7"),
            ("61 * * * *", "cron expression"),
            ("* * * * MOON", "cron expression"),
            ("*/0 * * * *", "cron expression"),
        ] {
            let error = Schedule::parse(expression, "UTC").expect_err(expression);
            assert!(matches!(error, ScheduleError::Expression(_)), "{expression}: {error:?}");
            assert!(error.to_string().contains(expected), "{expression}: {error}");
        }
        let error = Schedule::parse("* * * * *", "Mars/Olympus").expect_err("bad zone");
        assert!(matches!(error, ScheduleError::Timezone(_)));
        assert!(error.to_string().contains("Mars/Olympus"), "{error}");
        let (expression_problem, timezone_problem) = check("0 0 30 2 *", "Nowhere/City");
        assert!(expression_problem.is_some_and(|problem| problem.contains("never fires")));
        assert!(timezone_problem.is_some());
        assert_eq!(check("0 12 * * *", "Asia/Tokyo"), (None, None));
    }

    /// Found by the cron fuzz target: `0 2 , 2 *` parsed (an empty list) and, like any
    /// expression that never fires, made `check` search day by day to the year 5000 (seconds
    /// of CPU per request).
    #[test]
    fn empty_list_items_are_refused_and_never_firing_is_found_quickly() {
        for expression in ["0 2 , 2 *", "0 2 1,,2 * *", "0,  * * * *", "0 0 ,1 * *"] {
            let error = Schedule::parse(expression, "UTC").expect_err(expression);
            assert!(error.to_string().contains("empty item"), "{expression}: {error}");
        }
        let started = std::time::Instant::now();
        for expression in ["0 0 30 2 *", "0 0 31 4 *", "0 0 0 31 11 *"] {
            let (problem, _) = check(expression, "UTC");
            assert!(problem.is_some_and(|problem| problem.contains("never fires")), "{expression}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        // Rare dates still fire: February 29, and the fifth Friday of February.
        for expression in ["0 0 29 2 *", "0 0 * 2 FRI#5"] {
            assert_eq!(check(expression, "UTC"), (None, None), "{expression}");
        }
    }
}

/// Properties: any text is judged without a panic, and a refusal says what is wrong; for
/// generated expressions the next fire time is a whole second strictly after the instant,
/// never earlier for a later instant, nothing fires in between, and the fields hold.
#[cfg(test)]
mod properties {
    use chrono::{Datelike, TimeZone, Timelike};
    use proptest::prelude::*;

    use super::*;

    /// One field: `*`, a value, a range, a step or a list, within `low..=high`.
    fn field(low: u32, high: u32) -> impl Strategy<Value = String> {
        let value = low..=high;
        prop_oneof![
            Just("*".to_owned()),
            value.clone().prop_map(|value| value.to_string()),
            (value.clone(), value.clone()).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            (1..=(high - low).max(1)).prop_map(|step| format!("*/{step}")),
            proptest::collection::btree_set(value, 1..4).prop_map(|values| {
                values.into_iter().map(|value| value.to_string()).collect::<Vec<_>>().join(",")
            }),
        ]
    }

    /// An expression of 5 fields, or 6 with seconds; days of the month stop at 28 so every
    /// month has them.
    fn expression() -> impl Strategy<Value = (String, bool)> {
        (
            proptest::option::of(field(0, 59)),
            field(0, 59),
            field(0, 23),
            field(1, 28),
            field(1, 12),
            field(0, 6),
        )
            .prop_map(|(seconds, minute, hour, day, month, weekday)| {
                let five = format!("{minute} {hour} {day} {month} {weekday}");
                match seconds {
                    Some(seconds) => (format!("{seconds} {five}"), true),
                    None => (five, false),
                }
            })
    }

    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        // 2001 to 2099, with a fraction of a second.
        (978_307_200i64..4_102_444_800, 0u32..1_000_000_000).prop_map(|(seconds, nanos)| {
            Utc.timestamp_opt(seconds, nanos).single().expect("in range")
        })
    }

    fn zone() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "",
            "UTC",
            "Europe/Paris",
            "America/New_York",
            "Asia/Kolkata",
        ])
    }

    proptest! {
        #[test]
        fn any_text_is_judged_without_panicking(expression in ".{0,60}|[0-9*/,@ a-zA-Z-]{0,40}", timezone in ".{0,20}") {
            match Schedule::parse(&expression, &timezone) {
                Ok(schedule) => prop_assert_eq!(schedule.expression(), expression.trim()),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
            let (expression_problem, timezone_problem) = check(&expression, &timezone);
            for problem in [expression_problem, timezone_problem].into_iter().flatten() {
                prop_assert!(!problem.is_empty());
            }
        }

        #[test]
        fn the_next_fire_is_the_first_whole_second_after(
            (expression, with_seconds) in expression(),
            timezone in zone(),
            from in instant(),
            later_by in 0i64..200_000,
        ) {
            let schedule = Schedule::parse(&expression, timezone).expect("a generated expression parses");
            prop_assert_eq!(check(&expression, timezone), (None, None));
            let Some(next) = next_after(&schedule, from) else {
                return Ok(());
            };
            prop_assert!(next > from, "{next} after {from}");
            prop_assert_eq!(next.nanosecond(), 0);
            if !with_seconds {
                prop_assert_eq!(next.second(), 0, "five fields fire on the minute");
            }
            // Nothing fires between `from` and `next`: from any instant in between, the next
            // fire is still `next`.
            let between = from + (next - from) / 2;
            prop_assert_eq!(next_after(&schedule, between), Some(next));
            prop_assert_eq!(next_after(&schedule, next - chrono::Duration::milliseconds(1)), Some(next));
            // A later instant never fires earlier.
            let later = from + chrono::Duration::seconds(later_by);
            prop_assert!(next_after(&schedule, later).is_none_or(|after_later| after_later >= next));
        }

        #[test]
        fn a_daily_time_fires_at_that_time_within_a_day(
            minute in 0u32..60,
            hour in 0u32..24,
            from in instant(),
        ) {
            let schedule = Schedule::parse(&format!("{minute} {hour} * * *"), "Asia/Kolkata").expect("parses");
            let next = next_after(&schedule, from).expect("fires daily");
            let local = next.with_timezone(&chrono_tz::Asia::Kolkata);
            prop_assert_eq!((local.hour(), local.minute(), local.second()), (hour, minute, 0));
            prop_assert!(next - from <= chrono::Duration::days(1));
            prop_assert!(local.year() >= 2001);
        }
    }
}
