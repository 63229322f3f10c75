//! The gRPC services, one type per proto service. Each method is a few lines: read the caller,
//! call the service layer, convert.
//! May call: the service layer (through `AppContext`).

use std::sync::Arc;

mod api_keys;
mod auth;
mod users;

pub use self::api_keys::ApiKeyGrpc;
pub use self::auth::AuthGrpc;
pub use self::users::UserGrpc;
use crate::app::AppContext;
use crate::proto::v1::{
    agent_service_server, alert_service_server, analytics_service_server, api_key_service_server,
    audit_log_service_server, auth_service_server, deployment_service_server,
    execution_service_server, runner_service_server, template_service_server, user_service_server,
    workflow_service_server,
};

mod agents;
pub use self::agents::AgentGrpc;
mod workflows;
pub use self::workflows::WorkflowGrpc;
mod executions;
pub use self::executions::ExecutionGrpc;
mod templates;
pub use self::templates::TemplateGrpc;
mod deployments;
pub use self::deployments::DeploymentGrpc;
mod audit_logs;
pub use self::audit_logs::AuditLogGrpc;
mod analytics;
pub use self::analytics::AnalyticsGrpc;
mod runner_service;
pub use self::runner_service::RunnerGrpc;
mod alerts;
pub use self::alerts::AlertGrpc;

/// Every Turbocat service, with the message size limits applied.
pub fn routes(context: &Arc<AppContext>, max_message_bytes: usize) -> tonic::service::Routes {
    macro_rules! server {
        ($module:ident, $server:ident, $grpc:ident) => {
            $module::$server::new($grpc::new(context.clone()))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes)
        };
    }
    tonic::service::Routes::new(server!(auth_service_server, AuthServiceServer, AuthGrpc))
        .add_service(server!(user_service_server, UserServiceServer, UserGrpc))
        .add_service(server!(api_key_service_server, ApiKeyServiceServer, ApiKeyGrpc))
        .add_service(server!(agent_service_server, AgentServiceServer, AgentGrpc))
        .add_service(server!(workflow_service_server, WorkflowServiceServer, WorkflowGrpc))
        .add_service(server!(execution_service_server, ExecutionServiceServer, ExecutionGrpc))
        .add_service(server!(template_service_server, TemplateServiceServer, TemplateGrpc))
        .add_service(server!(deployment_service_server, DeploymentServiceServer, DeploymentGrpc))
        .add_service(server!(audit_log_service_server, AuditLogServiceServer, AuditLogGrpc))
        .add_service(server!(analytics_service_server, AnalyticsServiceServer, AnalyticsGrpc))
        .add_service(server!(alert_service_server, AlertServiceServer, AlertGrpc))
        .add_service(server!(runner_service_server, RunnerServiceServer, RunnerGrpc))
}

/// Names of every service, for the gRPC health reporter.
pub const SERVICE_NAMES: [&str; 12] = [
    auth_service_server::SERVICE_NAME,
    user_service_server::SERVICE_NAME,
    api_key_service_server::SERVICE_NAME,
    agent_service_server::SERVICE_NAME,
    workflow_service_server::SERVICE_NAME,
    execution_service_server::SERVICE_NAME,
    template_service_server::SERVICE_NAME,
    deployment_service_server::SERVICE_NAME,
    audit_log_service_server::SERVICE_NAME,
    analytics_service_server::SERVICE_NAME,
    alert_service_server::SERVICE_NAME,
    runner_service_server::SERVICE_NAME,
];
