//! Registration, log-in and the session lifecycle: refresh with rotation and reuse detection,
//! logout, and password reset by a mailed single-use link. Every public operation here is rate
//! limited per client address and, when it names one, per account.

use std::sync::Arc;

use chrono::Utc;

use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::validate::{MAX_NAME_CHARS, Validator};
use crate::app::AppContext;
use crate::auth::caller::ClientInfo;
use crate::auth::mailer::PasswordResetMail;
use crate::auth::password;
use crate::auth::rate_limit::AuthAction;
use crate::auth::tokens::{hash_opaque_token, new_opaque_token};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::store::{
    NewPasswordResetToken, NewSession, NewUser, PasswordReset, PasswordResetOutcome,
    RefreshTokenRotation, RoleAssignment, RotateOutcome, SessionRevokeReason, StoreError, User,
    UserRole,
};

/// How long a password reset link works.
pub const PASSWORD_RESET_LIFETIME_MINUTES: i64 = 30;
/// The longest opaque token accepted (ours are 43 characters); a bound on hashing work.
const MAX_OPAQUE_TOKEN_CHARS: usize = 512;

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
    context.rate_limiter.check(AuthAction::Register, client, Some(&request.email)).await?;
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
    let mut user = match context.store.create_user(new_user).await {
        Ok(user) => user,
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ServiceError::conflict("an account with this email already exists"));
        }
        Err(error) => return Err(ServiceError::from_store(error, "user")),
    };
    // Registering signs the new user in.
    let signed_in_at = Utc::now();
    context
        .store
        .record_login(user.id, signed_in_at)
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    user.last_login_at = Some(signed_in_at);
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
    context.rate_limiter.check(AuthAction::Login, client, Some(&request.email)).await?;
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

/// The moment a revoked session's access tokens are dead anyway: replicas may forget it then.
fn revocation_horizon(context: &AppContext) -> chrono::DateTime<Utc> {
    let lifetime = chrono::Duration::from_std(context.tokens.settings().access_token_lifetime)
        .unwrap_or(chrono::Duration::minutes(15));
    Utc::now() + lifetime
}

/// A required opaque token field: present and of a plausible length.
fn validate_opaque_token(validator: &mut Validator, field: &str, token: &str) {
    if token.trim().is_empty() {
        validator.error(field, "is required");
        return;
    }
    validator.max_chars(field, token, MAX_OPAQUE_TOKEN_CHARS);
}

/// Exchanges a refresh token for a new pair in the same session. A token that was already
/// rotated revokes the whole session (the family is presumed stolen).
#[tracing::instrument(skip_all)]
pub async fn refresh_token(
    context: &AppContext,
    client: &ClientInfo,
    request: pb::RefreshTokenRequest,
) -> ServiceResult<pb::RefreshTokenResponse> {
    context.rate_limiter.check(AuthAction::Refresh, client, None).await?;
    let mut validator = Validator::new();
    validate_opaque_token(&mut validator, "refreshToken", &request.refresh_token);
    validator.finish()?;
    let refused = || ServiceError::unauthorized("invalid or expired refresh token");
    let settings = context.tokens.settings();
    let now = Utc::now();
    let refresh_lifetime = chrono::Duration::from_std(settings.refresh_token_lifetime)
        .unwrap_or(chrono::Duration::days(7));
    let new_refresh_token = new_opaque_token();
    let outcome = context
        .store
        .rotate_refresh_token(RefreshTokenRotation {
            presented_token_hash: hash_opaque_token(request.refresh_token.trim()),
            new_token_hash: hash_opaque_token(&new_refresh_token),
            new_token_expires_at: now + refresh_lifetime,
            now,
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "session"))?;
    match outcome {
        RotateOutcome::Rotated { session, user } => {
            let access = context
                .tokens
                .issue_access_token(user.id, user.role, session.id)
                .map_err(|error| ServiceError::internal(&error))?;
            Ok(pb::RefreshTokenResponse {
                user: Some(convert::user(&user)),
                access_token: access.token,
                refresh_token: new_refresh_token,
                expires_in: i32::try_from(access.expires_in.as_secs()).unwrap_or(i32::MAX),
            })
        }
        RotateOutcome::Reused { session_id, user_id } => {
            context
                .revoked_sessions
                .announce(context.bus.as_ref(), &[session_id], revocation_horizon(context))
                .await;
            tracing::warn!(%session_id, %user_id, "refresh token reused; session revoked");
            audit::record(
                context,
                Actor::User(user_id),
                client,
                AuditEvent::failure("auth.refresh_reuse", "session", Some(session_id.to_string()))
                    .with_metadata(serde_json::json!({ "revokedSessionId": session_id })),
            )
            .await;
            Err(refused())
        }
        RotateOutcome::Invalid { reason } => {
            tracing::debug!(?reason, "refresh token refused");
            Err(refused())
        }
        RotateOutcome::NotFound => Err(refused()),
    }
}

