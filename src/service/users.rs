//! Profiles and the administration of users and roles; also the `turbocat admin create`
//! command's account creation. May call: the store, the audit trail, password hashing and
//! session revocation.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::validate::update_mask_fields;
use super::validate::{MAX_NAME_CHARS, Validator, page_request, parse_id, sort_order};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::auth::password;
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    AuditActorKind, NewAuditLog, NewUser, RoleAssignment, SessionRevokeReason, SortOrder, Store,
    StoreError, User, UserFilter, UserProfileChanges, UserRole, UserSortField,
};

/// The longest avatar URL.
pub const MAX_AVATAR_URL_CHARS: usize = 2_048;
/// The largest preferences object, as compact JSON.
pub const MAX_PREFERENCES_BYTES: usize = 64 * 1024;
/// The longest search text of a list.
const MAX_SEARCH_CHARS: usize = 200;
/// A profile field named by an update mask, in the order fields are checked and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProfileField {
    FullName,
    AvatarUrl,
    Preferences,
}

/// The profile fields `UpdateCurrentUser` may change, by their JSON names.
const UPDATABLE_PROFILE_FIELDS: &[(&str, ProfileField)] = &[
    ("fullName", ProfileField::FullName),
    ("avatarUrl", ProfileField::AvatarUrl),
    ("preferences", ProfileField::Preferences),
];

/// The sort keys of the users list, by their JSON names.
const USER_SORT_FIELDS: &[(&str, UserSortField)] = &[
    ("createdAt", UserSortField::CreatedAt),
    ("updatedAt", UserSortField::UpdatedAt),
    ("email", UserSortField::Email),
    ("fullName", UserSortField::FullName),
];

fn user_sort(validator: &mut Validator, sort: &str) -> Option<SortOrder<UserSortField>> {
    sort_order(validator, sort, USER_SORT_FIELDS)
}

/// Checks an avatar URL: absolute http(s) with a host, at most `MAX_AVATAR_URL_CHARS`.
fn check_avatar_url(validator: &mut Validator, value: &str) {
    if value.chars().count() > MAX_AVATAR_URL_CHARS {
        validator.error("avatarUrl", format!("must be at most {MAX_AVATAR_URL_CHARS} characters"));
        return;
    }
    let is_web_url = url::Url::parse(value).is_ok_and(|parsed| {
        matches!(parsed.scheme(), "http" | "https")
            && parsed.host_str().is_some_and(|host| !host.is_empty())
    });
    if !is_web_url {
        validator.error("avatarUrl", "must be an http or https URL");
    }
}

async fn load_user(context: &AppContext, user_id: Uuid) -> ServiceResult<User> {
    context.store.get_user(user_id).await.map_err(|error| ServiceError::from_store(error, "user"))
}

/// The caller's own profile.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_current_user(
    context: &AppContext,
    caller: &Caller,
    _request: pb::GetCurrentUserRequest,
) -> ServiceResult<pb::GetCurrentUserResponse> {
    caller.require_user_access(Access::Read)?;
    let user = load_user(context, caller.user_id).await?;
    Ok(pb::GetCurrentUserResponse { user: Some(convert::user(&user)) })
}

/// Changes the fields of the caller's profile that the mask names, if `user.version` is
/// still current.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_current_user(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateCurrentUserRequest,
) -> ServiceResult<pb::UpdateCurrentUserResponse> {
    caller.require_user_access(Access::Write)?;
    let mut validator = Validator::new();
    let Some(profile) = request.user else {
        return Err(ServiceError::invalid_field("user", "is required"));
    };
    let fields = update_mask_fields(&mut validator, request.update_mask, UPDATABLE_PROFILE_FIELDS);
    if profile.version < 1 {
        validator.error("version", "is required: send the version you read");
    }
    let mut changes = UserProfileChanges::default();
    for field in &fields {
        match field {
            ProfileField::FullName => {
                validator.required_text("fullName", &profile.full_name, MAX_NAME_CHARS);
                changes.full_name = Some(profile.full_name.trim().to_owned());
            }
            ProfileField::AvatarUrl => {
                let avatar_url = profile.avatar_url.trim();
                if avatar_url.is_empty() {
                    changes.avatar_url = Some(None);
                } else {
                    check_avatar_url(&mut validator, avatar_url);
                    changes.avatar_url = Some(Some(avatar_url.to_owned()));
                }
            }
            ProfileField::Preferences => {
                let preferences = profile
                    .preferences
                    .as_ref()
                    .map(wkt::struct_to_json)
                    .unwrap_or_else(|| json!({}));
                if preferences.to_string().len() > MAX_PREFERENCES_BYTES {
                    validator.error(
                        "preferences",
                        format!("must be at most {MAX_PREFERENCES_BYTES} bytes of JSON"),
                    );
                }
                changes.preferences = Some(preferences);
            }
        }
    }
    validator.finish()?;

    let before = load_user(context, caller.user_id).await?;
    let after = context
        .store
        .update_user_profile(caller.user_id, i64::from(profile.version), changes)
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("user.update", "user", Some(after.id.to_string())).with_changes(
            json!({ "before": profile_snapshot(&before, &fields), "after": profile_snapshot(&after, &fields) }),
        ),
    )
    .await;
    Ok(pb::UpdateCurrentUserResponse { user: Some(convert::user(&after)) })
}

