//! gRPC face of `WorkflowService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, workflow_service_server};
use crate::service;

#[derive(Clone)]
pub struct WorkflowGrpc {
    context: Arc<AppContext>,
}

impl WorkflowGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl workflow_service_server::WorkflowService for WorkflowGrpc {
    async fn list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::workflows::list_workflows(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_workflow(
        &self,
        request: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::GetWorkflowResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::workflows::get_workflow(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn create_workflow(
        &self,
        request: Request<pb::CreateWorkflowRequest>,
    ) -> Result<Response<pb::CreateWorkflowResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::workflows::create_workflow(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn update_workflow(
        &self,
        request: Request<pb::UpdateWorkflowRequest>,
    ) -> Result<Response<pb::UpdateWorkflowResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::workflows::update_workflow(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn delete_workflow(
        &self,
        request: Request<pb::DeleteWorkflowRequest>,
    ) -> Result<Response<pb::DeleteWorkflowResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::workflows::delete_workflow(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn execute_workflow(
        &self,
        request: Request<pb::ExecuteWorkflowRequest>,
    ) -> Result<Response<pb::ExecuteWorkflowResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::workflows::execute_workflow(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn list_workflow_executions(
        &self,
        request: Request<pb::ListWorkflowExecutionsRequest>,
    ) -> Result<Response<pb::ListWorkflowExecutionsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response = service::workflows::list_workflow_executions(
            &self.context,
            &caller,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }
}
