//! Reading the audit trail (admin only): filtered by actor, action, resource and time, newest
//! first, cursor-paged. Writing it is `service::audit`. May call: the store.

use super::validate::{Validator, cursor_page_size};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{AuditActionFilter, AuditActorKind, AuditLog, AuditLogFilter, AuditOutcome};

/// The longest action, resource type or resource id filter.
const MAX_FILTER_CHARS: usize = 200;
/// The longest cursor the store hands out is far shorter; anything longer is not one of ours.
const MAX_CURSOR_CHARS: usize = 512;

fn actor_kind_to_proto(kind: AuditActorKind) -> pb::ActorKind {
    match kind {
        AuditActorKind::User => pb::ActorKind::User,
        AuditActorKind::ApiKey => pb::ActorKind::ApiKey,
        AuditActorKind::System => pb::ActorKind::System,
    }
}

fn outcome_to_proto(outcome: AuditOutcome) -> pb::AuditOutcome {
    match outcome {
        AuditOutcome::Success => pb::AuditOutcome::Success,
        AuditOutcome::Failure => pb::AuditOutcome::Failure,
    }
}

/// An audit row as the API shows it.
pub fn audit_log_to_proto(row: &AuditLog) -> pb::AuditLog {
    pb::AuditLog {
        id: row.id.to_string(),
        actor_id: row.actor_id.map(|id| id.to_string()).unwrap_or_default(),
        actor_kind: actor_kind_to_proto(row.actor_kind).into(),
        action: row.action.clone(),
        resource_type: row.resource_type.clone(),
        resource_id: row.resource_id.clone().unwrap_or_default(),
        outcome: outcome_to_proto(row.outcome).into(),
        ip_address: row.ip_address.clone().unwrap_or_default(),
        user_agent: row.user_agent.clone().unwrap_or_default(),
        request_id: row.request_id.clone().unwrap_or_default(),
        changes: row.changes.as_ref().map(wkt::json_object_to_struct),
        metadata: Some(wkt::json_object_to_struct(&row.metadata)),
        created_at: Some(wkt::timestamp(row.created_at)),
    }
}

/// A trimmed, non-empty text filter of at most `MAX_FILTER_CHARS`.
fn text_filter(validator: &mut Validator, field: &str, value: &str) -> Option<String> {
    let trimmed = value.trim();
    validator.max_chars(field, trimmed, MAX_FILTER_CHARS);
    Some(trimmed.to_owned()).filter(|text| !text.is_empty())
}

/// Reads the filter of a list request, reporting every bad field.
fn audit_filter(request: pb::ListAuditLogsRequest) -> ServiceResult<AuditLogFilter> {
    let mut validator = Validator::new();
    let mut filter = AuditLogFilter {
        limit: cursor_page_size(&mut validator, request.page_size, 20),
        ..AuditLogFilter::default()
    };
    let actor_id = request.actor_id.trim();
    if !actor_id.is_empty() {
        match uuid::Uuid::parse_str(actor_id) {
            Ok(id) => filter.actor_id = Some(id),
            Err(_) => {
                validator.error("actorId", "is not a valid id");
            }
        }
    }
    filter.action = text_filter(&mut validator, "action", &request.action).map(|action| {
        if action.ends_with('.') {
            AuditActionFilter::Prefix(action)
        } else {
            AuditActionFilter::Exact(action)
        }
    });
    filter.resource_type = text_filter(&mut validator, "resourceType", &request.resource_type);
    filter.resource_id = text_filter(&mut validator, "resourceId", &request.resource_id);
    if let Some(start) = &request.start_time {
        filter.from = wkt::time_from_timestamp(start);
        if filter.from.is_none() {
            validator.error("startTime", "is not a valid time");
        }
    }
    if let Some(end) = &request.end_time {
        filter.to = wkt::time_from_timestamp(end);
        if filter.to.is_none() {
            validator.error("endTime", "is not a valid time");
        }
    }
    if let (Some(from), Some(to)) = (filter.from, filter.to)
        && to <= from
    {
        validator.error("endTime", "must be after startTime");
    }
    let cursor = request.cursor.trim();
    if cursor.len() > MAX_CURSOR_CHARS {
        validator.error("cursor", "is not a cursor this API gave out");
    } else if !cursor.is_empty() {
        filter.cursor = Some(cursor.to_owned());
    }
    validator.finish()?;
    Ok(filter)
}

/// The audit trail, newest first, a page at a time (admin only).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_audit_logs(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListAuditLogsRequest,
) -> ServiceResult<pb::ListAuditLogsResponse> {
    caller.require_user_access(Access::Read)?;
    caller.require_admin()?;
    let filter = audit_filter(request)?;
    let page_size = filter.limit;
    let found = context
        .store
        .list_audit_logs(filter)
        .await
        .map_err(|error| ServiceError::from_store(error, "audit log"))?;
    Ok(pb::ListAuditLogsResponse {
        audit_logs: found.items.iter().map(audit_log_to_proto).collect(),
        pagination: Some(pb::Pagination {
            page: 0,
            page_size: i32::try_from(page_size).unwrap_or(i32::MAX),
            total: 0,
            total_pages: 0,
            next_cursor: found.next_cursor.unwrap_or_default(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_read_and_bad_ones_all_reported() {
        let filter = audit_filter(pb::ListAuditLogsRequest {
            action: "agent.".into(),
            resource_type: " agent ".into(),
            ..Default::default()
        })
        .expect("good filter");
        assert_eq!(filter.action, Some(AuditActionFilter::Prefix("agent.".into())));
        assert_eq!(filter.resource_type.as_deref(), Some("agent"));
        assert_eq!(filter.limit, 20);
        let exact = audit_filter(pb::ListAuditLogsRequest {
            action: "agent.create".into(),
            ..Default::default()
        })
        .expect("exact");
        assert_eq!(exact.action, Some(AuditActionFilter::Exact("agent.create".into())));

        let error = audit_filter(pb::ListAuditLogsRequest {
            page_size: Some(0),
            actor_id: "nobody".into(),
            start_time: Some(prost_types::Timestamp { seconds: 100, nanos: 0 }),
            end_time: Some(prost_types::Timestamp { seconds: 50, nanos: 0 }),
            ..Default::default()
        })
        .expect_err("bad filter");
        let fields: Vec<&str> =
            error.field_errors.iter().map(|field| field.field.as_str()).collect();
        assert_eq!(fields, vec!["pageSize", "actorId", "endTime"]);
    }
}
