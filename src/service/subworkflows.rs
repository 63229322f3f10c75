//! Child executions of WORKFLOW steps, built for the engine. The engine runs sub-workflow
//! steps itself but may not call the service layer, where execution snapshots are built; it
//! asks through `engine::subworkflow::ChildWorkflows`, which this module implements and the
//! server installs at start-up. Only the rows are built here: the engine stores them together
//! with the parent step's transition, so an attempt never gets two children.
//! May call: the store and `executions` (the snapshot). Never the edges.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;

use super::executions::{self, ExecutionStart};
use crate::engine::subworkflow::{ChildPlan, ChildPlanError, ChildRequest, ChildWorkflows};
use crate::error::ErrorCode;
use crate::store::{ExecutionTrigger, OwnerScope, Store, StoreError};

/// Builds child executions from the store: the child workflow as it is now.
pub struct ChildWorkflowBuilder {
    store: Arc<dyn Store>,
}

impl ChildWorkflowBuilder {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self { store })
    }
}

#[async_trait]
impl ChildWorkflows for ChildWorkflowBuilder {
    /// The workflow must be a live workflow of the parent's owner with a valid DAG. The child
    /// starts with the step's input (the workflow's default input when that is `null`), the
    /// parent's priority, the workflow's timeout, and a deadline no later than
    /// `request.deadline_at`.
    async fn plan_child(&self, request: ChildRequest) -> Result<ChildPlan, ChildPlanError> {
        let workflow_id = request.workflow_id;
        let to_run = match self
            .store
            .get_workflow_to_run(OwnerScope::Owner(request.owner_id), workflow_id)
            .await
        {
            Ok(to_run) => to_run,
            Err(StoreError::NotFound) => {
                return Err(ChildPlanError::Refused(format!(
                    "workflow {workflow_id} does not exist or was deleted"
                )));
            }
            Err(error) => return Err(ChildPlanError::Unavailable(error.to_string())),
        };
        let (definition, step_runs) = executions::snapshot_workflow(self.store.as_ref(), &to_run)
            .await
            .map_err(|error| match error.code {
                ErrorCode::InternalError
                | ErrorCode::ServiceUnavailable
                | ErrorCode::RateLimited => ChildPlanError::Unavailable(error.message),
                _ => ChildPlanError::Refused(format!(
                    "workflow {workflow_id} cannot run: {}",
                    error.message
                )),
            })?;
        let workflow = &to_run.workflow;
        let input = match request.input {
            Value::Null => workflow.workflow.default_input.clone(),
            given => given,
        };
        let start = ExecutionStart {
            trigger: ExecutionTrigger::SubWorkflow,
            input,
            priority: request.priority,
            timeout_seconds: workflow.workflow.timeout_seconds,
            deployment_id: None,
            parent: Some(request.parent),
            cron_claim: None,
        };
        let mut execution = executions::new_execution(
            request.owner_id,
            Some(workflow_id),
            definition,
            start,
            Utc::now(),
        );
        execution.deadline_at = match (execution.deadline_at, request.deadline_at) {
            (Some(own), Some(cap)) => Some(own.min(cap)),
            (own, cap) => own.or(cap),
        };
        Ok(ChildPlan { execution, step_runs })
    }
}
