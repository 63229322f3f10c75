//! Registration, log-in and the session lifecycle.

use chrono::Utc;

use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::validate::{MAX_NAME_CHARS, Validator};
use crate::api::AppContext;
use crate::auth::caller::ClientInfo;
use crate::auth::password;
use crate::auth::tokens::{hash_opaque_token, new_opaque_token};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::store::{NewSession, NewUser, RoleAssignment, StoreError, User, UserRole};

/// A new session's tokens.
pub struct SessionTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i32,
}

/// Opens a session for `user` and issues its first token pair.
pub async fn open_session(
    context: &AppContext,
    client: &ClientInfo,
    user: &User,
) -> ServiceResult<SessionTokens> {
    let settings = context.tokens.settings();
    let now = Utc::now();
    let refresh_lifetime = chrono::Duration::from_std(settings.refresh_token_lifetime)
        .unwrap_or(chrono::Duration::days(7));
    let refresh_token = new_opaque_token();
    let session = context
        .store
        .create_session(NewSession {
            user_id: user.id,
            expires_at: now + refresh_lifetime,
            user_agent: client.user_agent.clone(),
            ip_address: client.ip_address.map(|address| address.to_string()),
            refresh_token_hash: hash_opaque_token(&refresh_token),
            refresh_token_expires_at: now + refresh_lifetime,
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "session"))?;
    let access = context
        .tokens
        .issue_access_token(user.id, user.role, session.id)
        .map_err(|error| ServiceError::internal(&error))?;
    Ok(SessionTokens {
        access_token: access.token,
        refresh_token,
        expires_in: i32::try_from(access.expires_in.as_secs()).unwrap_or(i32::MAX),
    })
}

/// Creates an account (the first one of an installation is an admin) and its first session.
pub async fn register(
    context: &AppContext,
    client: &ClientInfo,
    request: pb::RegisterRequest,
) -> ServiceResult<pb::RegisterResponse> {
    Validator::new()
        .email("email", &request.email)
        .password("password", &request.password)
        .required_text("fullName", &request.full_name, MAX_NAME_CHARS)
        .finish()?;
    let email = request.email.trim().to_lowercase();
    let password_hash = password::hash_password(request.password)
        .await
        .map_err(|error| ServiceError::internal(&error))?;
    let mut new_user = NewUser::new(email, request.full_name.trim());
    new_user.password_hash = Some(password_hash);
    new_user.role = RoleAssignment::FirstUserIsAdmin { otherwise: UserRole::User };
    let user = match context.store.create_user(new_user).await {
        Ok(user) => user,
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ServiceError::conflict("an account with this email already exists"));
        }
        Err(error) => return Err(ServiceError::from_store(error, "user")),
    };
    let tokens = open_session(context, client, &user).await?;
    audit::record(
        context,
        Actor::User(user.id),
        client,
        AuditEvent::success("auth.register", "user", Some(user.id.to_string()))
            .with_metadata(serde_json::json!({ "role": user.role.as_str() })),
    )
    .await;
    Ok(pb::RegisterResponse {
        user: Some(convert::user(&user)),
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        expires_in: tokens.expires_in,
    })
}

/// A password that matches no account; verifying against it keeps an unknown email as slow
/// as a wrong password.
const DUMMY_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2bW/eRuqSXAyQ2U8FJl8ac1X3Qw7QmG3+C4ZAB4Pl4c";

/// Exchanges an email and password for a new session. Unknown email and wrong password get
/// the same answer in similar time.
pub async fn login(
    context: &AppContext,
    client: &ClientInfo,
    request: pb::LoginRequest,
) -> ServiceResult<pb::LoginResponse> {
    let mut validator = Validator::new();
    if request.email.trim().is_empty() {
        validator.error("email", "is required");
    }
    if request.password.is_empty() {
        validator.error("password", "is required");
    }
    validator.max_chars("email", &request.email, super::validate::MAX_EMAIL_CHARS);
    validator.max_chars("password", &request.password, password::MAX_PASSWORD_CHARS);
    validator.finish()?;
    let email = request.email.trim().to_lowercase();
    let found = match context.store.get_user_by_email(&email).await {
        Ok(user) => Some(user),
        Err(StoreError::NotFound) => None,
        Err(error) => return Err(ServiceError::from_store(error, "user")),
    };
    let stored_hash = found
        .as_ref()
        .and_then(|user| user.password_hash.clone())
        .unwrap_or_else(|| DUMMY_PASSWORD_HASH.to_owned());
    let matches = password::verify_password(request.password, stored_hash)
        .await
        .map_err(|error| ServiceError::internal(&error))?;
    let user = match found {
        Some(user) if matches && user.password_hash.is_some() => user,
        other => {
            let actor = other.as_ref().map_or(Actor::Anonymous, |user| Actor::User(user.id));
            audit::record(
                context,
                actor,
                client,
                AuditEvent::failure("auth.login", "user", other.map(|user| user.id.to_string())),
            )
            .await;
            return Err(ServiceError::unauthorized("invalid email or password"));
        }
    };
    context
        .store
        .record_login(user.id, Utc::now())
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    let tokens = open_session(context, client, &user).await?;
    audit::record(
        context,
        Actor::User(user.id),
        client,
        AuditEvent::success("auth.login", "user", Some(user.id.to_string())),
    )
    .await;
    Ok(pb::LoginResponse {
        user: Some(convert::user(&user)),
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        expires_in: tokens.expires_in,
    })
}
