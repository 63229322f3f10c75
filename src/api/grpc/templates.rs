//! gRPC face of `TemplateService`: each method reads the caller and calls the service layer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, template_service_server};
use crate::service;

#[derive(Clone)]
pub struct TemplateGrpc {
    context: Arc<AppContext>,
}

impl TemplateGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl template_service_server::TemplateService for TemplateGrpc {
    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::templates::list_templates(&self.context, &caller, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }

    async fn get_template(
        &self,
        request: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::GetTemplateResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::templates::get_template(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn create_template(
        &self,
        request: Request<pb::CreateTemplateRequest>,
    ) -> Result<Response<pb::CreateTemplateResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::templates::create_template(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn update_template(
        &self,
        request: Request<pb::UpdateTemplateRequest>,
    ) -> Result<Response<pb::UpdateTemplateResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::templates::update_template(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn delete_template(
        &self,
        request: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::templates::delete_template(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn instantiate_template(
        &self,
        request: Request<pb::InstantiateTemplateRequest>,
    ) -> Result<Response<pb::InstantiateTemplateResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::templates::instantiate_template(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }
}
