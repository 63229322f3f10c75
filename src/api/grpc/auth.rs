//! gRPC face of `AuthService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::AppContext;
use crate::auth::caller::client_of;
use crate::proto::v1::{self as pb, auth_service_server};
use crate::service;

#[derive(Clone)]
pub struct AuthGrpc {
    context: Arc<AppContext>,
}

impl AuthGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl auth_service_server::AuthService for AuthGrpc {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let client = client_of(&request);
        let response =
            service::auth::register(&self.context, &client, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let client = client_of(&request);
        let response = service::auth::login(&self.context, &client, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}
