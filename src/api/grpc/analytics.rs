//! gRPC face of `AnalyticsService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::caller_of;
use crate::proto::v1::{self as pb, analytics_service_server};
use crate::service;

#[derive(Clone)]
pub struct AnalyticsGrpc {
    context: Arc<AppContext>,
}

impl AnalyticsGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl analytics_service_server::AnalyticsService for AnalyticsGrpc {
    async fn get_overview(
        &self,
        request: Request<pb::GetOverviewRequest>,
    ) -> Result<Response<pb::GetOverviewResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::analytics::get_overview(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_agent_metrics(
        &self,
        request: Request<pb::GetAgentMetricsRequest>,
    ) -> Result<Response<pb::GetAgentMetricsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::analytics::get_agent_metrics(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_workflow_metrics(
        &self,
        request: Request<pb::GetWorkflowMetricsRequest>,
    ) -> Result<Response<pb::GetWorkflowMetricsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::analytics::get_workflow_metrics(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_system_health(
        &self,
        request: Request<pb::GetSystemHealthRequest>,
    ) -> Result<Response<pb::GetSystemHealthResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::analytics::get_system_health(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_usage_stats(
        &self,
        request: Request<pb::GetUsageStatsRequest>,
    ) -> Result<Response<pb::GetUsageStatsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::analytics::get_usage_stats(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }
}
