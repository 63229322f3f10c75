//! Group commit: writes of one kind (the engine's step transitions — queueing, hand-offs,
//! assignments, starts, results — and the audit trail's rows) that arrive while the previous
//! batch of that kind is being committed wait for it and are then committed together, in one
//! statement: under load many writes share one commit; alone, a write goes at once (nothing
//! waits for company). Durability is unchanged: every caller gets its row back only after the
//! commit that holds it, exactly as from the one-row store methods. Reads that must see what
//! their callers committed (where the steps a fan-in waits for stand) group the same way: each
//! batch's statement begins after every caller in it handed its read in.
//! May call: the store (through the batch function it is given) and tokio, nothing else.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{AttemptKey, AuditLog, MAX_WRITE_BATCH, StepRun, StoreError, StoreResult};

/// Writes waiting for their batch before callers wait to hand theirs in.
const WAITING_WRITES: usize = 1_024;

/// What a commit answers a caller with: the row it wrote (and whatever else the same commit
/// did for that caller), found again by its key.
pub trait Changed: Send + 'static {
    /// What a caller's write and the row it changed share: an attempt for a step transition,
    /// an id for an audit row. Two writes of one key never share a batch.
    type Key: Copy + Eq + Hash + Send + 'static;

    /// The key of the write this answers.
    fn key(&self) -> Self::Key;
}

impl Changed for StepRun {
    type Key = AttemptKey;

    fn key(&self) -> AttemptKey {
        self.attempt_key()
    }
}

impl Changed for AuditLog {
    type Key = uuid::Uuid;

    fn key(&self) -> uuid::Uuid {
        self.id
    }
}

type Reply<Answer> = oneshot::Sender<StoreResult<Option<Answer>>>;
type Waiting<Request, Answer> = (<Answer as Changed>::Key, Request, Reply<Answer>);

/// Commits a batch of requests; returns what it changed.
pub type CommitBatch<Request, Answer = StepRun> = Arc<
    dyn Fn(Vec<Request>) -> Pin<Box<dyn Future<Output = StoreResult<Vec<Answer>>> + Send>>
        + Send
        + Sync,
>;

/// One kind of write, committed in groups by a task of its own.
pub struct GroupCommit<Request, Answer: Changed = StepRun> {
    sender: mpsc::Sender<Waiting<Request, Answer>>,
}

impl<Request: Clone + Send + 'static, Answer: Changed> GroupCommit<Request, Answer> {
    /// Starts the task that commits `Request`s through `commit`.
    pub fn start(commit: CommitBatch<Request, Answer>) -> Self {
        let (sender, receiver) = mpsc::channel(WAITING_WRITES);
        tokio::spawn(run(receiver, commit));
        Self { sender }
    }

    /// Commits `request` (the write of `key`: a transition of that attempt, the audit row of
    /// that id) with whatever else is waiting: the row it changed, or `None` when the store
    /// refused it.
    pub async fn submit(&self, key: Answer::Key, request: Request) -> StoreResult<Option<Answer>> {
        let (reply, answer) = oneshot::channel();
        // The task lives as long as the engine; were it gone, the commit cannot happen.
        let gone = || StoreError::Database(sqlx::Error::PoolClosed);
        self.sender.send((key, request, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run<Request: Clone + Send + 'static, Answer: Changed>(
    mut receiver: mpsc::Receiver<Waiting<Request, Answer>>,
    commit: CommitBatch<Request, Answer>,
) {
    // A second write of a key already in the batch (a second transition of one attempt) waits
    // for the next one, so each caller learns the outcome of its own write.
    let mut carried: Vec<Waiting<Request, Answer>> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            match receiver.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        let mut keys: HashSet<Answer::Key> = batch.iter().map(|(key, _, _)| *key).collect();
        while batch.len() < MAX_WRITE_BATCH {
            let Ok(next) = receiver.try_recv() else { break };
            if keys.insert(next.0) {
                batch.push(next);
            } else {
                carried.push(next);
            }
        }
        commit_batch(&commit, batch).await;
    }
}

async fn commit_batch<Request: Clone + Send + 'static, Answer: Changed>(
    commit: &CommitBatch<Request, Answer>,
    batch: Vec<Waiting<Request, Answer>>,
) {
    let requests: Vec<Request> = batch.iter().map(|(_, request, _)| request.clone()).collect();
    match commit(requests).await {
        Ok(rows) => {
            let mut rows: HashMap<Answer::Key, Answer> =
                rows.into_iter().map(|row| (row.key(), row)).collect();
            for (key, _, reply) in batch {
                let _ = reply.send(Ok(rows.remove(&key)));
            }
        }
        // The error belongs to the batch: each write is tried alone, so that every caller
        // gets its own answer (and one bad row cannot fail the others).
        Err(_) if batch.len() > 1 => {
            for (_, request, reply) in batch {
                let alone = commit(vec![request]).await.map(|mut rows| rows.pop());
                let _ = reply.send(alone);
            }
        }
        Err(error) => {
            if let Some((_, _, reply)) = batch.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
    }
}
