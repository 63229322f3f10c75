//! Alert rules (owned, soft-deleted, versioned), their incidents and their delivery log
//! (migration 0010). Once per incident across replicas: at most one incident of a rule is open
//! (a partial unique index), so of the replicas that see a condition start to hold only the one
//! whose insert wins opens it, and of those that see it clear only the one whose update closes it
//! resolves it. Periodic evaluations are claimed the same way: `claim_due_alert_rules` moves a
//! rule's `next_evaluation_at` with a compare-and-set, as cron ticks are claimed.

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use super::{
    OwnerScope, Page, PageRequest, PagedList, PostgresStore, SortOrder, SqliteStore, StoreError,
    StoreResult, fetch_page, push_visible_rows,
};

text_enum! {
    /// What an alert rule watches.
    pub enum AlertConditionType {
        ExecutionFailed => "EXECUTION_FAILED",
        FailuresInWindow => "FAILURES_IN_WINDOW",
        NoRunnerAvailable => "NO_RUNNER_AVAILABLE",
        QueuedStepTooOld => "QUEUED_STEP_TOO_OLD",
        AgentFailing => "AGENT_FAILING",
    }
}

impl AlertConditionType {
    /// Whether the periodic evaluator checks it (the others are judged as executions finish).
    pub fn is_periodic(self) -> bool {
        !matches!(self, AlertConditionType::ExecutionFailed)
    }
}

text_enum! {
    /// Which notification a delivery carried.
    pub enum AlertEvent {
        Firing => "FIRING",
        Resolved => "RESOLVED",
    }
}

/// A rule as stored, with what its incidents say about it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlertRule {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub disabled: bool,
    pub condition_type: AlertConditionType,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub failure_count: i32,
    pub window_seconds: i32,
    pub threshold_seconds: i32,
    pub webhook_url: String,
    pub webhook_secret: String,
    pub allow_private_network: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// An incident is open.
    pub firing: bool,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_resolved_at: Option<DateTime<Utc>>,
}

/// What a rule is about and where it reports: the fields create sets and update may change.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRuleDefinition {
    pub name: String,
    pub description: String,
    pub disabled: bool,
    pub condition_type: AlertConditionType,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub failure_count: i32,
    pub window_seconds: i32,
    pub threshold_seconds: i32,
    pub webhook_url: String,
    pub webhook_secret: String,
    pub allow_private_network: bool,
}

impl AlertRule {
    /// The rule's definition, to merge changes into.
    pub fn definition(&self) -> AlertRuleDefinition {
        AlertRuleDefinition {
            name: self.name.clone(),
            description: self.description.clone(),
            disabled: self.disabled,
            condition_type: self.condition_type,
            workflow_id: self.workflow_id,
            deployment_id: self.deployment_id,
            agent_id: self.agent_id,
            failure_count: self.failure_count,
            window_seconds: self.window_seconds,
            threshold_seconds: self.threshold_seconds,
            webhook_url: self.webhook_url.clone(),
            webhook_secret: self.webhook_secret.clone(),
            allow_private_network: self.allow_private_network,
        }
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlertIncident {
    pub id: Uuid,
    pub rule_id: Uuid,
    pub summary: String,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlertDelivery {
    pub id: Uuid,
    pub rule_id: Uuid,
    pub incident_id: Uuid,
    pub event: AlertEvent,
    pub attempt: i32,
    pub response_status: i32,
    pub succeeded: bool,
    pub error: String,
    pub duration_ms: f64,
    pub attempted_at: DateTime<Utc>,
}

/// One attempt to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlertDelivery {
    pub rule_id: Uuid,
    pub incident_id: Uuid,
    pub event: AlertEvent,
    pub attempt: i32,
    pub response_status: i32,
    pub succeeded: bool,
    pub error: String,
    pub duration_ms: f64,
}

/// Which failed executions `count_failed_executions` counts: one owner's, of one workflow or
/// deployment when set, finished at or after `since`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureWindow {
    pub owner_id: Uuid,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    pub since: DateTime<Utc>,
}

#[async_trait]
pub trait AlertStore {
    async fn create_alert_rule(
        &self,
        owner_id: Uuid,
        definition: AlertRuleDefinition,
    ) -> StoreResult<AlertRule>;

    /// A live rule in `scope` (NotFound otherwise).
    async fn get_alert_rule(&self, scope: OwnerScope, rule_id: Uuid) -> StoreResult<AlertRule>;

    /// Live rules in `scope`, oldest first.
    async fn list_alert_rules(
        &self,
        scope: OwnerScope,
        page: PageRequest,
    ) -> StoreResult<Page<AlertRule>>;

