//! API keys of the caller: create (the secret is shown once), list, revoke, always from a
//! signed-in session (never with a key). The keys are checked on each request by
//! `crate::auth::api_keys`. May call: the store, the audit trail
//! and `crate::auth::api_keys` for key generation.

use chrono::Utc;
use serde_json::json;

use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::validate::{MAX_NAME_CHARS, Validator, page_request, parse_id};
use crate::app::AppContext;
use crate::auth::api_keys::generate_api_key;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{ApiKeyFilter, ApiKeyScope, NewApiKey, OwnerScope, StoreError};

/// How often a key is regenerated when its random prefix is already taken.
const PREFIX_COLLISION_ATTEMPTS: usize = 3;

/// Creates a key for the caller; the response carries the whole key, once.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn create_api_key(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CreateApiKeyRequest,
) -> ServiceResult<pb::CreateApiKeyResponse> {
    caller.require_user_access(Access::Write)?;
    caller.require_interactive_session()?;
    if request.shared && !caller.is_admin() {
        return Err(ServiceError::forbidden("only an administrator may create a shared key"));
    }
    let mut validator = Validator::new();
    validator.required_text("name", &request.name, MAX_NAME_CHARS);
    let mut scopes: Vec<ApiKeyScope> = Vec::new();
    for (index, number) in request.scopes.iter().enumerate() {
        match convert::api_key_scope_from_proto(*number) {
            Some(scope) if !scopes.contains(&scope) => scopes.push(scope),
            Some(_) => {}
            None => {
                validator.error(&format!("scopes[{index}]"), "must be RUNNER, READ or WRITE");
            }
        }
    }
    if request.scopes.is_empty() {
        validator.error("scopes", "must name at least one of RUNNER, READ, WRITE");
    }
    let now = Utc::now();
    let expires_at = match &request.expires_at {
        None => None,
        Some(timestamp) => match wkt::time_from_timestamp(timestamp) {
            Some(time) if time > now => Some(time),
            Some(_) => {
                validator.error("expiresAt", "must lie in the future");
                None
            }
            None => {
                validator.error("expiresAt", "is not a valid time");
                None
            }
        },
    };
    validator.finish()?;
    let name = request.name.trim().to_owned();
    let mut attempt = 0;
    let (api_key, secret) = loop {
        attempt += 1;
        let generated = generate_api_key();
        let new_key = NewApiKey {
            user_id: caller.user_id,
            name: name.clone(),
            key_prefix: generated.prefix.clone(),
            key_hash: generated.hash.clone(),
            scopes: scopes.clone(),
            shared: request.shared,
            expires_at,
        };
        match context.store.create_api_key(new_key).await {
            Ok(api_key) => break (api_key, generated.key),
            Err(StoreError::AlreadyExists(_)) if attempt < PREFIX_COLLISION_ATTEMPTS => {
                tracing::debug!(attempt, "api key prefix taken, generating another");
            }
            Err(error) => return Err(ServiceError::from_store(error, "api key")),
        }
    };
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("api_key.create", "api_key", Some(api_key.id.to_string()))
            .with_metadata(json!({
                "name": api_key.name,
                "prefix": api_key.key_prefix,
                "scopes": api_key.scopes,
                "shared": api_key.shared,
                "expiresAt": api_key.expires_at,
            })),
    )
    .await;
    Ok(pb::CreateApiKeyResponse { api_key: Some(convert::api_key(&api_key)), key: secret })
}

/// The caller's unrevoked keys, newest first.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_api_keys(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListApiKeysRequest,
) -> ServiceResult<pb::ListApiKeysResponse> {
    caller.require_user_access(Access::Read)?;
    caller.require_interactive_session()?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let found = context
        .store
        .list_api_keys(
            OwnerScope::Owner(caller.user_id),
            ApiKeyFilter { page, include_revoked: false },
        )
        .await
        .map_err(|error| ServiceError::from_store(error, "api key"))?;
    Ok(pb::ListApiKeysResponse {
        api_keys: found.items.iter().map(convert::api_key).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// Revokes one of the caller's keys; someone else's key, or one revoked earlier, is NOT_FOUND.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn delete_api_key(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DeleteApiKeyRequest,
) -> ServiceResult<pb::DeleteApiKeyResponse> {
    caller.require_user_access(Access::Write)?;
    caller.require_interactive_session()?;
    let api_key_id = parse_id("apiKeyId", &request.api_key_id)?;
    let started_at = Utc::now();
    let api_key = context
        .store
        .revoke_api_key(OwnerScope::Owner(caller.user_id), api_key_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "api key"))?;
    // The store keeps the first revocation time: an older one means it was revoked before.
    let revoked_earlier = api_key
        .revoked_at
        .is_some_and(|revoked_at| revoked_at < started_at - chrono::Duration::seconds(1));
    if revoked_earlier {
        return Err(ServiceError::not_found("api key"));
    }
    // Runners attached with the key stop working now, on every replica.
    super::runner_access::announce_access_change(context).await;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("api_key.revoke", "api_key", Some(api_key.id.to_string()))
            .with_metadata(json!({ "name": api_key.name, "prefix": api_key.key_prefix })),
    )
    .await;
    Ok(pb::DeleteApiKeyResponse {})
}
