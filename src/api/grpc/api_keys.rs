//! gRPC face of `ApiKeyService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, api_key_service_server};
use crate::service;

#[derive(Clone)]
pub struct ApiKeyGrpc {
    context: Arc<AppContext>,
}

impl ApiKeyGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl api_key_service_server::ApiKeyService for ApiKeyGrpc {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::api_keys::create_api_key(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::api_keys::list_api_keys(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn delete_api_key(
        &self,
        request: Request<pb::DeleteApiKeyRequest>,
    ) -> Result<Response<pb::DeleteApiKeyResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::api_keys::delete_api_key(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }
}
