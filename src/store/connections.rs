//! Connections kept between uses. sqlx's pool tests every connection it takes back with a ping
//! (a round trip, on a task of its own, after every query and every transaction) and has no
//! setting to stop it. Every statement of the store runs on `Connections` instead: a connection
//! whose use ended cleanly comes back here untested and the next statement takes it (the most
//! recently used first); one whose use failed or was cancelled goes back to the pool, which tests
//! it (and closes it when broken), as before. The connections kept here are checked out of the
//! pool, so they count against its `max_connections`; at most `capacity` are kept, the rest go
//! back to the pool.
//! May call: sqlx (and sqlx-core's `TransactionManager`) and tokio, nothing else.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{Database, Either, Execute, Executor, Pool, SqlStr};
use sqlx_core::transaction::TransactionManager;

/// A pool's connections, and those of them kept checked out between uses.
pub struct Connections<DB: Database> {
    inner: Arc<Kept<DB>>,
}

struct Kept<DB: Database> {
    pool: Pool<DB>,
    idle: Mutex<Vec<PoolConnection<DB>>>,
    capacity: usize,
    /// Woken when a connection is kept: the pool, which never saw it come back, would not.
    returned: tokio::sync::Notify,
}

impl<DB: Database> Kept<DB> {
    fn idle(&self) -> MutexGuard<'_, Vec<PoolConnection<DB>>> {
        // A panic while the lock was held left a valid `Vec`.
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<DB: Database> Clone for Connections<DB> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<DB: Database> fmt::Debug for Connections<DB> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Connections")
            .field("pool", &self.inner.pool)
            .field("kept", &self.kept())
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl<DB: Database> Connections<DB> {
    /// Keeps up to `capacity` of `pool`'s connections between uses.
    pub fn new(pool: Pool<DB>, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Kept {
                pool,
                idle: Mutex::new(Vec::new()),
                capacity,
                returned: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The pool the connections come from.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// How many connections are kept here, idle.
    pub fn kept(&self) -> usize {
        self.inner.idle().len()
    }

    /// The pool's open connections, and how many of them are idle (in the pool or kept here).
    pub fn counts(&self) -> super::PoolConnections {
        let idle = self.inner.pool.num_idle().saturating_add(self.kept());
        super::PoolConnections {
            open: self.inner.pool.size(),
            idle: u32::try_from(idle).unwrap_or(u32::MAX),
        }
    }

    /// A connection: the last one kept, or else one from the pool, whichever comes first
    /// (a connection kept while this waits for the pool's wakes it). Waits at most the pool's
    /// `acquire_timeout`. Call `Connection::keep` when its use ended cleanly; dropped, it goes
    /// back to the pool.
    pub async fn acquire(&self) -> Result<Connection<DB>, sqlx::Error> {
        let deadline =
            tokio::time::Instant::now() + self.inner.pool.options().get_acquire_timeout();
        loop {
            if self.inner.pool.is_closed() {
                self.inner.idle().clear();
                return Err(sqlx::Error::PoolClosed);
            }
            let kept = self.inner.returned.notified();
            tokio::pin!(kept);
            // Listening before looking: a connection kept after this look wakes the wait below.
            kept.as_mut().enable();
            let connection = self.inner.idle().pop();
            if let Some(connection) = connection {
                return Ok(self.checked_out(connection));
            }
            tokio::select! {
                connection = self.inner.pool.acquire() => return Ok(self.checked_out(connection?)),
                () = &mut kept => {}
                () = tokio::time::sleep_until(deadline) => return Err(sqlx::Error::PoolTimedOut),
            }
        }
    }

    fn checked_out(&self, connection: PoolConnection<DB>) -> Connection<DB> {
        Connection { connection: Some(connection), home: self.inner.clone() }
    }

    /// Begins a transaction with `statement` on a connection of these.
    pub async fn begin(&self, statement: &'static str) -> Result<Transaction<DB>, sqlx::Error> {
        let connection = self.acquire().await?;
        // Open from the start: should `BEGIN` fail or be cancelled, the drop rolls back.
        let mut transaction = Transaction { connection: Some(connection), open: true };
        DB::TransactionManager::begin(&mut transaction, Some(SqlStr::from_static(statement)))
            .await?;
        Ok(transaction)
    }

    /// Hands the kept connections back and closes the pool, waiting for every connection in
    /// use to be returned.
    pub async fn close(&self) {
        let kept = std::mem::take(&mut *self.inner.idle());
        drop(kept);
        self.inner.pool.close().await;
    }
}

/// A connection checked out of `Connections`; derefs to the database's connection.
pub struct Connection<DB: Database> {
    connection: Option<PoolConnection<DB>>,
    home: Arc<Kept<DB>>,
}

impl<DB: Database> Connection<DB> {
    /// Its use ended cleanly (no error, nothing left unread, no transaction open): the next
    /// statement may take it as it is.
    pub fn keep(mut self) {
        let Some(connection) = self.connection.take() else { return };
        if DB::TransactionManager::get_transaction_depth(&connection) > 0 {
            return;
        }
        let mut idle = self.home.idle();
        if idle.len() < self.home.capacity && !self.home.pool.is_closed() {
            idle.push(connection);
            drop(idle);
            self.home.returned.notify_one();
        }
    }
}

impl<DB: Database> Connection<DB> {
    /// `result` of a use of this connection, keeping the connection when it is a success.
    pub fn kept_if_ok<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        if result.is_ok() {
            self.keep();
        }
        result
    }
}

impl<DB: Database> Deref for Connection<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        // Only `keep` takes it out, and `keep` consumes `self`.
        self.connection.as_deref().unwrap_or_else(|| unreachable!("a kept connection is gone"))
    }
}

