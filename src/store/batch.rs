//! The rows of a batch statement (many step transitions, log lines or audit rows in one
//! `UPDATE … FROM` or `INSERT`), bound so that a statement's text takes few shapes whatever the
//! number of rows. May call: sqlx, nothing else.
//!
//! Every connection keeps the statements it prepared, keyed by their text. Rows spelled as
//! `VALUES ($1, $2), ($3, $4), …` make a new text for every row count: under load each of a
//! pool's connections prepared a statement for each batch size it met (a round trip to parse
//! and describe it, again whenever its cache of 100 had dropped it) and kept them, about 10 MB
//! of statement metadata in a server with 20 connections (`docs/benchmarks.md`, tenth round).
//! On PostgreSQL therefore:
//! - rows to insert are bound column by column, one array parameter each, and read back with
//!   `UNNEST` (`BatchRows::push_rows`): one text for any number of rows;
//! - rows to join (`UPDATE … FROM (…) AS v`, `BatchRows::push_table`) stay `VALUES`, padded
//!   with rows of NULLs (which match no row) to the next power of two: seven texts from 1 to 64
//!   rows. `UNNEST` there cost more than it saved: planned for ten rows it knows nothing of, on
//!   tables without statistics yet, a hand-off's `UPDATE` scanned every live execution.
//!
//! SQLite prepares in process and keeps `VALUES` with exactly the rows given.

use sqlx::postgres::PgHasArrayType;
use sqlx::query_builder::{QueryBuilder, Separated};
use sqlx::{Encode, Postgres, Sqlite, Type};

/// A database that can take the rows of a batch statement.
pub trait BindRows: sqlx::Database {
    /// One column's values, ready to bind.
    type BatchColumn<'a>;

    /// Appends the rows as a row source that can follow `INSERT INTO t (…)`, its columns
    /// named `column1`, `column2`, ….
    fn push_rows(
        builder: &mut QueryBuilder<Self>,
        rows: usize,
        columns: Vec<Self::BatchColumn<'_>>,
    );

    /// Appends the rows as `VALUES` to stand in parentheses as a derived table
    /// (`FROM (…) AS v`), its columns named `column1`, `column2`, …; it may carry extra rows of
    /// NULLs, which no condition on a column matches, and carries at least `at_least` rows
    /// where it pads at all.
    fn push_table(
        builder: &mut QueryBuilder<Self>,
        rows: usize,
        at_least: usize,
        columns: Vec<Self::BatchColumn<'_>>,
    );
}

/// A type a batch column can hold on database `DB`.
pub trait BatchValue<'a, DB: BindRows>: Sized + 'a {
    fn column(values: Vec<Self>) -> DB::BatchColumn<'a>;
}

/// The rows of one batch statement, built column by column: `BatchRows::new(n).column(…)…`,
/// each column giving one value per row, in row order.
pub struct BatchRows<'a, DB: BindRows> {
    rows: usize,
    at_least: usize,
    columns: Vec<DB::BatchColumn<'a>>,
}

impl<'a, DB: BindRows> BatchRows<'a, DB> {
    pub fn new(rows: usize) -> Self {
        Self { rows, at_least: 0, columns: Vec::new() }
    }

    /// Pads the derived table of `push_table` to at least `rows` rows where the database pads
    /// (PostgreSQL): the tables of one statement padded to one size give it one text for all
    /// their sizes together, not one for each combination.
    pub fn padded_to(mut self, rows: usize) -> Self {
        self.at_least = rows;
        self
    }

    /// Adds the next column (`column1` first). It must give exactly one value per row.
    pub fn column<V: BatchValue<'a, DB>>(mut self, values: impl IntoIterator<Item = V>) -> Self {
        let values: Vec<V> = values.into_iter().collect();
        debug_assert_eq!(values.len(), self.rows, "a batch column gives one value per row");
        self.columns.push(V::column(values));
        self
    }

    /// Appends the rows to an `INSERT` (see `BindRows::push_rows`).
    pub fn push_rows(self, builder: &mut QueryBuilder<DB>) {
        DB::push_rows(builder, self.rows, self.columns);
    }

    /// Appends the rows as a derived table (see `BindRows::push_table`).
    pub fn push_table(self, builder: &mut QueryBuilder<DB>) {
        DB::push_table(builder, self.rows, self.at_least, self.columns);
    }
}

/// Appends `VALUES` of `rows` rows, `push_row` binding the values of each.
fn push_values<DB: sqlx::Database>(
    builder: &mut QueryBuilder<DB>,
    rows: usize,
    mut push_row: impl FnMut(usize, &mut Separated<'_, DB, &'static str>),
) {
    builder.push("VALUES ");
    for row in 0..rows {
        if row > 0 {
            builder.push(", ");
        }
        builder.push("(");
        push_row(row, &mut builder.separated(", "));
        builder.push(")");
    }
}

/// A column's values on PostgreSQL, bound as one array or one at a time.
pub trait PgColumn: Send {
    fn push_array(self: Box<Self>, arrays: &mut Separated<'_, Postgres, &'static str>);
    fn push_value(&self, row: usize, values: &mut Separated<'_, Postgres, &'static str>);
}

impl<'a, T> PgColumn for Vec<T>
where
    T: Encode<'a, Postgres> + Type<Postgres> + PgHasArrayType + Clone + Send + Sync + 'a,
{
    fn push_array(self: Box<Self>, arrays: &mut Separated<'_, Postgres, &'static str>) {
        arrays.push_bind(*self);
    }

    fn push_value(&self, row: usize, values: &mut Separated<'_, Postgres, &'static str>) {
        // Cheap: the values are ids, numbers, times and borrowed text or JSON.
        values.push_bind(self.get(row).cloned());
    }
}

