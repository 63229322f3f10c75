//! gRPC face of `ExecutionService`. `WatchExecution` is a server stream (also over grpc-web,
//! and as Server-Sent Events through the REST edge).

use std::sync::Arc;

use futures::StreamExt;
use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, execution_service_server};
use crate::service;

#[derive(Clone)]
pub struct ExecutionGrpc {
    context: Arc<AppContext>,
}

impl ExecutionGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl execution_service_server::ExecutionService for ExecutionGrpc {
    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::executions::list_executions(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_execution(
        &self,
        request: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::executions::get_execution(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn list_execution_logs(
        &self,
        request: Request<pb::ListExecutionLogsRequest>,
    ) -> Result<Response<pb::ListExecutionLogsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::executions::list_execution_logs(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn cancel_execution(
        &self,
        request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::executions::cancel_execution(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn watch_execution(
        &self,
        request: Request<pb::WatchExecutionRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::WatchExecutionResponse>>, Status> {
        let caller = caller_of(&request)?;
        let events =
            service::watch::watch_execution(self.context.clone(), &caller, request.into_inner())
                .await?;
        Ok(Response::new(Box::pin(events.map(|event| event.map_err(Status::from)))))
    }
}