impl<DB: Database> DerefMut for Connection<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.connection.as_deref_mut().unwrap_or_else(|| unreachable!("a kept connection is gone"))
    }
}

/// A transaction on a connection of `Connections`; derefs to the database's connection. Its
/// connection is kept after `commit` or `rollback`; dropped while open, it queues a rollback
/// and its connection goes back to the pool, whose test on return sends it.
pub struct Transaction<DB: Database> {
    /// Taken out only by `commit` and `rollback`, which consume the transaction.
    connection: Option<Connection<DB>>,
    open: bool,
}

impl<DB: Database> Transaction<DB> {
    /// Commits the transaction.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        DB::TransactionManager::commit(&mut self).await?;
        self.end();
        Ok(())
    }

    /// Rolls the transaction back.
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        DB::TransactionManager::rollback(&mut self).await?;
        self.end();
        Ok(())
    }

    fn end(&mut self) {
        self.open = false;
        if let Some(connection) = self.connection.take() {
            connection.keep();
        }
    }
}

impl<DB: Database> Drop for Transaction<DB> {
    fn drop(&mut self) {
        if self.open
            && let Some(connection) = self.connection.as_mut()
        {
            DB::TransactionManager::start_rollback(connection);
        }
    }
}

impl<DB: Database> Deref for Transaction<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        self.connection.as_deref().unwrap_or_else(|| unreachable!("an ended transaction is used"))
    }
}

impl<DB: Database> DerefMut for Transaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.connection
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("an ended transaction is used"))
    }
}

/// Runs each statement on a connection taken for it and kept after it, as `&Pool` does with
/// the pool's. A statement's rows are read in full before they are handed on (the store reads
/// bounded pages), so the connection is free again as soon as the statement is.
impl<'p, DB: Database> Executor<'p> for &'_ Connections<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<DB::QueryResult, DB::Row>, sqlx::Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        let connections = self.clone();
        futures::stream::once(async move {
            let mut connection = connections.acquire().await?;
            let results: Vec<_> = (&mut *connection).fetch_many(query).try_collect().await?;
            connection.keep();
            Ok::<_, sqlx::Error>(futures::stream::iter(results.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        let connections = self.clone();
        Box::pin(async move {
            let mut connection = connections.acquire().await?;
            let row = (&mut *connection).fetch_optional(query).await?;
            connection.keep();
            Ok(row)
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement, sqlx::Error>>
    where
        'p: 'e,
    {
        let connections = self.clone();
        Box::pin(async move {
            let mut connection = connections.acquire().await?;
            let statement = (&mut *connection).prepare_with(sql, parameters).await?;
            connection.keep();
            Ok(statement)
        })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<sqlx::Describe<DB>, sqlx::Error>>
    where
        'p: 'e,
    {
        let connections = self.clone();
        Box::pin(async move {
            let mut connection = connections.acquire().await?;
            let described = (&mut *connection).describe(sql).await?;
            connection.keep();
            Ok(described)
        })
    }
}