impl BindRows for Postgres {
    type BatchColumn<'a> = Box<dyn PgColumn + 'a>;

    fn push_rows(
        builder: &mut QueryBuilder<Self>,
        _rows: usize,
        columns: Vec<Self::BatchColumn<'_>>,
    ) {
        // `UNNEST` of several arrays zips them, in order, into rows.
        let names: Vec<String> =
            (1..=columns.len()).map(|position| format!("column{position}")).collect();
        builder.push("SELECT * FROM UNNEST(");
        let mut arrays = builder.separated(", ");
        for column in columns {
            column.push_array(&mut arrays);
        }
        builder.push(") AS batch(").push(names.join(", ")).push(")");
    }

    fn push_table(
        builder: &mut QueryBuilder<Self>,
        rows: usize,
        at_least: usize,
        columns: Vec<Self::BatchColumn<'_>>,
    ) {
        // `push_value` binds NULL past a column's last value.
        push_values(builder, rows.max(at_least).next_power_of_two(), |row, values| {
            for column in &columns {
                column.push_value(row, values);
            }
        });
    }
}

impl<'a, T> BatchValue<'a, Postgres> for T
where
    T: Encode<'a, Postgres> + Type<Postgres> + PgHasArrayType + Clone + Send + Sync + 'a,
{
    fn column(values: Vec<T>) -> Box<dyn PgColumn + 'a> {
        Box::new(values)
    }
}

impl BindRows for Sqlite {
    type BatchColumn<'a> = Box<dyn Fn(usize, &mut Separated<'_, Sqlite, &'static str>) + Send + 'a>;

    fn push_rows(
        builder: &mut QueryBuilder<Self>,
        rows: usize,
        columns: Vec<Self::BatchColumn<'_>>,
    ) {
        push_values(builder, rows, |row, values| {
            for column in &columns {
                column(row, values);
            }
        });
    }

    fn push_table(
        builder: &mut QueryBuilder<Self>,
        rows: usize,
        _at_least: usize,
        columns: Vec<Self::BatchColumn<'_>>,
    ) {
        Self::push_rows(builder, rows, columns);
    }
}

impl<'a, T> BatchValue<'a, Sqlite> for T
where
    T: Encode<'a, Sqlite> + Type<Sqlite> + Send + Sync + 'a,
{
    fn column(values: Vec<T>) -> <Sqlite as BindRows>::BatchColumn<'a> {
        Box::new(move |row, separated| {
            separated.push_bind(&values[row]);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of `prefix`, then `rows` rows of `columns` integer columns pushed by `push`.
    fn text<DB: BindRows>(
        prefix: &str,
        rows: usize,
        columns: usize,
        push: impl FnOnce(BatchRows<'_, DB>, &mut QueryBuilder<DB>),
    ) -> String
    where
        i32: for<'a> BatchValue<'a, DB>,
    {
        let mut builder = QueryBuilder::<DB>::new(prefix);
        let values = || 0..i32::try_from(rows).unwrap_or(0);
        let batch =
            (0..columns).fold(BatchRows::<DB>::new(rows), |batch, _| batch.column(values()));
        push(batch, &mut builder);
        builder.sql().as_str().to_owned()
    }

    fn table<DB: BindRows>(rows: usize) -> String
    where
        i32: for<'a> BatchValue<'a, DB>,
    {
        text::<DB>("SELECT * FROM (", rows, 1, |batch, builder| batch.push_table(builder))
            + ") AS v"
    }

    fn inserted<DB: BindRows>(rows: usize) -> String
    where
        i32: for<'a> BatchValue<'a, DB>,
    {
        text::<DB>("INSERT INTO t (a, b) ", rows, 2, |batch, builder| batch.push_rows(builder))
    }

    #[test]
    fn postgres_inserts_take_one_text_for_any_number_of_rows() {
        let one = inserted::<Postgres>(1);
        assert_eq!(
            one,
            "INSERT INTO t (a, b) SELECT * FROM UNNEST($1, $2) AS batch(column1, column2)"
        );
        assert_eq!(inserted::<Postgres>(37), one);
    }

    #[test]
    fn postgres_tables_are_padded_to_a_power_of_two() {
        assert_eq!(table::<Postgres>(1), "SELECT * FROM (VALUES ($1)) AS v");
        assert_eq!(table::<Postgres>(3), table::<Postgres>(4));
        assert_eq!(table::<Postgres>(3).matches('(').count(), 1 + 4);
        assert_ne!(table::<Postgres>(4), table::<Postgres>(5));
        let texts: std::collections::HashSet<String> = (1..=64).map(table::<Postgres>).collect();
        assert_eq!(texts.len(), 7, "1, 2, 4, … 64 rows");
    }

    #[test]
    fn a_table_padded_to_a_size_takes_the_text_of_that_size() {
        let padded = |rows: usize, at_least: usize| {
            text::<Postgres>("", rows, 1, move |batch, builder| {
                batch.padded_to(at_least).push_table(builder)
            })
        };
        assert_eq!(padded(1, 5), padded(8, 0));
        assert_eq!(padded(6, 2), padded(8, 0));
        assert_ne!(padded(1, 5), padded(4, 0));
        let sqlite =
            text::<Sqlite>("", 1, 1, |batch, builder| batch.padded_to(5).push_table(builder));
        assert_eq!(sqlite, "VALUES (?)");
    }

    #[test]
    fn sqlite_keeps_exactly_the_rows_given() {
        assert_eq!(table::<Sqlite>(3).matches("(?)").count(), 3);
        assert_eq!(inserted::<Sqlite>(2), "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)");
    }
}
