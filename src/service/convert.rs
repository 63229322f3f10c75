//! Store rows -> proto messages (and the few conversions back). Well-known types (timestamps,
//! `Struct`/`Value` <-> JSON) are `crate::proto::wkt`.
//! May call: the store's model types, `crate::proto`.

use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store;
use wkt::{json_object_to_struct, optional_timestamp, timestamp};

pub fn user_role(role: store::UserRole) -> pb::UserRole {
    match role {
        store::UserRole::Admin => pb::UserRole::Admin,
        store::UserRole::User => pb::UserRole::User,
        store::UserRole::Agent => pb::UserRole::Agent,
    }
}

/// A user as the API shows it: never the password hash.
pub fn user(user: &store::User) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        email: user.email.clone(),
        full_name: user.full_name.clone(),
        avatar_url: user.avatar_url.clone().unwrap_or_default(),
        role: user_role(user.role).into(),
        preferences: Some(json_object_to_struct(&user.preferences)),
        last_login_at: optional_timestamp(user.last_login_at),
        created_at: Some(timestamp(user.created_at)),
        updated_at: Some(timestamp(user.updated_at)),
        version: i32::try_from(user.version).unwrap_or(i32::MAX),
    }
}

/// A proto role as the store knows it; `None` for `UNSPECIFIED` and unknown numbers.
pub fn user_role_from_proto(role: i32) -> Option<store::UserRole> {
    match pb::UserRole::try_from(role).ok()? {
        pb::UserRole::Admin => Some(store::UserRole::Admin),
        pb::UserRole::User => Some(store::UserRole::User),
        pb::UserRole::Agent => Some(store::UserRole::Agent),
        pb::UserRole::Unspecified => None,
    }
}

pub fn api_key_scope(scope: store::ApiKeyScope) -> pb::ApiKeyScope {
    match scope {
        store::ApiKeyScope::Runner => pb::ApiKeyScope::Runner,
        store::ApiKeyScope::Read => pb::ApiKeyScope::Read,
        store::ApiKeyScope::Write => pb::ApiKeyScope::Write,
    }
}

/// A proto scope as the store knows it; `None` for `UNSPECIFIED` and unknown numbers.
pub fn api_key_scope_from_proto(scope: i32) -> Option<store::ApiKeyScope> {
    match pb::ApiKeyScope::try_from(scope).ok()? {
        pb::ApiKeyScope::Runner => Some(store::ApiKeyScope::Runner),
        pb::ApiKeyScope::Read => Some(store::ApiKeyScope::Read),
        pb::ApiKeyScope::Write => Some(store::ApiKeyScope::Write),
        pb::ApiKeyScope::Unspecified => None,
    }
}

/// An API key as the API shows it: its prefix, never its hash or secret.
pub fn api_key(api_key: &store::ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: api_key.id.to_string(),
        name: api_key.name.clone(),
        prefix: api_key.key_prefix.clone(),
        scopes: api_key.scopes.iter().map(|scope| api_key_scope(*scope).into()).collect(),
        shared: api_key.shared,
        expires_at: optional_timestamp(api_key.expires_at),
        last_used_at: optional_timestamp(api_key.last_used_at),
        created_at: Some(timestamp(api_key.created_at)),
    }
}

/// The position of a numbered page among `total` matching rows.
pub fn pagination(page: store::PageRequest, total: i64) -> pb::Pagination {
    let page_size = i64::from(page.page_size.max(1));
    let total_pages = (total.max(0) + page_size - 1) / page_size;
    pb::Pagination {
        page: i32::try_from(page.page).unwrap_or(i32::MAX),
        page_size: i32::try_from(page.page_size).unwrap_or(i32::MAX),
        total: i32::try_from(total).unwrap_or(i32::MAX),
        total_pages: i32::try_from(total_pages).unwrap_or(i32::MAX),
        next_cursor: String::new(),
    }
}