    /// Replaces the definition if `expected_version` is current; the rule is due for an
    /// evaluation at once.
    async fn update_alert_rule(
        &self,
        scope: OwnerScope,
        rule_id: Uuid,
        expected_version: i64,
        definition: AlertRuleDefinition,
    ) -> StoreResult<AlertRule>;

    /// Soft-deletes a live rule (checking the version when one is given).
    async fn soft_delete_alert_rule(
        &self,
        scope: OwnerScope,
        rule_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// The owner's live, enabled rules judged as executions finish.
    async fn execution_alert_rules(&self, owner_id: Uuid) -> StoreResult<Vec<AlertRule>>;

    /// Claims up to `limit` periodic rules due at `now`: their next evaluation moves to `next`,
    /// and only the caller whose update moved it gets the id back.
    async fn claim_due_alert_rules(
        &self,
        now: DateTime<Utc>,
        next: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Uuid>>;

    /// Opens an incident of the rule unless one is open; `None` when one was.
    async fn open_alert_incident(
        &self,
        rule_id: Uuid,
        summary: &str,
    ) -> StoreResult<Option<AlertIncident>>;

    /// Closes the rule's open incident; `None` when none was open.
    async fn resolve_alert_incident(&self, rule_id: Uuid) -> StoreResult<Option<AlertIncident>>;

    async fn record_alert_delivery(&self, delivery: NewAlertDelivery) -> StoreResult<()>;

    /// A rule's deliveries, newest first.
    async fn list_alert_deliveries(
        &self,
        rule_id: Uuid,
        page: PageRequest,
    ) -> StoreResult<Page<AlertDelivery>>;

    /// A rule's incidents, newest first.
    async fn list_alert_incidents(
        &self,
        rule_id: Uuid,
        page: PageRequest,
    ) -> StoreResult<Page<AlertIncident>>;

    /// Executions that ended FAILED or TIMED_OUT in the window.
    async fn count_failed_executions(&self, window: FailureWindow) -> StoreResult<i64>;
}

fn current_time() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The rule's columns and what its incidents say, for `SELECT … FROM alert_rules`.
const RULE_COLUMNS: &str = "SELECT id, owner_id, name, description, disabled, condition_type, \
     workflow_id, deployment_id, agent_id, failure_count, window_seconds, threshold_seconds, \
     webhook_url, webhook_secret, allow_private_network, version, created_at, updated_at, \
     EXISTS (SELECT 1 FROM alert_incidents i WHERE i.rule_id = alert_rules.id \
     AND i.resolved_at IS NULL) AS firing, \
     (SELECT MAX(i.opened_at) FROM alert_incidents i WHERE i.rule_id = alert_rules.id) \
     AS last_fired_at, \
     (SELECT MAX(i.resolved_at) FROM alert_incidents i WHERE i.rule_id = alert_rules.id) \
     AS last_resolved_at FROM alert_rules";

macro_rules! impl_alert_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// A rule whose write matched no row: missing (or another owner's), or a newer
            /// version.
            async fn alerts_missing_or_conflict(
                &self,
                scope: OwnerScope,
                rule_id: Uuid,
            ) -> StoreError {
                match self.get_alert_rule(scope, rule_id).await {
                    Ok(rule) => StoreError::VersionConflict { current_version: rule.version },
                    Err(error) => error,
                }
            }
        }

        #[async_trait]
        impl AlertStore for $store {
            async fn create_alert_rule(
                &self,
                owner_id: Uuid,
                definition: AlertRuleDefinition,
            ) -> StoreResult<AlertRule> {
                let now = current_time();
                let rule_id = Uuid::now_v7();
                sqlx::query::<$db>(
                    "INSERT INTO alert_rules (id, owner_id, name, description, disabled, \
                     condition_type, workflow_id, deployment_id, agent_id, failure_count, \
                     window_seconds, threshold_seconds, webhook_url, webhook_secret, \
                     allow_private_network, next_evaluation_at, version, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                     $16, 1, $16, $16)",
                )
                .bind(rule_id)
                .bind(owner_id)
                .bind(&definition.name)
                .bind(&definition.description)
                .bind(definition.disabled)
                .bind(definition.condition_type)
                .bind(definition.workflow_id)
                .bind(definition.deployment_id)
                .bind(definition.agent_id)
                .bind(definition.failure_count)
                .bind(definition.window_seconds)
                .bind(definition.threshold_seconds)
                .bind(&definition.webhook_url)
                .bind(&definition.webhook_secret)
                .bind(definition.allow_private_network)
                .bind(now)
                .execute(&self.connections)
                .await?;
                self.get_alert_rule(OwnerScope::Owner(owner_id), rule_id).await
            }

