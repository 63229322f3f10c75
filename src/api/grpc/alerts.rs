//! gRPC face of `AlertService`: each method reads the caller and calls the service layer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, alert_service_server};
use crate::service;

#[derive(Clone)]
pub struct AlertGrpc {
    context: Arc<AppContext>,
}

impl AlertGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl alert_service_server::AlertService for AlertGrpc {
    async fn list_alert_rules(
        &self,
        request: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::alerts::list_alert_rules(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_alert_rule(
        &self,
        request: Request<pb::GetAlertRuleRequest>,
    ) -> Result<Response<pb::GetAlertRuleResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::alerts::get_alert_rule(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn create_alert_rule(
        &self,
        request: Request<pb::CreateAlertRuleRequest>,
    ) -> Result<Response<pb::CreateAlertRuleResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::alerts::create_alert_rule(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn update_alert_rule(
        &self,
        request: Request<pb::UpdateAlertRuleRequest>,
    ) -> Result<Response<pb::UpdateAlertRuleResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::alerts::update_alert_rule(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn delete_alert_rule(
        &self,
        request: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::alerts::delete_alert_rule(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn list_alert_deliveries(
        &self,
        request: Request<pb::ListAlertDeliveriesRequest>,
    ) -> Result<Response<pb::ListAlertDeliveriesResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::alerts::list_alert_deliveries(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn list_alert_incidents(
        &self,
        request: Request<pb::ListAlertIncidentsRequest>,
    ) -> Result<Response<pb::ListAlertIncidentsResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::alerts::list_alert_incidents(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }
}
