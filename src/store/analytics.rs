//! Analytics reads: the rollup rows the database maintains as executions and step attempts finish
//! (migration 0008: `execution_rollups`, `step_rollups`, `error_rollups`, `usage_rollups`),
//! summed over a range, and the few live counts health needs. Every range is in whole hours
//! (epoch seconds), so a query reads rows in proportion to the range, never to the history.
//! The only write is `add_api_calls`, which the servers' usage counters flush.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{OwnerScope, PostgresStore, SqliteStore, StoreResult};

/// The growth factor of the duration histogram's buckets (see the migration).
pub const DURATION_BUCKET_GROWTH: f64 = 1.25;
/// The upper edge of bucket 0, in seconds.
pub const DURATION_BUCKET_BASE_SECONDS: f64 = 0.001;

/// The upper edge in seconds of a duration histogram bucket (bucket 0 is 1 ms, each next one 25%
/// wider), as the migration's table holds it.
pub fn duration_bucket_upper_seconds(bucket: i32) -> f64 {
    let mut upper = DURATION_BUCKET_BASE_SECONDS;
    for _ in 0..bucket.max(0) {
        upper *= DURATION_BUCKET_GROWTH;
    }
    upper
}

/// `[from_hour, to_hour)`, both epoch seconds at a whole hour (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourRange {
    pub from_hour: i64,
    pub to_hour: i64,
}

impl HourRange {
    /// The whole hours that cover `[from, to)`: `from` rounded down, `to` rounded up.
    pub fn covering(from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        let from_hour = from.timestamp().div_euclid(3600) * 3600;
        let to_seconds = to.timestamp() + i64::from(to.timestamp_subsec_nanos() > 0);
        let to_hour = (to_seconds + 3599).div_euclid(3600) * 3600;
        Self { from_hour, to_hour }
    }
}

/// Which rollup rows to sum: every condition that is set applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupFilter {
    pub owner_id: Option<Uuid>,
    pub workflow_id: Option<Uuid>,
    /// Step rollups only.
    pub agent_id: Option<Uuid>,
}

impl RollupFilter {
    /// The rows of everything `scope` may see.
    pub fn scope(scope: OwnerScope) -> Self {
        Self { owner_id: scope.owner_id(), ..Self::default() }
    }
}

/// Finished executions (or step attempts) of one status in one bucket.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OutcomeTally {
    /// Epoch seconds of the bucket's start.
    pub bucket_start: i64,
    /// `SUCCEEDED`, `FAILED`, `CANCELLED` or `TIMED_OUT`.
    pub status: String,
    pub count: i64,
    /// Step rollups: attempts the retry policy started; 0 for executions.
    pub retries: i64,
}

/// One bucket of a duration histogram (`duration_bucket` -1: finished without starting).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DurationTally {
    pub duration_bucket: i32,
    pub count: i64,
    pub duration_seconds: f64,
}

/// What to rank workflows by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkflowRankingOrder {
    MostExecutions,
    MostFailures,
}

/// A workflow's finished executions in a range (`name` is `None` once it is purged).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WorkflowTally {
    pub workflow_id: Uuid,
    pub name: Option<String>,
    pub executions: i64,
    pub failed: i64,
}

/// An error message and how often it ended a run in a range.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ErrorTally {
    pub message: String,
    pub occurrences: i64,
}

/// One user's usage on one day.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UsageTally {
    pub user_id: Uuid,
    /// Epoch seconds of midnight UTC.
    pub day_start: i64,
    pub api_calls: i64,
    pub executions_started: i64,
    pub step_seconds: f64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// API calls to add to one user's day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCallCount {
    pub user_id: Uuid,
    pub day_start: i64,
    pub calls: i64,
}

/// Live resources in a scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ResourceCounts {
    pub agents: i64,
    pub workflows: i64,
    pub deployments: i64,
    pub queued_executions: i64,
    pub running_executions: i64,
}

