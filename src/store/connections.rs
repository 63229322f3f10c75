//! Connections kept between uses. sqlx's pool tests every connection it takes back with a ping
//! (a round trip, on a task of its own, after every query and every transaction) and has no
//! setting to stop it. Every statement of the store runs on `Connections` instead: a connection
//! whose use ended cleanly comes back here untested and the next statement takes it (the most
//! recently used first); one whose use failed or was cancelled goes back to the pool, which tests
//! it (and closes it when broken), as before. The connections kept here are checked out of the
//! pool, so they count against its `max_connections`; one a caller waits for is handed to it
//! directly (the pool, which never sees it come back, would not wake the caller); at most
//! `capacity` are kept, the rest go back to the pool.
//! May call: sqlx (and sqlx-core's `TransactionManager`) and tokio, nothing else.

use std::collections::VecDeque;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{Database, Either, Execute, Executor, Pool, SqlStr};
use sqlx_core::transaction::TransactionManager;
use tokio::sync::oneshot;

/// A pool's connections, and those of them kept checked out between uses.
pub struct Connections<DB: Database> {
    inner: Arc<Kept<DB>>,
}

struct Kept<DB: Database> {
    pool: Pool<DB>,
    state: Mutex<State<DB>>,
    capacity: usize,
}

struct State<DB: Database> {
    /// Kept connections, the most recently used last.
    idle: Vec<PoolConnection<DB>>,
    /// Callers waiting for a connection, first come first: a connection whose use ended
    /// cleanly goes to the first of them still waiting (the pool, which never sees it come
    /// back, would not wake them).
    waiters: VecDeque<oneshot::Sender<PoolConnection<DB>>>,
}

impl<DB: Database> Kept<DB> {
    fn state(&self) -> MutexGuard<'_, State<DB>> {
        // A panic while the lock was held left a valid state.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands `connection` to the first caller still waiting, or keeps it (up to `capacity`;
    /// past that, or once the pool is closed, it goes back to the pool).
    fn put_back(&self, mut connection: PoolConnection<DB>) {
        let mut state = self.state();
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(connection) {
                Ok(()) => return,
                // That caller got one from the pool meanwhile, or gave up.
                Err(unsent) => connection = unsent,
            }
        }
        if state.idle.len() < self.capacity && !self.pool.is_closed() {
            state.idle.push(connection);
        }
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
        let state = Mutex::new(State { idle: Vec::new(), waiters: VecDeque::new() });
        Self { inner: Arc::new(Kept { pool, state, capacity }) }
    }

    /// The pool the connections come from.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// How many connections are kept here, idle.
    pub fn kept(&self) -> usize {
        self.inner.state().idle.len()
    }

    /// How many of the pool's connections are idle: in the pool or kept here.
    pub fn idle(&self) -> usize {
        self.inner.pool.num_idle().saturating_add(self.kept())
    }

    /// A connection: the last one kept; else the first that another caller is done with or
    /// that the pool gives (which opens one while it may, and bounds the wait by its
    /// `acquire_timeout`). Call `Connection::keep` when its use ended cleanly; dropped, it goes
    /// back to the pool.
    pub async fn acquire(&self) -> Result<Connection<DB>, sqlx::Error> {
        let pool = &self.inner.pool;
        let (mut handed, may_open) = {
            let mut state = self.inner.state();
            if pool.is_closed() {
                state.idle.clear();
                return Err(sqlx::Error::PoolClosed);
            }
            if let Some(connection) = state.idle.pop() {
                return Ok(self.checked_out(connection));
            }
            let (sender, receiver) = oneshot::channel();
            state.waiters.push_back(sender);
            (receiver, pool.size() < pool.options().get_max_connections())
        };
        let mut pooled = Box::pin(pool.acquire());
        let (connection, from_pool) = tokio::select! {
            biased;
            connection = &mut handed => (connection.map_err(|_| sqlx::Error::PoolClosed), false),
            connection = &mut pooled => (connection, true),
        };
        // A connection handed over after the pool's came is kept for the next caller.
        handed.close();
        if let Ok(unused) = handed.try_recv() {
            self.inner.put_back(unused);
        }
        if !from_pool && may_open {
            // The pool may be opening a connection for this caller: dropped half-open it would
            // be closed, and opened again for the next. Kept once open instead.
            let inner = self.inner.clone();
            tokio::spawn(async move {
                if let Ok(opened) = pooled.await {
                    inner.put_back(opened);
                }
            });
        }
        Ok(self.checked_out(connection?))
    }

    fn checked_out(&self, connection: PoolConnection<DB>) -> Connection<DB> {
        Connection { connection: Some(connection), home: self.inner.clone() }
    }

    /// Begins a transaction with `statement` on a connection of these.
    pub async fn begin(&self, statement: &'static str) -> Result<Transaction<DB>, sqlx::Error> {
        let connection = self.acquire().await?;
        // Open from the start: should `BEGIN` fail or be cancelled, the drop rolls back.
        let mut transaction = Transaction { connection: Some(connection) };
        DB::TransactionManager::begin(&mut transaction, Some(SqlStr::from_static(statement)))
            .await?;
        Ok(transaction)
    }

    /// Hands the kept connections back and closes the pool, waiting for every connection in
    /// use to be returned.
    pub async fn close(&self) {
        let (kept, waiters) = {
            let mut state = self.inner.state();
            (std::mem::take(&mut state.idle), std::mem::take(&mut state.waiters))
        };
        // Waiters learn that the pool is closed; the kept connections go back to it.
        drop((kept, waiters));
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
        self.home.put_back(connection);
    }

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
    /// There while the transaction is open (from before its `BEGIN`, so that a failed or
    /// cancelled `BEGIN` rolls back too); taken out when `commit` or `rollback` ends it.
    connection: Option<Connection<DB>>,
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
        if let Some(connection) = self.connection.take() {
            connection.keep();
        }
    }
}

impl<DB: Database> Drop for Transaction<DB> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
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
