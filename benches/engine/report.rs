//! The figures of a run: every round's values per metric, their median and spread, the tables
//! printed per scenario and the JSON report (`target/bench/engine.json`).
//! May call: the file system (the report), git (the commit measured).

use std::path::Path;

use serde_json::{Value, json};

use crate::{Mode, Outcome, Scenario};

/// The values one round measured, in the order they were set.
#[derive(Debug, Default, Clone)]
pub struct Round {
    values: Vec<(String, &'static str, f64)>,
    notes: Vec<String>,
}

impl Round {
    pub fn set(&mut self, name: &str, unit: &'static str, value: f64) {
        if !value.is_finite() {
            return;
        }
        match self.values.iter_mut().find(|(existing, _, _)| existing == name) {
            Some(slot) => slot.2 = value,
            None => self.values.push((name.to_owned(), unit, value)),
        }
    }

    pub fn note(&mut self, note: &str) {
        self.notes.push(note.to_owned());
    }
}

/// Median, least and greatest value over the rounds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|value| value.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    };
    Some(Summary { median, min: sorted[0], max: sorted[sorted.len() - 1] })
}

/// The value at `fraction` (0.5 for p50, 0.99 for p99) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Clone)]
struct Metric {
    name: String,
    unit: &'static str,
    values: Vec<f64>,
}

/// One variant of one scenario in one mode, over its rounds.
#[derive(Debug, Clone)]
pub struct Entry {
    pub mode: String,
    pub scenario: Scenario,
    pub variant: String,
    metrics: Vec<Metric>,
    pub rounds: usize,
    notes: Vec<String>,
}

impl Entry {
    pub fn new(mode: Option<Mode>, scenario: Scenario, variant: &str) -> Self {
        Self {
            mode: mode.map_or("postgres", Mode::name).to_owned(),
            scenario,
            variant: variant.to_owned(),
            metrics: Vec::new(),
            rounds: 0,
            notes: Vec::new(),
        }
    }

    pub fn add_round(&mut self, round: Round) {
        self.rounds += 1;
        for (name, unit, value) in round.values {
            match self.metrics.iter_mut().find(|metric| metric.name == name) {
                Some(metric) => metric.values.push(value),
                None => self.metrics.push(Metric { name, unit, values: vec![value] }),
            }
        }
        for note in round.notes {
            if !self.notes.contains(&note) {
                self.notes.push(note);
            }
        }
    }

    pub fn note(&mut self, note: &str) {
        self.notes.push(note.to_owned());
    }

    pub fn summary(&self, name: &str) -> Option<Summary> {
        self.metrics
            .iter()
            .find(|metric| metric.name == name)
            .and_then(|metric| summarize(&metric.values))
    }

    /// The median Redis commands per unit by command, most first: `ping 10.7, evalsha 4.08`.
    fn redis_breakdown(&self) -> Option<String> {
        let mut commands: Vec<(String, f64)> = self
            .metrics
            .iter()
            .filter_map(|metric| {
                let name = metric.name.strip_prefix(crate::measure::REDIS_COMMAND_PREFIX)?;
                let command = name.rsplit_once("_per_").map_or(name, |(command, _)| command);
                Some((command.to_owned(), summarize(&metric.values)?.median))
            })
            .collect();
        if commands.is_empty() {
            return None;
        }
        commands.sort_by(|left, right| right.1.total_cmp(&left.1));
        let shown: Vec<String> = commands
            .iter()
            .take(8)
            .map(|(name, calls)| format!("{name} {}", number(*calls)))
            .collect();
        Some(shown.join(", "))
    }

    fn to_json(&self) -> Value {
        let mut metrics = serde_json::Map::new();
        for metric in &self.metrics {
            let Some(summary) = summarize(&metric.values) else { continue };
            metrics.insert(
                metric.name.clone(),
                json!({
                    "unit": metric.unit,
                    "median": summary.median,
                    "min": summary.min,
                    "max": summary.max,
                    "values": metric.values,
                }),
            );
        }
        json!({
            "mode": self.mode,
            "scenario": self.scenario.name(),
            "variant": self.variant,
            "rounds": self.rounds,
            "metrics": metrics,
            "notes": self.notes,
        })
    }
}

/// A number with as many decimals as its size deserves.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// `median (min–max)`, or the value alone when the rounds agree or there was one.
fn cell(summary: Option<Summary>) -> String {
    let Some(summary) = summary else { return "-".to_owned() };
    let (median, min, max) = (number(summary.median), number(summary.min), number(summary.max));
    if min == max { median } else { format!("{median} ({min}–{max})") }
}