/// Ends the session a refresh token belongs to, and with it every access token it issued.
/// Like OAuth token revocation (RFC 7009) it answers the same for an unknown token, so the
/// call is idempotent and reveals nothing.
#[tracing::instrument(skip_all)]
pub async fn logout(
    context: &AppContext,
    client: &ClientInfo,
    request: pb::LogoutRequest,
) -> ServiceResult<pb::LogoutResponse> {
    let mut validator = Validator::new();
    validate_opaque_token(&mut validator, "refreshToken", &request.refresh_token);
    validator.finish()?;
    let token_hash = hash_opaque_token(request.refresh_token.trim());
    let session = match context.store.get_session_by_refresh_token(&token_hash).await {
        Ok(session) => session,
        Err(StoreError::NotFound) => {
            tracing::debug!("logout with an unknown refresh token");
            return Ok(pb::LogoutResponse {});
        }
        Err(error) => return Err(ServiceError::from_store(error, "session")),
    };
    let revoked = context
        .store
        .revoke_session(session.id, SessionRevokeReason::Logout, Utc::now())
        .await
        .map_err(|error| ServiceError::from_store(error, "session"))?;
    if !revoked {
        return Ok(pb::LogoutResponse {});
    }
    context
        .revoked_sessions
        .announce(context.bus.as_ref(), &[session.id], revocation_horizon(context))
        .await;
    audit::record(
        context,
        Actor::User(session.user_id),
        client,
        AuditEvent::success("auth.logout", "session", Some(session.id.to_string())),
    )
    .await;
    Ok(pb::LogoutResponse {})
}

/// Mails a reset link when the email belongs to an account. The answer, and its timing, are
/// the same either way: the lookup and the mail happen in a background task.
#[tracing::instrument(skip_all)]
pub async fn forgot_password(
    context: &Arc<AppContext>,
    client: &ClientInfo,
    request: pb::ForgotPasswordRequest,
) -> ServiceResult<pb::ForgotPasswordResponse> {
    context.rate_limiter.check(AuthAction::ForgotPassword, client, Some(&request.email)).await?;
    Validator::new().email("email", &request.email).finish()?;
    let email = request.email.trim().to_lowercase();
    let background_context = context.clone();
    let background_client = client.clone();
    tokio::spawn(async move {
        if let Err(error) =
            send_password_reset(&background_context, &background_client, &email).await
        {
            tracing::error!(%error, "could not send a password reset link");
        }
    });
    Ok(pb::ForgotPasswordResponse {})
}

/// The work behind `forgot_password`: token, mail, audit.
async fn send_password_reset(
    context: &AppContext,
    client: &ClientInfo,
    email: &str,
) -> ServiceResult<()> {
    let user = match context.store.get_user_by_email(email).await {
        Ok(user) => user,
        Err(StoreError::NotFound) => {
            audit::record(
                context,
                Actor::Anonymous,
                client,
                AuditEvent::failure("auth.password_reset_request", "user", None)
                    .with_metadata(serde_json::json!({ "reason": "unknown email" })),
            )
            .await;
            return Ok(());
        }
        Err(error) => return Err(ServiceError::from_store(error, "user")),
    };
    let token = new_opaque_token();
    context
        .store
        .create_password_reset_token(NewPasswordResetToken {
            user_id: user.id,
            token_hash: hash_opaque_token(&token),
            expires_at: Utc::now() + chrono::Duration::minutes(PASSWORD_RESET_LIFETIME_MINUTES),
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    let reset_link = format!("{}/reset-password?token={token}", context.public_url);
    context
        .mailer
        .send_password_reset(PasswordResetMail {
            user_id: user.id,
            email: &user.email,
            reset_link: &reset_link,
            expires_in_minutes: PASSWORD_RESET_LIFETIME_MINUTES,
        })
        .await
        .map_err(|error| ServiceError::internal(&error))?;
    audit::record(
        context,
        Actor::User(user.id),
        client,
        AuditEvent::success("auth.password_reset_request", "user", Some(user.id.to_string())),
    )
    .await;
    Ok(())
}

/// Sets a new password with a reset token: single use, 30 minutes. Every session of the user
/// is revoked in the same transaction. A used, expired or unknown token is UNAUTHORIZED, with
/// one message for all three.
#[tracing::instrument(skip_all)]
pub async fn reset_password(
    context: &AppContext,
    client: &ClientInfo,
    request: pb::ResetPasswordRequest,
) -> ServiceResult<pb::ResetPasswordResponse> {
    context.rate_limiter.check(AuthAction::ResetPassword, client, None).await?;
    let mut validator = Validator::new();
    validate_opaque_token(&mut validator, "token", &request.token);
    validator.password("newPassword", &request.new_password);
    validator.finish()?;
    let token_hash = hash_opaque_token(request.token.trim());
    let new_password_hash = password::hash_password(request.new_password)
        .await
        .map_err(|error| ServiceError::internal(&error))?;
    let outcome = context
        .store
        .consume_password_reset_token(PasswordReset {
            token_hash,
            new_password_hash,
            now: Utc::now(),
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    let reason = match outcome {
        PasswordResetOutcome::Reset { user_id, revoked_session_ids } => {
            context
                .revoked_sessions
                .announce(context.bus.as_ref(), &revoked_session_ids, revocation_horizon(context))
                .await;
            audit::record(
                context,
                Actor::User(user_id),
                client,
                AuditEvent::success("auth.password_reset", "user", Some(user_id.to_string()))
                    .with_metadata(serde_json::json!({
                        "revokedSessions": revoked_session_ids.len(),
                    })),
            )
            .await;
            return Ok(pb::ResetPasswordResponse {});
        }
        PasswordResetOutcome::AlreadyUsed => "already used",
        PasswordResetOutcome::Expired => "expired",
        PasswordResetOutcome::NotFound => "unknown",
    };
    audit::record(
        context,
        Actor::Anonymous,
        client,
        AuditEvent::failure("auth.password_reset", "user", None)
            .with_metadata(serde_json::json!({ "reason": reason })),
    )
    .await;
    Err(ServiceError::unauthorized("invalid or expired reset token"))
}
