//! Group commit of step transitions. Transitions of one kind (queueing, hand-offs, assignments,
//! starts, results) that arrive while the previous batch of that kind is being committed wait for
//! it and are then committed together, in one statement: under load many steps share one commit;
//! alone, a transition goes at once (nothing waits for company). Durability is unchanged: every
//! caller gets its row back only after the commit that holds it, exactly as from the one-attempt
//! store methods.
//! May call: the store (through the batch function it is given), nothing else.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{AttemptKey, MAX_TRANSITION_BATCH, StepRun, StoreError, StoreResult};

/// Transitions waiting for their batch before callers wait to hand theirs in.
const WAITING_TRANSITIONS: usize = 1_024;

/// What a commit answers a caller with: the row of the attempt it changed (and whatever else
/// the same commit did for that caller).
pub trait Changed: Send + 'static {
    /// The attempt whose transition this answers.
    fn attempt_key(&self) -> AttemptKey;
}

impl Changed for StepRun {
    fn attempt_key(&self) -> AttemptKey {
        StepRun::attempt_key(self)
    }
}

type Reply<Answer> = oneshot::Sender<StoreResult<Option<Answer>>>;

/// Commits a batch of requests; returns what it changed.
pub type CommitBatch<Request, Answer = StepRun> = Arc<
    dyn Fn(Vec<Request>) -> Pin<Box<dyn Future<Output = StoreResult<Vec<Answer>>> + Send>>
        + Send
        + Sync,
>;

/// One kind of transition, committed in groups by a task of its own.
pub struct GroupCommit<Request, Answer = StepRun> {
    sender: mpsc::Sender<(AttemptKey, Request, Reply<Answer>)>,
}

impl<Request: Clone + Send + 'static, Answer: Changed> GroupCommit<Request, Answer> {
    /// Starts the task that commits `Request`s through `commit`.
    pub fn start(commit: CommitBatch<Request, Answer>) -> Self {
        let (sender, receiver) = mpsc::channel(WAITING_TRANSITIONS);
        tokio::spawn(run(receiver, commit));
        Self { sender }
    }

    /// Commits `request` (the transition of attempt `key`) with whatever else is waiting:
    /// the row it changed, or `None` when the store refused it.
    pub async fn submit(&self, key: AttemptKey, request: Request) -> StoreResult<Option<Answer>> {
        let (reply, answer) = oneshot::channel();
        // The task lives as long as the engine; were it gone, the commit cannot happen.
        let gone = || StoreError::Database(sqlx::Error::PoolClosed);
        self.sender.send((key, request, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run<Request: Clone + Send + 'static, Answer: Changed>(
    mut receiver: mpsc::Receiver<(AttemptKey, Request, Reply<Answer>)>,
    commit: CommitBatch<Request, Answer>,
) {
    // A second transition of an attempt already in the batch waits for the next one, so each
    // caller learns the outcome of its own transition.
    let mut carried: Vec<(AttemptKey, Request, Reply<Answer>)> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            match receiver.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        let mut keys: HashSet<AttemptKey> = batch.iter().map(|(key, _, _)| *key).collect();
        while batch.len() < MAX_TRANSITION_BATCH {
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
    batch: Vec<(AttemptKey, Request, Reply<Answer>)>,
) {
    let requests: Vec<Request> = batch.iter().map(|(_, request, _)| request.clone()).collect();
    match commit(requests).await {
        Ok(rows) => {
            let mut rows: std::collections::HashMap<AttemptKey, Answer> =
                rows.into_iter().map(|row| (row.attempt_key(), row)).collect();
            for (key, _, reply) in batch {
                let _ = reply.send(Ok(rows.remove(&key)));
            }
        }
        // The error belongs to the batch: each transition is tried alone, so that every caller
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