            async fn get_alert_rule(
                &self,
                scope: OwnerScope,
                rule_id: Uuid,
            ) -> StoreResult<AlertRule> {
                let mut query = sqlx::QueryBuilder::<$db>::new(RULE_COLUMNS);
                push_visible_rows(&mut query, scope);
                query.push(" AND id = ").push_bind(rule_id);
                query.build_query_as::<AlertRule>().fetch_optional(&self.connections).await?.ok_or(StoreError::NotFound)
            }

            async fn list_alert_rules(
                &self,
                scope: OwnerScope,
                page: PageRequest,
            ) -> StoreResult<Page<AlertRule>> {
                let list = PagedList {
                    counted: None,
                    count_statement: "SELECT COUNT(*) FROM alert_rules",
                    rows_statement: RULE_COLUMNS,
                    order: SortOrder { field: "created_at", descending: false },
                    page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    push_visible_rows(builder, scope)
                })
                .await
            }

            async fn update_alert_rule(
                &self,
                scope: OwnerScope,
                rule_id: Uuid,
                expected_version: i64,
                definition: AlertRuleDefinition,
            ) -> StoreResult<AlertRule> {
                let now = current_time();
                let mut query = sqlx::QueryBuilder::<$db>::new("UPDATE alert_rules SET name = ");
                query.push_bind(definition.name);
                query.push(", description = ").push_bind(definition.description);
                query.push(", disabled = ").push_bind(definition.disabled);
                query.push(", condition_type = ").push_bind(definition.condition_type);
                query.push(", workflow_id = ").push_bind(definition.workflow_id);
                query.push(", deployment_id = ").push_bind(definition.deployment_id);
                query.push(", agent_id = ").push_bind(definition.agent_id);
                query.push(", failure_count = ").push_bind(definition.failure_count);
                query.push(", window_seconds = ").push_bind(definition.window_seconds);
                query.push(", threshold_seconds = ").push_bind(definition.threshold_seconds);
                query.push(", webhook_url = ").push_bind(definition.webhook_url);
                query.push(", webhook_secret = ").push_bind(definition.webhook_secret);
                query
                    .push(", allow_private_network = ")
                    .push_bind(definition.allow_private_network);
                query.push(", next_evaluation_at = ").push_bind(now);
                query.push(", updated_at = ").push_bind(now);
                query.push(", version = version + 1");
                push_visible_rows(&mut query, scope);
                query.push(" AND id = ").push_bind(rule_id);
                query.push(" AND version = ").push_bind(expected_version);
                let updated = query.build().execute(&self.connections).await?.rows_affected();
                if updated == 0 {
                    return Err(self.alerts_missing_or_conflict(scope, rule_id).await);
                }
                self.get_alert_rule(scope, rule_id).await
            }

            async fn soft_delete_alert_rule(
                &self,
                scope: OwnerScope,
                rule_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let now = current_time();
                let mut query =
                    sqlx::QueryBuilder::<$db>::new("UPDATE alert_rules SET deleted_at = ");
                query.push_bind(now);
                query.push(", updated_at = ").push_bind(now);
                query.push(", version = version + 1");
                push_visible_rows(&mut query, scope);
                query.push(" AND id = ").push_bind(rule_id);
                if let Some(version) = expected_version {
                    query.push(" AND version = ").push_bind(version);
                }
                let updated = query.build().execute(&self.connections).await?.rows_affected();
                if updated == 0 {
                    return Err(self.alerts_missing_or_conflict(scope, rule_id).await);
                }
                Ok(())
            }

            async fn execution_alert_rules(&self, owner_id: Uuid) -> StoreResult<Vec<AlertRule>> {
                let mut query = sqlx::QueryBuilder::<$db>::new(RULE_COLUMNS);
                push_visible_rows(&mut query, OwnerScope::Owner(owner_id));
                query.push(
                    " AND disabled = FALSE AND condition_type IN \
                     ('EXECUTION_FAILED', 'FAILURES_IN_WINDOW')",
                );
                Ok(query.build_query_as::<AlertRule>().fetch_all(&self.connections).await?)
            }

