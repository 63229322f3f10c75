//! gRPC face of `AuthService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
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

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        let client = client_of(&request);
        let response =
            service::auth::refresh_token(&self.context, &client, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let client = client_of(&request);
        let response = service::auth::logout(&self.context, &client, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn forgot_password(
        &self,
        request: Request<pb::ForgotPasswordRequest>,
    ) -> Result<Response<pb::ForgotPasswordResponse>, Status> {
        let client = client_of(&request);
        let response =
            service::auth::forgot_password(&self.context, &client, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn reset_password(
        &self,
        request: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let client = client_of(&request);
        let response =
            service::auth::reset_password(&self.context, &client, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}
