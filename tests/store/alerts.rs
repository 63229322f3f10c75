//! Conformance: alert rules, incidents and deliveries (migration 0010). Both backends must keep
//! one open incident per rule (the once-per-incident guarantee across replicas), hand a due rule
//! to one claimer per tick, and scope rules to their owner.

use std::sync::Arc;

use chrono::{Duration, Utc};
use turbocat::store::{
    AlertConditionType, AlertEvent, AlertRuleDefinition, NewAlertDelivery, OwnerScope, PageRequest,
    Store, StoreError,
};

use crate::executions::fixture;

fn definition(condition_type: AlertConditionType) -> AlertRuleDefinition {
    AlertRuleDefinition {
        name: "watch".to_owned(),
        description: String::new(),
        disabled: false,
        condition_type,
        workflow_id: None,
        deployment_id: None,
        agent_id: None,
        failure_count: 0,
        window_seconds: 0,
        threshold_seconds: 30,
        webhook_url: "https://8.8.8.8/hook".to_owned(),
        webhook_secret: "secret".to_owned(),
        allow_private_network: false,
    }
}

async fn alert_rules_fire_once_per_incident(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let owner = OwnerScope::Owner(fixture.owner);
    let rule = store
        .create_alert_rule(fixture.owner, definition(AlertConditionType::QueuedStepTooOld))
        .await
        .expect("create");
    let on_events = store
        .create_alert_rule(fixture.owner, definition(AlertConditionType::ExecutionFailed))
        .await
        .expect("create");
    assert_eq!((rule.version, rule.firing, rule.last_fired_at), (1, false, None));

    // Scope: the owner's, everyone's for an admin, nobody else's.
    assert_eq!(store.get_alert_rule(owner, rule.id).await.expect("get").id, rule.id);
    assert_eq!(store.get_alert_rule(OwnerScope::All, rule.id).await.expect("get").id, rule.id);
    let hidden = store.get_alert_rule(OwnerScope::Owner(fixture.other_owner), rule.id).await;
    assert!(matches!(hidden, Err(StoreError::NotFound)), "{hidden:?}");
    let page = store.list_alert_rules(owner, PageRequest::default()).await.expect("list");
    assert_eq!(page.total, 2);
    let page = store
        .list_alert_rules(OwnerScope::Owner(fixture.other_owner), PageRequest::default())
        .await
        .expect("list");
    assert_eq!(page.total, 0);
    let execution_rules = store.execution_alert_rules(fixture.owner).await.expect("rules");
    assert_eq!(execution_rules.iter().map(|rule| rule.id).collect::<Vec<_>>(), vec![on_events.id]);

    // A due periodic rule goes to one claimer per tick; event rules are never claimed.
    let now = Utc::now() + Duration::seconds(1);
    let next = now + Duration::seconds(15);
    let claimed = store.claim_due_alert_rules(now, next, 10).await.expect("claim");
    assert_eq!(claimed, vec![rule.id]);
    assert!(store.claim_due_alert_rules(now, next, 10).await.expect("claim").is_empty());
    let later = next + Duration::seconds(1);
    assert_eq!(store.claim_due_alert_rules(later, later, 10).await.expect("claim"), vec![rule.id]);

    // One open incident at a time: the second opener and the second resolver get nothing.
    let incident = store.open_alert_incident(rule.id, "stuck").await.expect("open");
    let incident = incident.expect("the first opener opens it");
    assert!(store.open_alert_incident(rule.id, "stuck again").await.expect("open").is_none());
    let firing = store.get_alert_rule(owner, rule.id).await.expect("get");
    assert!(firing.firing);
    assert_eq!(firing.last_fired_at, Some(incident.opened_at));
    let resolved = store.resolve_alert_incident(rule.id).await.expect("resolve");
    let resolved = resolved.expect("the first resolver resolves it");
    assert_eq!(resolved.id, incident.id);
    assert!(resolved.resolved_at.is_some());
    assert!(store.resolve_alert_incident(rule.id).await.expect("resolve").is_none());
    let reopened = store.open_alert_incident(rule.id, "stuck once more").await.expect("open");
    assert!(reopened.is_some_and(|reopened| reopened.id != incident.id), "a new incident");
    let incidents =
        store.list_alert_incidents(rule.id, PageRequest::default()).await.expect("incidents");
    assert_eq!(incidents.total, 2);
    assert_eq!(incidents.items[1].id, incident.id, "newest first");

    for (attempt, succeeded) in [(1, false), (2, true)] {
        store
            .record_alert_delivery(NewAlertDelivery {
                rule_id: rule.id,
                incident_id: incident.id,
                event: AlertEvent::Firing,
                attempt,
                response_status: if succeeded { 200 } else { 500 },
                succeeded,
                error: String::new(),
                duration_ms: 1.5,
            })
            .await
            .expect("record");
    }
    let deliveries =
        store.list_alert_deliveries(rule.id, PageRequest::default()).await.expect("deliveries");
    assert_eq!(deliveries.total, 2);
    let attempts: Vec<(i32, i32)> = deliveries
        .items
        .iter()
        .map(|delivery| (delivery.attempt, delivery.response_status))
        .collect();
    assert!(attempts.contains(&(1, 500)) && attempts.contains(&(2, 200)), "{attempts:?}");

    // Versions: a stale one conflicts; deleting hides the rule.
    let mut changed = rule.definition();
    changed.name = "renamed".to_owned();
    let stale = store.update_alert_rule(owner, rule.id, 7, changed.clone()).await;
    assert!(matches!(stale, Err(StoreError::VersionConflict { current_version: 1 })), "{stale:?}");
    let updated = store.update_alert_rule(owner, rule.id, 1, changed).await.expect("update");
    assert_eq!((updated.name.as_str(), updated.version), ("renamed", 2));
    store.soft_delete_alert_rule(owner, rule.id, Some(2)).await.expect("delete");
    let gone = store.get_alert_rule(owner, rule.id).await;
    assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");
    let far = later + Duration::hours(1);
    assert!(store.claim_due_alert_rules(far, far, 10).await.expect("claim").is_empty());
}

crate::conformance!(alert_rules_fire_once_per_incident);
