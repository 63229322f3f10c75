//! gRPC face of `UserService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::AppContext;
use crate::auth::caller::{caller_of, client_of};
use crate::proto::v1::{self as pb, user_service_server};
use crate::service;

#[derive(Clone)]
pub struct UserGrpc {
    context: Arc<AppContext>,
}

impl UserGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl user_service_server::UserService for UserGrpc {
    async fn get_current_user(
        &self,
        request: Request<pb::GetCurrentUserRequest>,
    ) -> Result<Response<pb::GetCurrentUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::users::get_current_user(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn update_current_user(
        &self,
        request: Request<pb::UpdateCurrentUserRequest>,
    ) -> Result<Response<pb::UpdateCurrentUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response = service::users::update_current_user(
            &self.context,
            &caller,
            &client,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::users::get_user(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = caller_of(&request)?;
        let response =
            service::users::list_users(&self.context, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn update_user_role(
        &self,
        request: Request<pb::UpdateUserRoleRequest>,
    ) -> Result<Response<pb::UpdateUserRoleResponse>, Status> {
        let caller = caller_of(&request)?;
        let client = client_of(&request);
        let response =
            service::users::update_user_role(&self.context, &caller, &client, request.into_inner())
                .await?;
        Ok(Response::new(response))
    }
}