/// The named profile fields of `user`, for the audit trail.
fn profile_snapshot(user: &User, fields: &[ProfileField]) -> serde_json::Value {
    let mut snapshot = serde_json::Map::new();
    for field in fields {
        let (name, value) = match field {
            ProfileField::FullName => ("fullName", json!(user.full_name)),
            ProfileField::AvatarUrl => ("avatarUrl", json!(user.avatar_url)),
            ProfileField::Preferences => ("preferences", user.preferences.clone()),
        };
        snapshot.insert(name.to_owned(), value);
    }
    serde_json::Value::Object(snapshot)
}

/// Any user by id (admin only).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_user(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetUserRequest,
) -> ServiceResult<pb::GetUserResponse> {
    caller.require_user_access(Access::Read)?;
    caller.require_admin()?;
    let user_id = parse_id("userId", &request.user_id)?;
    let user = load_user(context, user_id).await?;
    Ok(pb::GetUserResponse { user: Some(convert::user(&user)) })
}

/// Every live user, a page at a time (admin only).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_users(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListUsersRequest,
) -> ServiceResult<pb::ListUsersResponse> {
    caller.require_user_access(Access::Read)?;
    caller.require_admin()?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    let sort = user_sort(&mut validator, &request.sort);
    validator.max_chars("search", &request.search, MAX_SEARCH_CHARS);
    let role = match request.role {
        0 => None,
        number => {
            let role = convert::user_role_from_proto(number);
            if role.is_none() {
                validator.error("role", "must be ADMIN, USER or AGENT");
            }
            role
        }
    };
    validator.finish()?;
    let search = Some(request.search.trim().to_owned()).filter(|search| !search.is_empty());
    let found = context
        .store
        .list_users(UserFilter { page, sort, search, role })
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    Ok(pb::ListUsersResponse {
        users: found.items.iter().map(convert::user).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// Changes a user's role (admin only). The user's sessions end, so their next token carries
/// the new role; an administrator cannot change their own role (no installation loses its
/// last administrator that way).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_user_role(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateUserRoleRequest,
) -> ServiceResult<pb::UpdateUserRoleResponse> {
    caller.require_user_access(Access::Write)?;
    caller.require_admin()?;
    let mut validator = Validator::new();
    let user_id = match parse_id("userId", &request.user_id) {
        Ok(user_id) => Some(user_id),
        Err(_) => {
            validator.error("userId", "is not a valid id");
            None
        }
    };
    let role = convert::user_role_from_proto(request.role);
    if role.is_none() {
        validator.error("role", "must be ADMIN, USER or AGENT");
    }
    if request.version < 0 {
        validator.error("version", "must not be negative");
    }
    validator.finish()?;
    let (Some(user_id), Some(role)) = (user_id, role) else {
        return Err(ServiceError::invalid_field("role", "is required"));
    };
    if user_id == caller.user_id {
        return Err(ServiceError::conflict("an administrator cannot change their own role"));
    }
    let before = load_user(context, user_id).await?;
    let expected_version = (request.version > 0).then_some(i64::from(request.version));
    let after = context
        .store
        .set_user_role(user_id, role, expected_version)
        .await
        .map_err(|error| ServiceError::from_store(error, "user"))?;
    if before.role != after.role {
        end_sessions_after_role_change(context, user_id).await;
        // A demoted administrator's shared runners stop serving everyone, on every replica.
        super::runner_access::announce_access_change(context).await;
    }
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("user.role_change", "user", Some(user_id.to_string())).with_changes(
            json!({ "before": { "role": before.role.as_str() }, "after": { "role": after.role.as_str() } }),
        ),
    )
    .await;
    Ok(pb::UpdateUserRoleResponse { user: Some(convert::user(&after)) })
}

/// Revokes every session of a user whose role changed, so no access token keeps the old role.
async fn end_sessions_after_role_change(context: &AppContext, user_id: Uuid) {
    let now = Utc::now();
    match context.store.revoke_all_user_sessions(user_id, SessionRevokeReason::Admin, now).await {
        Ok(session_ids) => {
            let lifetime =
                chrono::Duration::from_std(context.tokens.settings().access_token_lifetime)
                    .unwrap_or(chrono::Duration::minutes(15));
            context
                .revoked_sessions
                .announce(context.bus.as_ref(), &session_ids, now + lifetime)
                .await;
        }
        Err(error) => {
            tracing::error!(%error, %user_id, "could not end the sessions of a user whose role changed");
        }
    }
}

/// What `turbocat admin create` asks for.
pub struct NewAdministrator {
    pub email: String,
    pub password: String,
    pub full_name: Option<String>,
}

impl std::fmt::Debug for NewAdministrator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NewAdministrator")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .field("full_name", &self.full_name)
            .finish()
    }
}

