//! gRPC face of `AuditLogService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::caller_of;
use crate::proto::v1::{self as pb, audit_log_service_server};
use crate::service;

#[derive(Clone)]
pub struct AuditLogGrpc {
    context: Arc<AppContext>,
}

impl AuditLogGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl audit_log_service_server::AuditLogService for AuditLogGrpc {
    async fn list_audit_logs(
        &self,
        request: Request<pb::ListAuditLogsRequest>,
    ) -> Result<Response<pb::ListAuditLogsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::audit_logs::list_audit_logs(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }
}