/// QUEUED steps of executions of one priority.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueueDepthTally {
    pub priority: i32,
    pub queued_steps: i64,
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait AnalyticsStore {
    /// Live agents, workflows and deployments, and unfinished executions, in `scope`.
    async fn resource_counts(&self, scope: OwnerScope) -> StoreResult<ResourceCounts>;

    /// Finished executions in `range` by bucket (`bucket_seconds` wide, from the epoch) and
    /// status. `filter.agent_id` must be unset.
    async fn execution_outcomes(
        &self,
        filter: RollupFilter,
        range: HourRange,
        bucket_seconds: i64,
    ) -> StoreResult<Vec<OutcomeTally>>;

    /// The duration histogram of the executions that finished in `range`.
    async fn execution_durations(
        &self,
        filter: RollupFilter,
        range: HourRange,
    ) -> StoreResult<Vec<DurationTally>>;

    /// Up to `limit` workflows in `scope` ranked by `order` over `range` (workflows without a
    /// failure are left out of `MostFailures`).
    async fn rank_workflows(
        &self,
        scope: OwnerScope,
        range: HourRange,
        order: WorkflowRankingOrder,
        limit: u32,
    ) -> StoreResult<Vec<WorkflowTally>>;

    /// Finished step attempts in `range` by bucket and status, with their retries.
    async fn step_outcomes(
        &self,
        filter: RollupFilter,
        range: HourRange,
        bucket_seconds: i64,
    ) -> StoreResult<Vec<OutcomeTally>>;

    /// The duration histogram of the step attempts that finished in `range`.
    async fn step_durations(
        &self,
        filter: RollupFilter,
        range: HourRange,
    ) -> StoreResult<Vec<DurationTally>>;

    /// The `limit` most frequent errors of a workflow's executions or an agent's attempts.
    async fn top_errors(
        &self,
        subject_id: Uuid,
        range: HourRange,
        limit: u32,
    ) -> StoreResult<Vec<ErrorTally>>;

    /// Usage per user and day for the days starting in `[from_day, to_day)`, by day then user.
    async fn usage(
        &self,
        scope: OwnerScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<Vec<UsageTally>>;

    /// Adds API calls to the users' days, in one transaction (rows locked in key order).
    async fn add_api_calls(&self, counts: &[ApiCallCount]) -> StoreResult<()>;

    /// QUEUED steps by execution priority (highest first) in `scope`.
    async fn queue_depth(&self, scope: OwnerScope) -> StoreResult<Vec<QueueDepthTally>>;
}

/// ` AND owner_id = … AND workflow_id = … AND agent_id = …` for the conditions that are set.
fn push_rollup_filter<Database>(builder: &mut sqlx::QueryBuilder<Database>, filter: RollupFilter)
where
    Database: sqlx::Database,
    for<'query> Uuid: sqlx::Encode<'query, Database> + sqlx::Type<Database>,
{
    if let Some(owner_id) = filter.owner_id {
        builder.push(" AND owner_id = ").push_bind(owner_id);
    }
    if let Some(workflow_id) = filter.workflow_id {
        builder.push(" AND workflow_id = ").push_bind(workflow_id);
    }
    if let Some(agent_id) = filter.agent_id {
        builder.push(" AND agent_id = ").push_bind(agent_id);
    }
}

/// ` WHERE hour_start >= … AND hour_start < …`.
fn push_hour_range<Database>(builder: &mut sqlx::QueryBuilder<Database>, range: HourRange)
where
    Database: sqlx::Database,
    for<'query> i64: sqlx::Encode<'query, Database> + sqlx::Type<Database>,
{
    builder.push(" WHERE hour_start >= ").push_bind(range.from_hour);
    builder.push(" AND hour_start < ").push_bind(range.to_hour);
}

macro_rules! impl_analytics_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Outcomes of one rollup table (`executions` or `attempts` is its count column).
            async fn outcomes(
                &self,
                statement: &'static str,
                filter: RollupFilter,
                range: HourRange,
                bucket_seconds: i64,
            ) -> StoreResult<Vec<OutcomeTally>> {
                debug_assert!(bucket_seconds > 0 && bucket_seconds % 3600 == 0);
                let mut query = sqlx::QueryBuilder::<$db>::new("SELECT hour_start / ");
                query.push_bind(bucket_seconds);
                query.push(" * ");
                query.push_bind(bucket_seconds);
                query.push(statement);
                push_hour_range(&mut query, range);
                push_rollup_filter(&mut query, filter);
                query.push(" GROUP BY 1, status ORDER BY 1, status");
                Ok(query.build_query_as::<OutcomeTally>().fetch_all(&self.connections).await?)
            }

            async fn durations(
                &self,
                statement: &'static str,
                filter: RollupFilter,
                range: HourRange,
            ) -> StoreResult<Vec<DurationTally>> {
                let mut query = sqlx::QueryBuilder::<$db>::new(statement);
                push_hour_range(&mut query, range);
                push_rollup_filter(&mut query, filter);
                query.push(" GROUP BY duration_bucket ORDER BY duration_bucket");
                Ok(query.build_query_as::<DurationTally>().fetch_all(&self.connections).await?)
            }
        }

        #[async_trait]
        impl AnalyticsStore for $store {
            async fn resource_counts(&self, scope: OwnerScope) -> StoreResult<ResourceCounts> {
                let owner = |query: &mut sqlx::QueryBuilder<$db>| {
                    if let Some(owner_id) = scope.owner_id() {
                        query.push(" AND owner_id = ").push_bind(owner_id);
                    }
                };
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT (SELECT COUNT(*) FROM agents WHERE deleted_at IS NULL",
                );
                owner(&mut query);
                query.push(") AS agents, (SELECT COUNT(*) FROM workflows WHERE deleted_at IS NULL");
                owner(&mut query);
                query.push(
                    ") AS workflows, (SELECT COUNT(*) FROM deployments WHERE deleted_at IS NULL",
                );
                owner(&mut query);
                query.push(
                    ") AS deployments, (SELECT COUNT(*) FROM executions \
                     WHERE deleted_at IS NULL AND status = 'QUEUED'",
                );
                owner(&mut query);
                query.push(
                    ") AS queued_executions, (SELECT COUNT(*) FROM executions \
                     WHERE deleted_at IS NULL AND status = 'RUNNING'",
                );
                owner(&mut query);
                query.push(") AS running_executions");
                Ok(query.build_query_as::<ResourceCounts>().fetch_one(&self.connections).await?)
            }

            async fn execution_outcomes(
                &self,
                filter: RollupFilter,
                range: HourRange,
                bucket_seconds: i64,
            ) -> StoreResult<Vec<OutcomeTally>> {
                debug_assert!(filter.agent_id.is_none(), "executions have no agent");
                self.outcomes(
                    " AS bucket_start, status, CAST(SUM(executions) AS BIGINT) AS count, \
                     CAST(0 AS BIGINT) AS retries FROM execution_rollups",
                    filter,
                    range,
                    bucket_seconds,
                )
                .await
            }

            async fn execution_durations(
                &self,
                filter: RollupFilter,
                range: HourRange,
            ) -> StoreResult<Vec<DurationTally>> {
                self.durations(
                    "SELECT duration_bucket, CAST(SUM(executions) AS BIGINT) AS count, \
                     SUM(duration_seconds) AS duration_seconds FROM execution_rollups",
                    filter,
                    range,
                )
                .await
            }

            async fn rank_workflows(
                &self,
                scope: OwnerScope,
                range: HourRange,
                order: WorkflowRankingOrder,
                limit: u32,
            ) -> StoreResult<Vec<WorkflowTally>> {
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT r.workflow_id AS workflow_id, w.name AS name, r.executions AS \
                     executions, r.failed AS failed FROM (SELECT workflow_id, \
                     CAST(SUM(executions) AS BIGINT) AS executions, \
                     CAST(SUM(CASE WHEN status IN ('FAILED', 'TIMED_OUT') THEN executions \
                     ELSE 0 END) AS BIGINT) AS failed FROM execution_rollups",
                );
                push_hour_range(&mut query, range);
                push_rollup_filter(&mut query, RollupFilter::scope(scope));
                query.push(" AND workflow_id <> ").push_bind(Uuid::nil());
                query.push(" GROUP BY workflow_id) r LEFT JOIN workflows w ON w.id = r.workflow_id");
                match order {
                    WorkflowRankingOrder::MostExecutions => {
                        query.push(" ORDER BY r.executions DESC, r.workflow_id");
                    }
                    WorkflowRankingOrder::MostFailures => {
                        query.push(" WHERE r.failed > 0 ORDER BY r.failed DESC, r.workflow_id");
                    }
                }
                query.push(" LIMIT ").push_bind(i64::from(limit));
                Ok(query.build_query_as::<WorkflowTally>().fetch_all(&self.connections).await?)
            }

            async fn step_outcomes(
                &self,
                filter: RollupFilter,
                range: HourRange,
                bucket_seconds: i64,
            ) -> StoreResult<Vec<OutcomeTally>> {
                self.outcomes(
                    " AS bucket_start, status, CAST(SUM(attempts) AS BIGINT) AS count, \
                     CAST(SUM(retries) AS BIGINT) AS retries FROM step_rollups",
                    filter,
                    range,
                    bucket_seconds,
                )
                .await
            }

            async fn step_durations(
                &self,
                filter: RollupFilter,
                range: HourRange,
            ) -> StoreResult<Vec<DurationTally>> {
                self.durations(
                    "SELECT duration_bucket, CAST(SUM(attempts) AS BIGINT) AS count, \
                     SUM(duration_seconds) AS duration_seconds FROM step_rollups",
                    filter,
                    range,
                )
                .await
            }

            async fn top_errors(
                &self,
                subject_id: Uuid,
                range: HourRange,
                limit: u32,
            ) -> StoreResult<Vec<ErrorTally>> {
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT message, CAST(SUM(occurrences) AS BIGINT) AS occurrences \
                     FROM error_rollups",
                );
                push_hour_range(&mut query, range);
                query.push(" AND subject_id = ").push_bind(subject_id);
                query.push(" GROUP BY message ORDER BY 2 DESC, message LIMIT ");
                query.push_bind(i64::from(limit));
                Ok(query.build_query_as::<ErrorTally>().fetch_all(&self.connections).await?)
            }

            async fn usage(
                &self,
                scope: OwnerScope,
                from_day: i64,
                to_day: i64,
            ) -> StoreResult<Vec<UsageTally>> {
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT user_id, day_start, CAST(SUM(api_calls) AS BIGINT) AS api_calls, \
                     CAST(SUM(executions_started) AS BIGINT) AS executions_started, \
                     SUM(step_seconds) AS step_seconds, \
                     CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
                     CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens \
                     FROM usage_rollups WHERE day_start >= ",
                );
                query.push_bind(from_day);
                query.push(" AND day_start < ").push_bind(to_day);
                if let Some(owner_id) = scope.owner_id() {
                    query.push(" AND user_id = ").push_bind(owner_id);
                }
                query.push(" GROUP BY user_id, day_start ORDER BY day_start, user_id");
                Ok(query.build_query_as::<UsageTally>().fetch_all(&self.connections).await?)
            }

            async fn add_api_calls(&self, counts: &[ApiCallCount]) -> StoreResult<()> {
                if counts.is_empty() {
                    return Ok(());
                }
                // One order for every writer, so two replicas' flushes cannot deadlock.
                let mut sorted = counts.to_vec();
                sorted.sort_by_key(|count| (count.user_id, count.day_start));
                let mut transaction = self.connections.begin("BEGIN").await?;
                for count in &sorted {
                    sqlx::query::<$db>(
                        "INSERT INTO usage_rollups (user_id, day_start, api_calls) \
                         VALUES ($1, $2, $3) ON CONFLICT (user_id, day_start, shard) DO UPDATE \
                         SET api_calls = usage_rollups.api_calls + excluded.api_calls",
                    )
                    .bind(count.user_id)
                    .bind(count.day_start)
                    .bind(count.calls)
                    .execute(&mut *transaction)
                    .await?;
                }
                transaction.commit().await?;
                Ok(())
            }

            async fn queue_depth(&self, scope: OwnerScope) -> StoreResult<Vec<QueueDepthTally>> {
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT e.priority AS priority, COUNT(*) AS queued_steps, \
                     MIN(s.queued_at) AS oldest_queued_at FROM step_runs s \
                     JOIN executions e ON e.id = s.execution_id WHERE s.status = 'QUEUED'",
                );
                if let Some(owner_id) = scope.owner_id() {
                    query.push(" AND e.owner_id = ").push_bind(owner_id);
                }
                query.push(" GROUP BY e.priority ORDER BY e.priority DESC");
                Ok(query.build_query_as::<QueueDepthTally>().fetch_all(&self.connections).await?)
            }
        }
    };
}

impl_analytics_store!(PostgresStore, sqlx::Postgres);
impl_analytics_store!(SqliteStore, sqlx::Sqlite);