/// Creates an administrator account from the command line (no session, no request).
pub async fn create_administrator(
    store: &dyn Store,
    new_administrator: NewAdministrator,
) -> ServiceResult<User> {
    let full_name = new_administrator
        .full_name
        .as_deref()
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .unwrap_or("Administrator")
        .to_owned();
    Validator::new()
        .email("email", &new_administrator.email)
        .password("password", &new_administrator.password)
        .required_text("fullName", &full_name, MAX_NAME_CHARS)
        .finish()?;
    let email = new_administrator.email.trim().to_lowercase();
    let password_hash = password::hash_password(new_administrator.password)
        .await
        .map_err(|error| ServiceError::internal(&error))?;
    let mut new_user = NewUser::new(email, full_name);
    new_user.password_hash = Some(password_hash);
    new_user.role = RoleAssignment::Exactly(UserRole::Admin);
    let user = match store.create_user(new_user).await {
        Ok(user) => user,
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ServiceError::conflict("an account with this email already exists"));
        }
        Err(error) => return Err(ServiceError::from_store(error, "user")),
    };
    let mut entry = NewAuditLog::new(AuditActorKind::System, "user.create", "user");
    entry.resource_id = Some(user.id.to_string());
    entry.metadata = json!({ "role": user.role.as_str(), "via": "cli" });
    if let Err(error) = store.append_audit_log(entry).await {
        tracing::error!(%error, "could not write an audit row");
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PageRequest;

    #[test]
    fn pages_default_and_refuse_out_of_range_values() {
        let mut validator = Validator::new();
        assert_eq!(page_request(&mut validator, None, None), PageRequest::new(1, 20));
        assert_eq!(page_request(&mut validator, Some(3), Some(100)), PageRequest::new(3, 100));
        assert_eq!(page_request(&mut validator, Some(1), Some(1)), PageRequest::new(1, 1));
        assert!(validator.finish().is_ok());
        for (page, page_size) in [(-1, 101), (0, 0)] {
            let mut validator = Validator::new();
            page_request(&mut validator, Some(page), Some(page_size));
            let error = validator.finish().expect_err("both bad");
            let fields: Vec<&str> =
                error.field_errors.iter().map(|field| field.field.as_str()).collect();
            assert_eq!(fields, vec!["page", "pageSize"]);
        }
    }

    #[test]
    fn sorting_follows_the_allowlist() {
        let mut validator = Validator::new();
        assert_eq!(
            user_sort(&mut validator, "-fullName"),
            Some(SortOrder { field: UserSortField::FullName, descending: true })
        );
        assert_eq!(
            user_sort(&mut validator, "email"),
            Some(SortOrder { field: UserSortField::Email, descending: false })
        );
        assert_eq!(user_sort(&mut validator, ""), None);
        assert!(validator.finish().is_ok());
        for bad in ["password_hash", "--email", "email desc", "-"] {
            let mut validator = Validator::new();
            user_sort(&mut validator, bad);
            assert!(validator.finish().is_err(), "{bad}");
        }
    }

    #[test]
    fn avatar_urls_must_be_web_urls() {
        for good in ["https://example.com/a.png", "http://cdn.example.com:8080/x?y=1"] {
            let mut validator = Validator::new();
            check_avatar_url(&mut validator, good);
            assert!(validator.finish().is_ok(), "{good}");
        }
        let too_long = format!("https://example.com/{}", "a".repeat(MAX_AVATAR_URL_CHARS));
        for bad in
            ["ftp://example.com/a", "javascript:alert(1)", "not a url", "https://", &too_long]
        {
            let mut validator = Validator::new();
            check_avatar_url(&mut validator, bad);
            assert!(validator.finish().is_err(), "{bad}");
        }
    }
}