            async fn claim_due_alert_rules(
                &self,
                now: DateTime<Utc>,
                next: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<Uuid>> {
                // The outer `next_evaluation_at <=` is checked again on the locked row
                // (PostgreSQL) or under the write lock (SQLite): of two replicas claiming the
                // same rule, the second one's update matches nothing.
                let claimed: Vec<(Uuid,)> = sqlx::query_as::<$db, (Uuid,)>(
                    "UPDATE alert_rules SET next_evaluation_at = $2 WHERE id IN (SELECT id FROM \
                     alert_rules WHERE deleted_at IS NULL AND disabled = FALSE \
                     AND condition_type <> 'EXECUTION_FAILED' AND next_evaluation_at <= $1 \
                     ORDER BY next_evaluation_at LIMIT $3) AND next_evaluation_at <= $1 \
                     AND deleted_at IS NULL RETURNING id",
                )
                .bind(now)
                .bind(next)
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
                Ok(claimed.into_iter().map(|(id,)| id).collect())
            }

            async fn open_alert_incident(
                &self,
                rule_id: Uuid,
                summary: &str,
            ) -> StoreResult<Option<AlertIncident>> {
                let statement = concat!(
                    "INSERT INTO alert_incidents (id, rule_id, summary, opened_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING ",
                    "id, rule_id, summary, opened_at, resolved_at"
                );
                Ok(sqlx::query_as::<$db, AlertIncident>(statement)
                    .bind(Uuid::now_v7())
                    .bind(rule_id)
                    .bind(summary)
                    .bind(current_time())
                    .fetch_optional(&self.connections)
                    .await?)
            }

            async fn resolve_alert_incident(
                &self,
                rule_id: Uuid,
            ) -> StoreResult<Option<AlertIncident>> {
                let statement = concat!(
                    "UPDATE alert_incidents SET resolved_at = $2 \
                     WHERE rule_id = $1 AND resolved_at IS NULL RETURNING ",
                    "id, rule_id, summary, opened_at, resolved_at"
                );
                Ok(sqlx::query_as::<$db, AlertIncident>(statement)
                    .bind(rule_id)
                    .bind(current_time())
                    .fetch_optional(&self.connections)
                    .await?)
            }

            async fn record_alert_delivery(&self, delivery: NewAlertDelivery) -> StoreResult<()> {
                sqlx::query::<$db>(
                    "INSERT INTO alert_deliveries (id, rule_id, incident_id, event, attempt, \
                     response_status, succeeded, error, duration_ms, attempted_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(Uuid::now_v7())
                .bind(delivery.rule_id)
                .bind(delivery.incident_id)
                .bind(delivery.event)
                .bind(delivery.attempt)
                .bind(delivery.response_status)
                .bind(delivery.succeeded)
                .bind(&delivery.error)
                .bind(delivery.duration_ms)
                .bind(current_time())
                .execute(&self.connections)
                .await?;
                Ok(())
            }

            async fn list_alert_deliveries(
                &self,
                rule_id: Uuid,
                page: PageRequest,
            ) -> StoreResult<Page<AlertDelivery>> {
                let list = PagedList {
                    counted: None,
                    count_statement: "SELECT COUNT(*) FROM alert_deliveries",
                    rows_statement: "SELECT id, rule_id, incident_id, event, attempt, \
                         response_status, succeeded, error, duration_ms, attempted_at \
                         FROM alert_deliveries",
                    order: SortOrder { field: "attempted_at", descending: true },
                    page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    builder.push(" WHERE rule_id = ").push_bind(rule_id);
                })
                .await
            }

            async fn list_alert_incidents(
                &self,
                rule_id: Uuid,
                page: PageRequest,
            ) -> StoreResult<Page<AlertIncident>> {
                let list = PagedList {
                    counted: None,
                    count_statement: "SELECT COUNT(*) FROM alert_incidents",
                    rows_statement: concat!(
                        "SELECT ",
                        "id, rule_id, summary, opened_at, resolved_at",
                        " FROM alert_incidents"
                    ),
                    order: SortOrder { field: "opened_at", descending: true },
                    page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    builder.push(" WHERE rule_id = ").push_bind(rule_id);
                })
                .await
            }

            async fn count_failed_executions(&self, window: FailureWindow) -> StoreResult<i64> {
                let mut query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT COUNT(*) FROM executions WHERE status IN ('FAILED', 'TIMED_OUT') \
                     AND owner_id = ",
                );
                query.push_bind(window.owner_id);
                query.push(" AND finished_at >= ").push_bind(window.since);
                query.push(" AND deleted_at IS NULL AND parent_execution_id IS NULL");
                if let Some(workflow_id) = window.workflow_id {
                    query.push(" AND workflow_id = ").push_bind(workflow_id);
                }
                if let Some(deployment_id) = window.deployment_id {
                    query.push(" AND deployment_id = ").push_bind(deployment_id);
                }
                Ok(query.build_query_scalar::<i64>().fetch_one(&self.connections).await?)
            }
        }
    };
}

impl_alert_store!(PostgresStore, sqlx::Postgres);
impl_alert_store!(SqliteStore, sqlx::Sqlite);
