//! The totals of numbered lists, kept so that a list page does not count its rows on every
//! request (`SELECT COUNT(*)` reads every row the filters keep: 4 ms of PostgreSQL for 5,000
//! agents, most of what a list page cost). A page that is not full needs no count at all: it is
//! the last, and its rows give the total (`fetch_page`); only full pages (and pages past the
//! end) take a kept total, and only one that agrees with the page.
//!
//! A total is kept per table and filter (the filter's fields that choose rows, not the page or
//! the order) and used again while both hold: nothing was written to that table through any
//! store of this process on the same database since it was counted (each write bumps the
//! table's generation after its commit), and it is younger than `KEPT_FOR`. Writes made by
//! another process (another replica) are therefore seen within `KEPT_FOR`; this process's own
//! are seen at once. A total read before a write committed is kept under the generation read
//! before the count, so the write's bump makes it stale, never the other way round.
//! May call: nothing outside this module (std only).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a kept total may be used: how late another replica's writes show in totals.
pub const KEPT_FOR: Duration = Duration::from_secs(1);

/// Totals kept at most per database; all are dropped when that many are.
const KEPT_TOTALS: usize = 4_096;

/// The tables whose list totals are kept: the one name a list's key and its writes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Listed {
    Agents,
    Workflows,
    Templates,
    Deployments,
    Executions,
}

/// Which rows a list's total counts: the table and its filter, written out
/// (`CountKey::new(Listed::Agents, &(scope, search, …))`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CountKey {
    table: Listed,
    filter: String,
}

impl CountKey {
    pub fn new(table: Listed, filter: &impl std::fmt::Debug) -> Self {
        Self { table, filter: format!("{filter:?}") }
    }

    pub fn table(&self) -> Listed {
        self.table
    }
}

struct Kept {
    generation: u64,
    total: i64,
    counted_at: Instant,
}

#[derive(Default)]
struct State {
    generations: HashMap<Listed, u64>,
    totals: HashMap<CountKey, Kept>,
}

/// The kept totals of one database, shared by every store of this process connected to it.
#[derive(Default)]
pub(crate) struct ListTotals {
    state: Mutex<State>,
}

impl ListTotals {
    /// The totals of the database `identity` names (its host, port and name, or its file).
    pub fn of_database(identity: &str) -> Arc<Self> {
        static DATABASES: OnceLock<Mutex<HashMap<String, Arc<ListTotals>>>> = OnceLock::new();
        let databases = DATABASES.get_or_init(Default::default);
        match databases.lock() {
            Ok(mut databases) => databases.entry(identity.to_owned()).or_default().clone(),
            // Poisoned: totals of its own, counted as before by this store alone.
            Err(_) => Arc::default(),
        }
    }

    /// The table's generation now: read before counting, kept with the total.
    pub fn generation(&self, table: Listed) -> u64 {
        self.state
            .lock()
            .map(|state| state.generations.get(&table).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The kept total of `key`, if it may still be used.
    pub fn get(&self, key: &CountKey) -> Option<i64> {
        let state = self.state.lock().ok()?;
        let generation = state.generations.get(&key.table).copied().unwrap_or_default();
        let kept = state.totals.get(key)?;
        (kept.generation == generation && kept.counted_at.elapsed() < KEPT_FOR)
            .then_some(kept.total)
    }

    /// Keeps `total`, counted after the table was at `generation`.
    pub fn keep(&self, key: CountKey, generation: u64, total: i64) {
        let Ok(mut state) = self.state.lock() else { return };
        if state.totals.len() >= KEPT_TOTALS {
            state.totals.clear();
        }
        state.totals.insert(key, Kept { generation, total, counted_at: Instant::now() });
    }

    /// Rows of `table` changed (called after the commit that changed them).
    pub fn changed(&self, table: Listed) {
        if let Ok(mut state) = self.state.lock() {
            *state.generations.entry(table).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_total_is_used_again_until_its_table_changes() {
        let totals = ListTotals::default();
        let key = CountKey::new(Listed::Agents, &("owner", Some("DATA")));
        assert_eq!(totals.get(&key), None);
        let generation = totals.generation(Listed::Agents);
        totals.keep(key.clone(), generation, 7);
        assert_eq!(totals.get(&key), Some(7));
        assert_eq!(totals.get(&CountKey::new(Listed::Agents, &("owner", Some("API")))), None);
        totals.changed(Listed::Workflows);
        assert_eq!(totals.get(&key), Some(7), "another table's write");
        totals.changed(Listed::Agents);
        assert_eq!(totals.get(&key), None);
    }

    #[test]
    fn a_total_counted_before_a_write_committed_is_not_used_after_it() {
        let totals = ListTotals::default();
        let key = CountKey::new(Listed::Executions, &"all");
        let before_the_count = totals.generation(Listed::Executions);
        // The write commits and bumps while the count runs.
        totals.changed(Listed::Executions);
        totals.keep(key.clone(), before_the_count, 3);
        assert_eq!(totals.get(&key), None);
    }

    #[test]
    fn stores_of_one_database_share_totals_and_others_do_not() {
        let first = ListTotals::of_database("postgres://127.0.0.1:5432/shared_for_the_test");
        let again = ListTotals::of_database("postgres://127.0.0.1:5432/shared_for_the_test");
        let other = ListTotals::of_database("postgres://127.0.0.1:5432/another_for_the_test");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &other));
    }
}
