//! The webhook edge: `POST /api/v1/webhooks/{deploymentId}`, the one REST route that is not
//! transcoded from the contract, because its signature (`X-Turbocat-Signature`) is the HMAC of
//! the exact bytes of the body (with `X-Turbocat-Timestamp` and `X-Turbocat-Delivery`), which
//! the transcoder would parse and re-encode. No credential is asked: the signature is the
//! caller's proof. The answer is the usual envelope: 202 with `{executionId}` only (the
//! execution's input holds the deployment's environment values), or the error (see
//! `service::deployments::trigger_webhook`).
//! May call: the deployments service and the signing scheme it shares (`service::signing`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use http_body_util::BodyExt;

use super::rest::{envelope, payload_too_large};
use crate::app::AppContext;
use crate::error::{ErrorCode, ServiceError};
use crate::service::{deployments, signing};

/// What the route needs: the context and the body limit of every REST request.
struct WebhookEdge {
    context: Arc<AppContext>,
    max_body_bytes: usize,
}

/// The webhook route, with bodies limited to `max_body_bytes` (413 beyond).
pub fn router(context: Arc<AppContext>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/api/v1/webhooks/{deployment_id}", axum::routing::post(receive))
        .with_state(Arc::new(WebhookEdge { context, max_body_bytes }))
}

async fn receive(
    State(edge): State<Arc<WebhookEdge>>,
    deployment_id: Result<Path<String>, PathRejection>,
    headers: http::HeaderMap,
    body: Body,
) -> Response {
    let request_id = envelope::request_id_of(&headers);
    let Ok(Path(deployment_id)) = deployment_id else {
        let error = ServiceError::new(ErrorCode::NotFound, "no webhook is listening at this path");
        return envelope::error(&error, &request_id);
    };
    let body = match http_body_util::Limited::new(body, edge.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return envelope::error(&payload_too_large(edge.max_body_bytes), &request_id);
        }
        Err(error) => {
            let error = ServiceError::invalid_field("body", format!("could not be read: {error}"));
            return envelope::error(&error, &request_id);
        }
    };
    // A header that is not text cannot match: it is kept (as empty) to be refused as wrong.
    let header = |name: &str| headers.get(name).map(|value| value.to_str().unwrap_or_default());
    let call = deployments::WebhookCall {
        signature: header(signing::SIGNATURE_HEADER),
        timestamp: header(signing::TIMESTAMP_HEADER),
        delivery: header(signing::DELIVERY_HEADER),
        body: &body,
    };
    match deployments::trigger_webhook(&edge.context, &deployment_id, call).await {
        Ok(execution_id) => envelope::success(
            http::StatusCode::ACCEPTED,
            serde_json::json!({ "executionId": execution_id }),
            None,
            &request_id,
        ),
        Err(error) => envelope::error(&error, &request_id),
    }
}
