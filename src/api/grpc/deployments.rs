//! gRPC face of `DeploymentService`: each method reads the caller and calls the service layer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, deployment_service_server};
use crate::service;

#[derive(Clone)]
pub struct DeploymentGrpc {
    context: Arc<AppContext>,
}

impl DeploymentGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl deployment_service_server::DeploymentService for DeploymentGrpc {
    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::deployments::list_deployments(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::GetDeploymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::deployments::get_deployment(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn create_deployment(
        &self,
        request: Request<pb::CreateDeploymentRequest>,
    ) -> Result<Response<pb::CreateDeploymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::deployments::create_deployment(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn update_deployment(
        &self,
        request: Request<pb::UpdateDeploymentRequest>,
    ) -> Result<Response<pb::UpdateDeploymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::deployments::update_deployment(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn delete_deployment(
        &self,
        request: Request<pb::DeleteDeploymentRequest>,
    ) -> Result<Response<pb::DeleteDeploymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::deployments::delete_deployment(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn start_deployment(
        &self,
        request: Request<pb::StartDeploymentRequest>,
    ) -> Result<Response<pb::StartDeploymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::deployments::start_deployment(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn stop_deployment(
        &self,
        request: Request<pb::StopDeploymentRequest>,
    ) -> Result<Response<pb::StopDeploymentResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::deployments::stop_deployment(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn list_deployment_logs(
        &self,
        request: Request<pb::ListDeploymentLogsRequest>,
    ) -> Result<Response<pb::ListDeploymentLogsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response = service::deployments::list_deployment_logs(
            &self.context,
            &caller,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }
}
