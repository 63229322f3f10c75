//! Writing the audit trail. A failure to write an audit row is logged, never shown to the
//! caller as the failure of the operation that already happened. Rows appended at the same
//! moment share one commit (`AppContext::audit_trail`, the store's group commit); a caller
//! still returns only after its row is committed.

use crate::app::AppContext;
use crate::auth::caller::{Caller, ClientInfo, Credential};
use crate::store::{AuditActorKind, AuditOutcome, NewAuditLog};

/// One audit event before it is written.
pub struct AuditEvent<'a> {
    pub action: &'a str,
    pub resource_type: &'a str,
    pub resource_id: Option<String>,
    pub outcome: AuditOutcome,
    pub changes: Option<serde_json::Value>,
    pub metadata: serde_json::Value,
}

impl<'a> AuditEvent<'a> {
    pub fn success(action: &'a str, resource_type: &'a str, resource_id: Option<String>) -> Self {
        Self {
            action,
            resource_type,
            resource_id,
            outcome: AuditOutcome::Success,
            changes: None,
            metadata: serde_json::json!({}),
        }
    }

    pub fn failure(action: &'a str, resource_type: &'a str, resource_id: Option<String>) -> Self {
        Self { outcome: AuditOutcome::Failure, ..Self::success(action, resource_type, resource_id) }
    }

    pub fn with_changes(mut self, changes: serde_json::Value) -> Self {
        self.changes = Some(changes);
        self
    }

    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// Who acted, as the trail records it.
pub enum Actor<'a> {
    Caller(&'a Caller),
    /// A user acting without a session yet (register, login).
    User(uuid::Uuid),
    Anonymous,
}

/// Appends `event` done by `actor` from `client`.
pub async fn record(
    context: &AppContext,
    actor: Actor<'_>,
    client: &ClientInfo,
    event: AuditEvent<'_>,
) {
    let (actor_id, actor_kind, mut metadata) = match actor {
        Actor::Caller(caller) => match &caller.credential {
            Credential::ApiKey { api_key_id, .. } => (
                Some(caller.user_id),
                AuditActorKind::ApiKey,
                serde_json::json!({ "apiKeyId": api_key_id }),
            ),
            _ => (Some(caller.user_id), AuditActorKind::User, serde_json::json!({})),
        },
        Actor::User(user_id) => (Some(user_id), AuditActorKind::User, serde_json::json!({})),
        Actor::Anonymous => (None, AuditActorKind::System, serde_json::json!({})),
    };
    if let (serde_json::Value::Object(target), serde_json::Value::Object(extra)) =
        (&mut metadata, event.metadata)
    {
        target.extend(extra);
    }
    let entry = NewAuditLog {
        id: uuid::Uuid::now_v7(),
        actor_id,
        actor_kind,
        action: event.action.to_owned(),
        resource_type: event.resource_type.to_owned(),
        resource_id: event.resource_id,
        outcome: event.outcome,
        ip_address: client.ip_address.map(|address| address.to_string()),
        user_agent: client.user_agent.clone(),
        request_id: client.request_id.clone(),
        changes: event.changes,
        metadata,
    };
    // With the rows other requests append at the same moment, in one commit.
    match context.audit_trail.submit(entry.id, entry).await {
        Ok(Some(_)) => {}
        Ok(None) => tracing::error!(action = event.action, "an audit row was not written"),
        Err(error) => {
            tracing::error!(%error, action = event.action, "could not write an audit row")
        }
    }
}
