//! gRPC face of `AgentService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, agent_service_server};
use crate::service;

#[derive(Clone)]
pub struct AgentGrpc {
    context: Arc<AppContext>,
}

impl AgentGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl agent_service_server::AgentService for AgentGrpc {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::agents::list_agents(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::agents::get_agent(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::CreateAgentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response =
            service::agents::create_agent(&self.context, &caller, &client, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::UpdateAgentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response =
            service::agents::update_agent(&self.context, &caller, &client, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn delete_agent(
        &self,
        request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response =
            service::agents::delete_agent(&self.context, &caller, &client, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn duplicate_agent(
        &self,
        request: Request<pb::DuplicateAgentRequest>,
    ) -> Result<Response<pb::DuplicateAgentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response =
            service::agents::duplicate_agent(&self.context, &caller, &client, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn list_agent_versions(
        &self,
        request: Request<pb::ListAgentVersionsRequest>,
    ) -> Result<Response<pb::ListAgentVersionsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::agents::list_agent_versions(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }
}