/// A column of a scenario table: a metric and its header.
pub struct Column {
    pub metric: String,
    pub header: String,
}

impl Column {
    pub fn new(metric: &str, header: &str) -> Self {
        Self { metric: metric.to_owned(), header: header.to_owned() }
    }
}

/// The columns of the costs table of a scenario whose figures are per `unit`.
pub fn cost_columns(unit: &str) -> Vec<Column> {
    vec![
        Column::new(&format!("postgres_commits_per_{unit}"), &format!("pg xact/{unit}")),
        Column::new(&format!("redis_commands_per_{unit}"), &format!("redis cmd/{unit}")),
        Column::new(&format!("cpu_ms_per_{unit}_server"), "cpu ms: server"),
        Column::new(&format!("cpu_ms_per_{unit}_runners"), "runners"),
        Column::new(&format!("cpu_ms_per_{unit}_postgres"), "postgres"),
        Column::new(&format!("cpu_ms_per_{unit}_postgres_own_database"), "pg, own db"),
        Column::new(&format!("cpu_ms_per_{unit}_redis"), "redis"),
        Column::new(&format!("cpu_ms_per_{unit}_system"), "all four"),
        Column::new("machine_busy_percent", "busy %"),
        Column::new(&format!("cpu_ms_per_{unit}_unaccounted"), "other cpu ms"),
    ]
}

/// Prints a table of entries: one row per entry, one column per metric.
pub fn print_table(title: &str, entries: &[&Entry], columns: &[Column], show_notes: bool) {
    if entries.is_empty() {
        return;
    }
    let mut headers = vec!["mode".to_owned(), "variant".to_owned(), "rounds".to_owned()];
    headers.extend(columns.iter().map(|column| column.header.clone()));
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| {
            let mut row = vec![entry.mode.clone(), entry.variant.clone(), entry.rounds.to_string()];
            row.extend(columns.iter().map(|column| cell(entry.summary(&column.metric))));
            row
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|header| header.chars().count()).collect();
    for row in &rows {
        for (index, value) in row.iter().enumerate() {
            widths[index] = widths[index].max(value.chars().count());
        }
    }
    let line = |values: &[String]| {
        let cells: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(index, value)| {
                let padding = widths[index].saturating_sub(value.chars().count());
                if index < 2 {
                    format!("{value}{}", " ".repeat(padding))
                } else {
                    format!("{}{value}", " ".repeat(padding))
                }
            })
            .collect();
        println!("  {}", cells.join("  "));
    };
    println!();
    println!("{title}");
    line(&headers);
    let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
    line(&rule);
    for row in &rows {
        line(row);
    }
    for entry in entries.iter().filter(|_| show_notes) {
        if let Some(breakdown) = entry.redis_breakdown() {
            println!("  redis ({} {}): {breakdown}", entry.mode, entry.variant);
        }
        for note in &entry.notes {
            println!("  note ({} {}): {note}", entry.mode, entry.variant);
        }
    }
}

/// Everything a run measured.
#[derive(Default)]
pub struct Report {
    pub entries: Vec<Entry>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub settings: serde_json::Map<String, Value>,
}

impl Report {
    pub fn add(&mut self, entry: Entry) {
        self.entries.push(entry);
    }

    pub fn entries_of(&self, mode: Option<Mode>, scenario: Scenario) -> Vec<&Entry> {
        let mode_name = mode.map_or("postgres", Mode::name);
        self.entries
            .iter()
            .filter(|entry| entry.scenario == scenario && entry.mode == mode_name)
            .collect()
    }

    pub fn write_json(&self, path: &Path, started: chrono::DateTime<chrono::Utc>) -> Outcome<()> {
        if let Some(directory) = path.parent() {
            std::fs::create_dir_all(directory)?;
        }
        let document = json!({
            "suite": "turbocat engine benchmark",
            "format": 1,
            "startedAt": started.to_rfc3339(),
            "finishedAt": chrono::Utc::now().to_rfc3339(),
            "commit": git_commit(),
            "machine": {
                "cores": crate::measure::cores(),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                "loadAverageAtStart": self.settings.get("loadAverageAtStart"),
            },
            "settings": self.settings,
            "results": self.entries.iter().map(Entry::to_json).collect::<Vec<_>>(),
            "notes": self.notes,
            "failures": self.failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)?)?;
        Ok(())
    }
}

/// The commit of the working tree measured (with `+dirty` when it has changes).
fn git_commit() -> Option<String> {
    let run = |arguments: &[&str]| {
        std::process::Command::new("git")
            .args(arguments)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|text| !text.is_empty());
    Some(if dirty { format!("{commit}+dirty") } else { commit })
}
