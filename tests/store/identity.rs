//! Conformance: identity (users, sessions and refresh rotation, password reset, API keys, audit).

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde_json::json;
use turbocat::store::{
    ApiKeyFilter, ApiKeyScope, AuditActionFilter, AuditActorKind, AuditLogFilter, AuditOutcome,
    ExternalIdentity, NewApiKey, NewAuditLog, NewPasswordResetToken, NewSession, NewUser,
    OwnerScope, PageRequest, PasswordReset, PasswordResetOutcome, RefreshRejection,
    RefreshTokenRotation, RoleAssignment, RotateOutcome, SessionRevokeReason, SortOrder, Store,
    StoreError, User, UserFilter, UserProfileChanges, UserRole, UserSortField,
};
use uuid::Uuid;

/// Now, at the microsecond precision both backends keep, so values round-trip exactly.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

async fn create_user(store: &Arc<dyn Store>, email: &str, full_name: &str) -> User {
    store.create_user(NewUser::new(email, full_name)).await.expect("create user")
}

fn new_session(user_id: Uuid, refresh_token_hash: &str) -> NewSession {
    NewSession {
        user_id,
        expires_at: now() + Duration::days(30),
        user_agent: Some("conformance/1.0".to_owned()),
        ip_address: Some("192.0.2.7".to_owned()),
        refresh_token_hash: refresh_token_hash.to_owned(),
        refresh_token_expires_at: now() + Duration::days(7),
    }
}

fn rotation(presented: &str, new: &str, at: DateTime<Utc>) -> RefreshTokenRotation {
    RefreshTokenRotation {
        presented_token_hash: presented.to_owned(),
        new_token_hash: new.to_owned(),
        new_token_expires_at: at + Duration::days(7),
        now: at,
    }
}

fn new_api_key(user_id: Uuid, name: &str, suffix: &str) -> NewApiKey {
    NewApiKey {
        user_id,
        name: name.to_owned(),
        key_prefix: format!("tc_{suffix}"),
        key_hash: format!("hash-{suffix}"),
        scopes: vec![ApiKeyScope::Read, ApiKeyScope::Write],
        shared: false,
        expires_at: None,
    }
}

fn user_filter(page: u32, page_size: u32) -> UserFilter {
    UserFilter { page: PageRequest::new(page, page_size), ..UserFilter::default() }
}

fn emails(users: &[User]) -> Vec<&str> {
    users.iter().map(|user| user.email.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------------

async fn user_create_get_and_lookups(store: Arc<dyn Store>) {
    let mut new_user = NewUser::new("Ada@Example.COM", "Ada Lovelace");
    new_user.password_hash = Some("argon2-hash".to_owned());
    new_user.avatar_url = Some("https://example.com/ada.png".to_owned());
    new_user.preferences = json!({"theme": "dark"});
    let ada = store.create_user(new_user).await.expect("create ada");
    assert_eq!(ada.email, "ada@example.com");
    assert_eq!(ada.role, UserRole::User);
    assert_eq!(ada.version, 1);
    assert_eq!(ada.password_hash.as_deref(), Some("argon2-hash"));
    assert_eq!(ada.preferences, json!({"theme": "dark"}));
    assert_eq!(ada.created_at, ada.updated_at);
    assert!(ada.last_login_at.is_none() && ada.deleted_at.is_none());

    assert_eq!(store.get_user(ada.id).await.expect("get ada"), ada);
    assert_eq!(store.get_user_by_email("ADA@example.com").await.expect("by email"), ada);
    assert!(matches!(store.get_user(Uuid::now_v7()).await, Err(StoreError::NotFound)));
    assert!(matches!(
        store.get_user_by_email("nobody@example.com").await,
        Err(StoreError::NotFound)
    ));

    let duplicate = store.create_user(NewUser::new("ADA@EXAMPLE.com", "Impostor")).await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists(ref what)) if what == "email"),
        "{duplicate:?}"
    );

    let mut external = NewUser::new("grace@example.com", "Grace Hopper");
    external.external_identity = Some(ExternalIdentity {
        issuer: "https://idp.example.com".to_owned(),
        subject: "sub-1".to_owned(),
    });
    let grace = store.create_user(external).await.expect("create external user");
    assert!(grace.password_hash.is_none());
    assert_eq!(grace.external_issuer.as_deref(), Some("https://idp.example.com"));
    let found = store
        .get_user_by_external_identity("https://idp.example.com", "sub-1")
        .await
        .expect("by external identity");
    assert_eq!(found.id, grace.id);
    assert!(matches!(
        store.get_user_by_external_identity("https://idp.example.com", "sub-2").await,
        Err(StoreError::NotFound)
    ));
    let mut same_identity = NewUser::new("other@example.com", "Other");
    same_identity.external_identity = Some(ExternalIdentity {
        issuer: "https://idp.example.com".to_owned(),
        subject: "sub-1".to_owned(),
    });
    let duplicate_identity = store.create_user(same_identity).await;
    let conflict = match &duplicate_identity {
        Err(StoreError::AlreadyExists(what)) => what.as_str(),
        _ => "none",
    };
    assert_eq!(conflict, "external_identity", "{duplicate_identity:?}");

    assert_eq!(store.count_users().await.expect("count"), 2);
}

async fn user_first_user_becomes_admin(store: Arc<dyn Store>) {
    // Eight concurrent first registrations: exactly one becomes the administrator.
    let registrations = (0..8).map(|index| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut new_user = NewUser::new(format!("racer{index}@example.com"), "Racer");
            new_user.role = RoleAssignment::FirstUserIsAdmin { otherwise: UserRole::User };
            store.create_user(new_user).await
        })
    });
    let mut roles = Vec::new();
    for registration in futures::future::join_all(registrations).await {
        roles.push(registration.expect("task").expect("create racer").role);
    }
    assert_eq!(roles.iter().filter(|role| **role == UserRole::Admin).count(), 1, "{roles:?}");
    assert_eq!(roles.iter().filter(|role| **role == UserRole::User).count(), 7);

    let mut later = NewUser::new("later@example.com", "Later");
    later.role = RoleAssignment::FirstUserIsAdmin { otherwise: UserRole::Agent };
    assert_eq!(store.create_user(later).await.expect("later").role, UserRole::Agent);
    let mut agent = NewUser::new("agent@example.com", "Agent");
    agent.role = UserRole::Agent.into();
    assert_eq!(store.create_user(agent).await.expect("agent").role, UserRole::Agent);
    assert_eq!(store.count_users().await.expect("count"), 10);
}

async fn user_first_admin_counts_only_live_users(store: Arc<dyn Store>) {
    let first = create_user(&store, "first@example.com", "First").await;
    store.soft_delete_user(first.id, None).await.expect("delete first");
    assert_eq!(store.count_users().await.expect("count"), 0);
    let mut next = NewUser::new("next@example.com", "Next");
    next.role = RoleAssignment::FirstUserIsAdmin { otherwise: UserRole::User };
    assert_eq!(store.create_user(next).await.expect("next").role, UserRole::Admin);
}

async fn user_profile_role_password_and_login(store: Arc<dyn Store>) {
    let ann = create_user(&store, "ann@example.com", "Ann").await;

    let changes = UserProfileChanges {
        full_name: Some("Ann Smith".to_owned()),
        avatar_url: Some(Some("https://example.com/ann.png".to_owned())),
        preferences: Some(json!({"language": "fr"})),
    };
    let updated = store.update_user_profile(ann.id, 1, changes).await.expect("update");
    assert_eq!(updated.version, 2);
    assert_eq!(updated.full_name, "Ann Smith");
    assert_eq!(updated.avatar_url.as_deref(), Some("https://example.com/ann.png"));
    assert_eq!(updated.preferences, json!({"language": "fr"}));
    assert!(updated.updated_at >= ann.updated_at);
    assert_eq!(updated.email, ann.email);

    let stale = store
        .update_user_profile(
            ann.id,
            1,
            UserProfileChanges { full_name: Some("Lost".to_owned()), ..Default::default() },
        )
        .await;
    assert!(matches!(stale, Err(StoreError::VersionConflict { current_version: 2 })), "{stale:?}");
    assert_eq!(store.get_user(ann.id).await.expect("get").full_name, "Ann Smith");

    let cleared = store
        .update_user_profile(
            ann.id,
            2,
            UserProfileChanges { avatar_url: Some(None), ..Default::default() },
        )
        .await
        .expect("clear avatar");
    assert_eq!(cleared.version, 3);
    assert!(cleared.avatar_url.is_none());
    assert_eq!(cleared.full_name, "Ann Smith", "untouched fields stay");
    assert_eq!(cleared.preferences, json!({"language": "fr"}));

    let missing = store.update_user_profile(Uuid::now_v7(), 1, UserProfileChanges::default()).await;
    assert!(matches!(missing, Err(StoreError::NotFound)));

    let stale_role = store.set_user_role(ann.id, UserRole::Admin, Some(1)).await;
    assert!(matches!(stale_role, Err(StoreError::VersionConflict { current_version: 3 })));
    let admin = store.set_user_role(ann.id, UserRole::Admin, Some(3)).await.expect("promote");
    assert_eq!((admin.role, admin.version), (UserRole::Admin, 4));
    let demoted = store.set_user_role(ann.id, UserRole::User, None).await.expect("demote");
    assert_eq!((demoted.role, demoted.version), (UserRole::User, 5));
    assert!(matches!(
        store.set_user_role(Uuid::now_v7(), UserRole::User, None).await,
        Err(StoreError::NotFound)
    ));

    store.set_password_hash(ann.id, "new-hash".to_owned()).await.expect("set password");
    let with_password = store.get_user(ann.id).await.expect("get");
    assert_eq!(with_password.password_hash.as_deref(), Some("new-hash"));
    assert_eq!(with_password.version, 6);
    assert!(matches!(
        store.set_password_hash(Uuid::now_v7(), "x".to_owned()).await,
        Err(StoreError::NotFound)
    ));

    let login_at = now();
    store.record_login(ann.id, login_at).await.expect("record login");
    let logged_in = store.get_user(ann.id).await.expect("get");
    assert_eq!(logged_in.last_login_at, Some(login_at));
    assert_eq!(logged_in.version, 6, "a login is not a profile change");
    assert!(matches!(
        store.record_login(Uuid::now_v7(), login_at).await,
        Err(StoreError::NotFound)
    ));
}

async fn user_list_filter_sort_search_paginate(store: Arc<dyn Store>) {
    let carol = create_user(&store, "carol@example.com", "carol king").await;
    let alice = create_user(&store, "alice@example.com", "Alice Smith").await;
    let bob = create_user(&store, "bob@zeta.io", "Bob Alison").await;
    let mut agent = NewUser::new("dave_agent@example.com", "Dave");
    agent.role = UserRole::Agent.into();
    let dave = store.create_user(agent).await.expect("dave");
    let eve = create_user(&store, "eve@example.com", "eve").await;

    // Default: newest first.
    let all = store.list_users(user_filter(1, 100)).await.expect("list");
    assert_eq!(all.total, 5);
    assert_eq!(
        emails(&all.items),
        [
            "eve@example.com",
            "dave_agent@example.com",
            "bob@zeta.io",
            "alice@example.com",
            "carol@example.com"
        ]
    );

    // Pagination.
    let first_page = store.list_users(user_filter(1, 2)).await.expect("page 1");
    let second_page = store.list_users(user_filter(2, 2)).await.expect("page 2");
    let last_page = store.list_users(user_filter(3, 2)).await.expect("page 3");
    let beyond = store.list_users(user_filter(4, 2)).await.expect("page 4");
    assert_eq!((first_page.total, second_page.total, last_page.total), (5, 5, 5));
    assert_eq!(emails(&first_page.items), ["eve@example.com", "dave_agent@example.com"]);
    assert_eq!(emails(&second_page.items), ["bob@zeta.io", "alice@example.com"]);
    assert_eq!(emails(&last_page.items), ["carol@example.com"]);
    assert!(beyond.items.is_empty());

    // Every sort field, both directions.
    let sorted = |field, descending| UserFilter {
        sort: Some(SortOrder { field, descending }),
        ..user_filter(1, 100)
    };
    let by_email = store.list_users(sorted(UserSortField::Email, false)).await.expect("email");
    assert_eq!(
        emails(&by_email.items),
        [
            "alice@example.com",
            "bob@zeta.io",
            "carol@example.com",
            "dave_agent@example.com",
            "eve@example.com"
        ]
    );
    let by_email_desc = store.list_users(sorted(UserSortField::Email, true)).await.expect("email");
    assert_eq!(by_email_desc.items.first().map(|user| user.id), Some(eve.id));
    let by_name = store.list_users(sorted(UserSortField::FullName, false)).await.expect("name");
    let names: Vec<_> = by_name.items.iter().map(|user| user.full_name.as_str()).collect();
    assert_eq!(
        names,
        ["Alice Smith", "Bob Alison", "carol king", "Dave", "eve"],
        "case-insensitive"
    );
    let by_name_desc = store.list_users(sorted(UserSortField::FullName, true)).await.expect("name");
    assert_eq!(by_name_desc.items.first().map(|user| user.id), Some(eve.id));
    let by_created = store.list_users(sorted(UserSortField::CreatedAt, false)).await.expect("c");
    assert_eq!(by_created.items.first().map(|user| user.id), Some(carol.id));

    store
        .update_user_profile(
            alice.id,
            1,
            UserProfileChanges {
                full_name: Some("Alice Smith-Jones".to_owned()),
                ..Default::default()
            },
        )
        .await
        .expect("touch alice");
    let by_updated = store.list_users(sorted(UserSortField::UpdatedAt, true)).await.expect("u");
    assert_eq!(by_updated.items.first().map(|user| user.id), Some(alice.id));
    let by_updated_asc =
        store.list_users(sorted(UserSortField::UpdatedAt, false)).await.expect("u");
    assert_eq!(by_updated_asc.items.first().map(|user| user.id), Some(carol.id));
    assert_eq!(by_updated_asc.items.last().map(|user| user.id), Some(alice.id));

    // Search: email or full name, case-insensitive, LIKE wildcards taken literally.
    let search = |text: &str| UserFilter { search: Some(text.to_owned()), ..user_filter(1, 100) };
    let ali = store.list_users(search("ALI")).await.expect("search");
    let mut ali_ids: Vec<_> = ali.items.iter().map(|user| user.id).collect();
    ali_ids.sort();
    let mut expected = vec![alice.id, bob.id];
    expected.sort();
    assert_eq!((ali.total, ali_ids), (2, expected), "alice by email and name, bob by name");
    let zeta = store.list_users(search("zeta")).await.expect("search");
    assert_eq!(emails(&zeta.items), ["bob@zeta.io"]);
    let underscore = store.list_users(search("_agent")).await.expect("search");
    assert_eq!(emails(&underscore.items), ["dave_agent@example.com"]);
    let percent = store.list_users(search("%")).await.expect("search");
    assert_eq!(percent.total, 0, "% is not a wildcard");

    // Role filter, combined with paging.
    let role = |role| UserFilter { role: Some(role), ..user_filter(1, 100) };
    let agents = store.list_users(role(UserRole::Agent)).await.expect("agents");
    assert_eq!((agents.total, agents.items.len()), (1, 1));
    assert_eq!(agents.items[0].id, dave.id);
    let users_page = store
        .list_users(UserFilter { role: Some(UserRole::User), ..user_filter(2, 3) })
        .await
        .expect("users page 2");
    assert_eq!(users_page.total, 4);
    assert_eq!(users_page.items.len(), 1);
    assert_eq!(store.list_users(role(UserRole::Admin)).await.expect("admins").total, 0);
}

async fn user_soft_delete(store: Arc<dyn Store>) {
    let zoe = create_user(&store, "zoe@example.com", "Zoe").await;
    let other = create_user(&store, "other@example.com", "Other").await;
    let session = store.create_session(new_session(zoe.id, "zoe-token")).await.expect("session");

    let stale = store.soft_delete_user(zoe.id, Some(7)).await;
    assert!(matches!(stale, Err(StoreError::VersionConflict { current_version: 1 })), "{stale:?}");
    store.soft_delete_user(zoe.id, Some(1)).await.expect("delete");

    assert!(matches!(store.get_user(zoe.id).await, Err(StoreError::NotFound)));
    assert!(matches!(store.get_user_by_email("zoe@example.com").await, Err(StoreError::NotFound)));
    let listed = store.list_users(user_filter(1, 100)).await.expect("list");
    assert_eq!((listed.total, emails(&listed.items)), (1, vec!["other@example.com"]));
    assert_eq!(store.count_users().await.expect("count"), 1);
    assert!(matches!(store.soft_delete_user(zoe.id, None).await, Err(StoreError::NotFound)));
    assert!(matches!(
        store.update_user_profile(zoe.id, 2, UserProfileChanges::default()).await,
        Err(StoreError::NotFound)
    ));

    let revoked = store.get_session(session.id).await.expect("session");
    assert_eq!(revoked.revoke_reason, Some(SessionRevokeReason::UserDeleted));
    assert!(matches!(
        store.create_session(new_session(zoe.id, "zoe-token-2")).await,
        Err(StoreError::NotFound)
    ));

    let again = create_user(&store, "ZOE@example.com", "Zoe again").await;
    assert_ne!(again.id, zoe.id, "the email is free again");
    assert_eq!(store.get_user(other.id).await.expect("other untouched").version, 1);
}

// ---------------------------------------------------------------------------------------------
// Sessions and refresh tokens
// ---------------------------------------------------------------------------------------------

async fn session_create_revoke_and_poll(store: Arc<dyn Store>) {
    let sam = create_user(&store, "sam@example.com", "Sam").await;
    let before = now() - Duration::seconds(1);

    let session = store.create_session(new_session(sam.id, "sam-1")).await.expect("session");
    assert_eq!(session.user_id, sam.id);
    assert!(session.revoked_at.is_none() && session.revoke_reason.is_none());
    assert_eq!(session.user_agent.as_deref(), Some("conformance/1.0"));
    assert_eq!(session.ip_address.as_deref(), Some("192.0.2.7"));
    assert_eq!(store.get_session(session.id).await.expect("get"), session);
    assert!(matches!(store.get_session(Uuid::now_v7()).await, Err(StoreError::NotFound)));
    assert!(matches!(
        store.create_session(new_session(Uuid::now_v7(), "ghost")).await,
        Err(StoreError::NotFound)
    ));
    let duplicate_token = store.create_session(new_session(sam.id, "sam-1")).await;
    assert!(matches!(duplicate_token, Err(StoreError::AlreadyExists(_))), "{duplicate_token:?}");

    let logout_at = now();
    assert!(
        store
            .revoke_session(session.id, SessionRevokeReason::Logout, logout_at)
            .await
            .expect("revoke")
    );
    assert!(
        !store
            .revoke_session(session.id, SessionRevokeReason::Admin, now())
            .await
            .expect("revoke again"),
        "idempotent"
    );
    let revoked = store.get_session(session.id).await.expect("get");
    assert_eq!(revoked.revoked_at, Some(logout_at));
    assert_eq!(revoked.revoke_reason, Some(SessionRevokeReason::Logout), "first reason stays");
    assert!(matches!(
        store.revoke_session(Uuid::now_v7(), SessionRevokeReason::Logout, now()).await,
        Err(StoreError::NotFound)
    ));

    // revoke_all_user_sessions: only live sessions of that user.
    let live_one = store.create_session(new_session(sam.id, "sam-2")).await.expect("s2");
    let live_two = store.create_session(new_session(sam.id, "sam-3")).await.expect("s3");
    let mut expired = new_session(sam.id, "sam-4");
    expired.expires_at = now() - Duration::minutes(1);
    let expired = store.create_session(expired).await.expect("s4");
    let kim = create_user(&store, "kim@example.com", "Kim").await;
    let kims = store.create_session(new_session(kim.id, "kim-1")).await.expect("kim");

    let admin_at = now();
    let mut revoked_ids = store
        .revoke_all_user_sessions(sam.id, SessionRevokeReason::Admin, admin_at)
        .await
        .expect("all");
    revoked_ids.sort();
    let mut expected = vec![live_one.id, live_two.id];
    expected.sort();
    assert_eq!(revoked_ids, expected);
    assert!(store.get_session(expired.id).await.expect("expired").revoked_at.is_none());
    assert!(store.get_session(kims.id).await.expect("kim").revoked_at.is_none());
    assert_eq!(
        store.get_session(live_one.id).await.expect("s2").revoke_reason,
        Some(SessionRevokeReason::Admin)
    );
    assert!(
        store
            .revoke_all_user_sessions(sam.id, SessionRevokeReason::Admin, now())
            .await
            .expect("again")
            .is_empty()
    );

    // Replicas poll revocations since a time, oldest first.
    let since_start = store.list_revoked_sessions_since(before).await.expect("since start");
    let polled: Vec<_> = since_start.iter().map(|entry| entry.session_id).collect();
    assert_eq!(polled.len(), 3);
    assert_eq!(polled[0], session.id);
    assert!(since_start.iter().all(|entry| entry.user_id == sam.id));
    assert_eq!(since_start[0].revoked_at, logout_at);
    assert_eq!(since_start[0].expires_at, session.expires_at);
    let since_admin = store.list_revoked_sessions_since(admin_at).await.expect("since admin");
    let mut since_admin_ids: Vec<_> = since_admin.iter().map(|entry| entry.session_id).collect();
    since_admin_ids.sort();
    assert_eq!(since_admin_ids, expected, "inclusive of the boundary, nothing older");
    assert!(
        store
            .list_revoked_sessions_since(now() + Duration::minutes(1))
            .await
            .expect("future")
            .is_empty()
    );
}

async fn refresh_rotation_and_reuse(store: Arc<dyn Store>) {
    let rae = create_user(&store, "rae@example.com", "Rae").await;
    let session = store.create_session(new_session(rae.id, "token-a")).await.expect("session");

    let first_at = now();
    let RotateOutcome::Rotated { session: rotated_session, user } = store
        .rotate_refresh_token(rotation("token-a", "token-b", first_at))
        .await
        .expect("rotate a")
    else {
        panic!("token a should rotate");
    };
    assert_eq!(rotated_session.id, session.id);
    assert_eq!(rotated_session.updated_at, first_at);
    assert_eq!(user.id, rae.id);
    assert_eq!(user.email, "rae@example.com");

    let second =
        store.rotate_refresh_token(rotation("token-b", "token-c", now())).await.expect("b");
    assert!(matches!(second, RotateOutcome::Rotated { .. }), "{second:?}");

    let unknown = store.rotate_refresh_token(rotation("token-zzz", "token-y", now())).await;
    assert!(matches!(unknown, Ok(RotateOutcome::NotFound)), "{unknown:?}");

    // Token a was rotated already: presenting it again revokes the whole family.
    let reuse_at = now();
    let reused =
        store.rotate_refresh_token(rotation("token-a", "token-x", reuse_at)).await.expect("a");
    assert_eq!(reused, RotateOutcome::Reused { session_id: session.id, user_id: rae.id });
    let family = store.get_session(session.id).await.expect("session");
    assert_eq!(family.revoke_reason, Some(SessionRevokeReason::RefreshReuse));
    assert_eq!(family.revoked_at, Some(reuse_at));

    // The newest token of the family is dead too, and nothing was inserted for token-x.
    let after = store.rotate_refresh_token(rotation("token-c", "token-d", now())).await.expect("c");
    assert_eq!(after, RotateOutcome::Invalid { reason: RefreshRejection::SessionRevoked });
    let never_stored = store.rotate_refresh_token(rotation("token-x", "token-w", now())).await;
    assert!(matches!(never_stored, Ok(RotateOutcome::NotFound)), "{never_stored:?}");
}

async fn session_found_by_refresh_token(store: Arc<dyn Store>) {
    let uma = create_user(&store, "uma@example.com", "Uma").await;
    let session = store.create_session(new_session(uma.id, "uma-a")).await.expect("session");
    let other = store.create_session(new_session(uma.id, "uma-other")).await.expect("other");
    let found = store.get_session_by_refresh_token("uma-a").await.expect("by first token");
    assert_eq!(found, session);
    let rotated = store.rotate_refresh_token(rotation("uma-a", "uma-b", now())).await;
    assert!(matches!(rotated, Ok(RotateOutcome::Rotated { .. })), "{rotated:?}");
    // Both the used and the current token name the session; lookup changes nothing.
    assert_eq!(store.get_session_by_refresh_token("uma-a").await.expect("used").id, session.id);
    assert_eq!(store.get_session_by_refresh_token("uma-b").await.expect("current").id, session.id);
    assert_eq!(store.get_session_by_refresh_token("uma-other").await.expect("other"), other);
    let revoked_at = now();
    assert!(
        store
            .revoke_session(session.id, SessionRevokeReason::Logout, revoked_at)
            .await
            .expect("revoke")
    );
    let revoked = store.get_session_by_refresh_token("uma-b").await.expect("revoked session");
    assert_eq!(revoked.revoked_at, Some(revoked_at));
    assert_eq!(revoked.revoke_reason, Some(SessionRevokeReason::Logout));
    let unknown = store.get_session_by_refresh_token("uma-unknown").await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
    let next = store.rotate_refresh_token(rotation("uma-other", "uma-other-2", now())).await;
    assert!(matches!(next, Ok(RotateOutcome::Rotated { .. })), "lookup did not use the token");
}

async fn refresh_rotation_rejects_expired_and_revoked(store: Arc<dyn Store>) {
    let ivy = create_user(&store, "ivy@example.com", "Ivy").await;

    // An expired token is refused and left unused: it is not reuse.
    let mut short_token = new_session(ivy.id, "short-token");
    short_token.refresh_token_expires_at = now() - Duration::seconds(1);
    let short = store.create_session(short_token).await.expect("short");
    let expired =
        store.rotate_refresh_token(rotation("short-token", "n1", now())).await.expect("r");
    assert_eq!(expired, RotateOutcome::Invalid { reason: RefreshRejection::TokenExpired });
    let again = store.rotate_refresh_token(rotation("short-token", "n1", now())).await.expect("r");
    assert_eq!(again, RotateOutcome::Invalid { reason: RefreshRejection::TokenExpired });
    assert!(store.get_session(short.id).await.expect("short").revoked_at.is_none());

    // A session past its own expiry.
    let mut old_session = new_session(ivy.id, "old-session-token");
    old_session.expires_at = now() - Duration::seconds(1);
    store.create_session(old_session).await.expect("old");
    let session_expired =
        store.rotate_refresh_token(rotation("old-session-token", "n2", now())).await.expect("r");
    assert_eq!(
        session_expired,
        RotateOutcome::Invalid { reason: RefreshRejection::SessionExpired }
    );

    // A session ended by logout.
    let live = store.create_session(new_session(ivy.id, "logout-token")).await.expect("live");
    store.revoke_session(live.id, SessionRevokeReason::Logout, now()).await.expect("logout");
    let revoked =
        store.rotate_refresh_token(rotation("logout-token", "n3", now())).await.expect("r");
    assert_eq!(revoked, RotateOutcome::Invalid { reason: RefreshRejection::SessionRevoked });
    assert_eq!(
        store.get_session(live.id).await.expect("live").revoke_reason,
        Some(SessionRevokeReason::Logout),
        "a refused rotation changes nothing"
    );

    // The same token at an earlier instant, before it expired, still rotates.
    let mut later_token = new_session(ivy.id, "later-token");
    later_token.refresh_token_expires_at = now() + Duration::minutes(5);
    store.create_session(later_token).await.expect("later");
    let too_late = now() + Duration::minutes(10);
    let late =
        store.rotate_refresh_token(rotation("later-token", "n4", too_late)).await.expect("r");
    assert_eq!(late, RotateOutcome::Invalid { reason: RefreshRejection::TokenExpired });
    let in_time =
        store.rotate_refresh_token(rotation("later-token", "n4", now())).await.expect("r");
    assert!(matches!(in_time, RotateOutcome::Rotated { .. }), "{in_time:?}");
}

async fn refresh_concurrent_double_rotation(store: Arc<dyn Store>) {
    let cal = create_user(&store, "cal@example.com", "Cal").await;
    for round in 0..6 {
        let presented = format!("race-{round}");
        let session = store.create_session(new_session(cal.id, &presented)).await.expect("session");
        let contenders = ["left", "right"].map(|side| {
            let store = store.clone();
            let rotation = rotation(&presented, &format!("race-{round}-{side}"), now());
            tokio::spawn(async move { store.rotate_refresh_token(rotation).await })
        });
        let mut outcomes = Vec::new();
        for contender in futures::future::join_all(contenders).await {
            outcomes.push(contender.expect("task").expect("rotate"));
        }
        let winners =
            outcomes.iter().filter(|outcome| matches!(outcome, RotateOutcome::Rotated { .. }));
        assert_eq!(winners.count(), 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes.contains(&RotateOutcome::Reused { session_id: session.id, user_id: cal.id }),
            "round {round}: the loser presented a used token: {outcomes:?}"
        );
        let family = store.get_session(session.id).await.expect("session");
        assert_eq!(family.revoke_reason, Some(SessionRevokeReason::RefreshReuse));
    }
}

async fn session_purge_expired_rows(store: Arc<dyn Store>) {
    let pat = create_user(&store, "pat@example.com", "Pat").await;
    let mut gone = new_session(pat.id, "purge-old");
    gone.expires_at = now() - Duration::days(2);
    let gone = store.create_session(gone).await.expect("old");
    let kept = store.create_session(new_session(pat.id, "purge-live")).await.expect("live");
    let mut reset = NewPasswordResetToken {
        user_id: pat.id,
        token_hash: "reset-old".to_owned(),
        expires_at: now() - Duration::days(2),
    };
    store.create_password_reset_token(reset.clone()).await.expect("old reset");
    reset.token_hash = "reset-live".to_owned();
    reset.expires_at = now() + Duration::hours(1);
    store.create_password_reset_token(reset).await.expect("live reset");

    let purged = store.purge_expired_identity_rows(now() - Duration::days(1)).await.expect("purge");
    assert_eq!((purged.sessions, purged.password_reset_tokens), (1, 1));
    assert!(matches!(store.get_session(gone.id).await, Err(StoreError::NotFound)));
    assert!(store.get_session(kept.id).await.is_ok());
    let rotated = store.rotate_refresh_token(rotation("purge-live", "purge-next", now())).await;
    assert!(matches!(rotated, Ok(RotateOutcome::Rotated { .. })), "{rotated:?}");
    let old_gone = store.rotate_refresh_token(rotation("purge-old", "x", now())).await;
    assert!(matches!(old_gone, Ok(RotateOutcome::NotFound)), "tokens went with their session");
}

// ---------------------------------------------------------------------------------------------
// Password reset
// ---------------------------------------------------------------------------------------------

async fn password_reset_is_single_use_and_atomic(store: Arc<dyn Store>) {
    let mut new_user = NewUser::new("max@example.com", "Max");
    new_user.password_hash = Some("old-hash".to_owned());
    let max = store.create_user(new_user).await.expect("max");
    let other = create_user(&store, "other@example.com", "Other").await;
    let phone = store.create_session(new_session(max.id, "max-phone")).await.expect("phone");
    let laptop = store.create_session(new_session(max.id, "max-laptop")).await.expect("laptop");
    let others = store.create_session(new_session(other.id, "other-1")).await.expect("other");

    let token = |hash: &str, expires_at| NewPasswordResetToken {
        user_id: max.id,
        token_hash: hash.to_owned(),
        expires_at,
    };
    let stored = store
        .create_password_reset_token(token("reset-1", now() + Duration::hours(1)))
        .await
        .expect("t1");
    assert_eq!((stored.user_id, stored.used_at), (max.id, None));
    store
        .create_password_reset_token(token("reset-2", now() + Duration::hours(1)))
        .await
        .expect("t2");
    store
        .create_password_reset_token(token("reset-old", now() - Duration::minutes(1)))
        .await
        .expect("t3");
    let ghost = NewPasswordResetToken {
        user_id: Uuid::now_v7(),
        token_hash: "ghost".to_owned(),
        expires_at: now() + Duration::hours(1),
    };
    assert!(matches!(store.create_password_reset_token(ghost).await, Err(StoreError::NotFound)));

    let reset = |hash: &str, password: &str| PasswordReset {
        token_hash: hash.to_owned(),
        new_password_hash: password.to_owned(),
        now: now(),
    };
    let expired = store.consume_password_reset_token(reset("reset-old", "nope")).await.expect("x");
    assert_eq!(expired, PasswordResetOutcome::Expired);
    let unknown = store.consume_password_reset_token(reset("reset-zzz", "nope")).await.expect("x");
    assert_eq!(unknown, PasswordResetOutcome::NotFound);
    let unchanged = store.get_user(max.id).await.expect("max");
    assert_eq!(unchanged.password_hash.as_deref(), Some("old-hash"));
    assert_eq!(unchanged.version, 1, "a refused reset changes nothing");

    let outcome =
        store.consume_password_reset_token(reset("reset-1", "new-hash")).await.expect("reset");
    let PasswordResetOutcome::Reset { user_id, mut revoked_session_ids } = outcome else {
        panic!("reset-1 should reset: {outcome:?}");
    };
    revoked_session_ids.sort();
    let mut expected = vec![phone.id, laptop.id];
    expected.sort();
    assert_eq!((user_id, revoked_session_ids), (max.id, expected));
    let after = store.get_user(max.id).await.expect("max");
    assert_eq!(after.password_hash.as_deref(), Some("new-hash"));
    assert_eq!(after.version, 2);
    for session_id in [phone.id, laptop.id] {
        let session = store.get_session(session_id).await.expect("session");
        assert_eq!(session.revoke_reason, Some(SessionRevokeReason::PasswordReset));
    }
    assert!(store.get_session(others.id).await.expect("other").revoked_at.is_none());
    let refresh = store.rotate_refresh_token(rotation("max-phone", "max-phone-2", now())).await;
    assert_eq!(
        refresh.ok(),
        Some(RotateOutcome::Invalid { reason: RefreshRejection::SessionRevoked })
    );

    let replay =
        store.consume_password_reset_token(reset("reset-1", "evil")).await.expect("replay");
    assert_eq!(replay, PasswordResetOutcome::AlreadyUsed);
    let sibling =
        store.consume_password_reset_token(reset("reset-2", "evil")).await.expect("sibling");
    assert_eq!(sibling, PasswordResetOutcome::AlreadyUsed, "a reset retires the other tokens");
    assert_eq!(
        store.get_user(max.id).await.expect("max").password_hash.as_deref(),
        Some("new-hash")
    );
}

// ---------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------

async fn api_key_lifecycle_and_scoping(store: Arc<dyn Store>) {
    let ann = create_user(&store, "ann@example.com", "Ann").await;
    let bob = create_user(&store, "bob@example.com", "Bob").await;

    let mut runner = new_api_key(ann.id, "runner key", "aaaa0001");
    runner.scopes = vec![ApiKeyScope::Runner];
    runner.shared = true;
    let runner = store.create_api_key(runner).await.expect("runner key");
    assert_eq!(runner.user_id, ann.id);
    assert_eq!(runner.scopes, vec![ApiKeyScope::Runner]);
    assert!(runner.shared);
    assert!(runner.revoked_at.is_none() && runner.last_used_at.is_none());

    let found = store.get_api_key_by_hash("hash-aaaa0001").await.expect("by hash");
    assert_eq!(found.key, runner);
    assert_eq!(found.owner, ann, "the owner comes with the key");
    assert!(matches!(store.get_api_key_by_hash("hash-none").await, Err(StoreError::NotFound)));
    let by_id = store.get_api_key_with_owner(runner.id).await.expect("by id");
    assert_eq!((by_id.key, by_id.owner), (runner.clone(), ann.clone()), "by id, the same");
    assert!(matches!(
        store.get_api_key_with_owner(Uuid::now_v7()).await,
        Err(StoreError::NotFound)
    ));

    let same_prefix =
        NewApiKey { key_hash: "hash-other".to_owned(), ..new_api_key(ann.id, "x", "aaaa0001") };
    let duplicate = store.create_api_key(same_prefix).await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists(ref what)) if what == "key_prefix"),
        "{duplicate:?}"
    );
    let same_hash =
        NewApiKey { key_prefix: "tc_other".to_owned(), ..new_api_key(ann.id, "x", "aaaa0001") };
    let duplicate = store.create_api_key(same_hash).await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists(ref what)) if what == "key_hash"),
        "{duplicate:?}"
    );
    assert!(matches!(
        store.create_api_key(new_api_key(Uuid::now_v7(), "ghost", "ghost001")).await,
        Err(StoreError::NotFound)
    ));

    // An expired key is still returned: the caller compares expires_at.
    let expires_at = now() - Duration::hours(1);
    let expired =
        NewApiKey { expires_at: Some(expires_at), ..new_api_key(ann.id, "old", "aaaa0002") };
    store.create_api_key(expired).await.expect("expired key");
    let expired = store.get_api_key_by_hash("hash-aaaa0002").await.expect("expired by hash");
    assert_eq!(expired.key.expires_at, Some(expires_at));

    let used_at = now();
    store.touch_api_key_last_used(runner.id, used_at).await.expect("touch");
    let touched = store.get_api_key_by_hash("hash-aaaa0001").await.expect("touched");
    assert_eq!(touched.key.last_used_at, Some(used_at));
    assert_eq!(touched.key.updated_at, runner.updated_at, "touch is not an update");
    assert!(matches!(
        store.touch_api_key_last_used(Uuid::now_v7(), used_at).await,
        Err(StoreError::NotFound)
    ));

    let bobs = store.create_api_key(new_api_key(bob.id, "bob key", "bbbb0001")).await.expect("bob");
    let third =
        store.create_api_key(new_api_key(ann.id, "third", "aaaa0003")).await.expect("third");

    // Scoping: another user's key is NotFound and stays live.
    assert!(matches!(
        store.revoke_api_key(OwnerScope::Owner(ann.id), bobs.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(store.get_api_key_by_hash("hash-bbbb0001").await.is_ok());
    assert!(matches!(
        store.revoke_api_key(OwnerScope::Owner(ann.id), Uuid::now_v7()).await,
        Err(StoreError::NotFound)
    ));

    let revoked = store.revoke_api_key(OwnerScope::Owner(ann.id), runner.id).await.expect("revoke");
    let revoked_at = revoked.revoked_at.expect("revoked_at set");
    assert!(matches!(store.get_api_key_by_hash("hash-aaaa0001").await, Err(StoreError::NotFound)));
    assert!(
        matches!(store.get_api_key_with_owner(runner.id).await, Err(StoreError::NotFound)),
        "a revoked key is not found by id either"
    );
    let revoked_again = store.revoke_api_key(OwnerScope::All, runner.id).await.expect("again");
    assert_eq!(revoked_again.revoked_at, Some(revoked_at), "the first revocation time stays");

    // Listing: newest first, revoked excluded unless asked, scoped, paged.
    let page = |page_number, include_revoked| ApiKeyFilter {
        page: PageRequest::new(page_number, 2),
        include_revoked,
    };
    let live = store.list_api_keys(OwnerScope::Owner(ann.id), page(1, false)).await.expect("live");
    let live_names: Vec<_> = live.items.iter().map(|key| key.name.as_str()).collect();
    assert_eq!((live.total, live_names), (2, vec!["third", "old"]));
    let with_revoked =
        store.list_api_keys(OwnerScope::Owner(ann.id), page(1, true)).await.expect("all of ann");
    assert_eq!(with_revoked.total, 3);
    assert_eq!(with_revoked.items[0].id, third.id);
    let second_page =
        store.list_api_keys(OwnerScope::Owner(ann.id), page(2, true)).await.expect("page 2");
    assert_eq!(second_page.items.iter().map(|key| key.id).collect::<Vec<_>>(), vec![runner.id]);
    let bob_keys =
        store.list_api_keys(OwnerScope::Owner(bob.id), page(1, true)).await.expect("bob");
    assert_eq!((bob_keys.total, bob_keys.items[0].id), (1, bobs.id));
    let everyone = store
        .list_api_keys(
            OwnerScope::All,
            ApiKeyFilter { page: PageRequest::new(1, 10), include_revoked: false },
        )
        .await
        .expect("admin");
    let everyone_ids: Vec<_> = everyone.items.iter().map(|key| key.id).collect();
    assert_eq!(everyone.total, 3);
    assert_eq!(everyone_ids, vec![third.id, bobs.id, expired.key.id], "newest first across owners");

    // A deleted owner's keys no longer authenticate.
    store.soft_delete_user(bob.id, None).await.expect("delete bob");
    assert!(matches!(store.get_api_key_by_hash("hash-bbbb0001").await, Err(StoreError::NotFound)));
    assert!(matches!(store.get_api_key_with_owner(bobs.id).await, Err(StoreError::NotFound)));
}

// ---------------------------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------------------------

fn audit_entry(
    actor_id: Option<Uuid>,
    action: &str,
    resource_type: &str,
    resource_id: &str,
) -> NewAuditLog {
    NewAuditLog {
        actor_id,
        resource_id: Some(resource_id.to_owned()),
        ..NewAuditLog::new(AuditActorKind::User, action, resource_type)
    }
}

fn audit_filter() -> AuditLogFilter {
    AuditLogFilter { limit: 100, ..AuditLogFilter::default() }
}

async fn audit_append_and_filter(store: Arc<dyn Store>) {
    let ann = create_user(&store, "ann@example.com", "Ann").await;
    let bob = create_user(&store, "bob@example.com", "Bob").await;

    let mut login = audit_entry(Some(ann.id), "auth.login", "user", &ann.id.to_string());
    login.ip_address = Some("198.51.100.4".to_owned());
    login.user_agent = Some("Firefox".to_owned());
    login.request_id = Some("req-1".to_owned());
    login.metadata = json!({"method": "password"});
    let login = store.append_audit_log(login).await.expect("login");
    assert_eq!(login.action, "auth.login");
    assert_eq!(login.actor_id, Some(ann.id));
    assert_eq!(login.outcome, AuditOutcome::Success);
    assert_eq!(login.metadata, json!({"method": "password"}));
    assert_eq!(login.request_id.as_deref(), Some("req-1"));
    assert!(login.changes.is_none());

    let between = now();
    let mut failed = audit_entry(Some(bob.id), "auth.login", "user", &bob.id.to_string());
    failed.outcome = AuditOutcome::Failure;
    let failed = store.append_audit_log(failed).await.expect("failed login");
    let mut update = audit_entry(Some(ann.id), "agent.update", "agent", "agent-1");
    update.changes = Some(json!({"before": {"name": "a"}, "after": {"name": "b"}}));
    let update = store.append_audit_log(update).await.expect("update");
    assert_eq!(update.changes, Some(json!({"before": {"name": "a"}, "after": {"name": "b"}})));
    let logout = store
        .append_audit_log(audit_entry(Some(ann.id), "auth.logout", "user", "x"))
        .await
        .expect("logout");
    let lookalike = store
        .append_audit_log(audit_entry(None, "authentication.probe", "user", "y"))
        .await
        .expect("lookalike");
    let mut system = NewAuditLog::new(AuditActorKind::System, "agent.update", "agent");
    system.resource_id = Some("agent-2".to_owned());
    let system = store.append_audit_log(system).await.expect("system");
    assert_eq!((system.actor_id, system.actor_kind), (None, AuditActorKind::System));
    let ghost =
        store.append_audit_log(audit_entry(Some(Uuid::now_v7()), "auth.login", "user", "z")).await;
    assert!(matches!(ghost, Err(StoreError::ReferenceViolated(_))), "{ghost:?}");

    let ids = |page: turbocat::store::CursorPage<turbocat::store::AuditLog>| -> Vec<Uuid> {
        page.items.iter().map(|entry| entry.id).collect()
    };

    let everything = store.list_audit_logs(audit_filter()).await.expect("all");
    assert!(everything.next_cursor.is_none());
    assert_eq!(
        ids(everything),
        vec![system.id, lookalike.id, logout.id, update.id, failed.id, login.id],
        "newest first"
    );

    let by_actor = AuditLogFilter { actor_id: Some(ann.id), ..audit_filter() };
    assert_eq!(
        ids(store.list_audit_logs(by_actor).await.expect("actor")),
        vec![logout.id, update.id, login.id]
    );

    let exact = AuditLogFilter {
        action: Some(AuditActionFilter::Exact("auth.login".to_owned())),
        ..audit_filter()
    };
    assert_eq!(ids(store.list_audit_logs(exact).await.expect("exact")), vec![failed.id, login.id]);

    let prefix = AuditLogFilter {
        action: Some(AuditActionFilter::Prefix("auth.".to_owned())),
        ..audit_filter()
    };
    assert_eq!(
        ids(store.list_audit_logs(prefix).await.expect("prefix")),
        vec![logout.id, failed.id, login.id],
        "auth. does not match authentication.probe"
    );
    let wildcard_prefix = AuditLogFilter {
        action: Some(AuditActionFilter::Prefix("auth%".to_owned())),
        ..audit_filter()
    };
    assert!(store.list_audit_logs(wildcard_prefix).await.expect("literal").items.is_empty());

    let by_type = AuditLogFilter { resource_type: Some("agent".to_owned()), ..audit_filter() };
    assert_eq!(
        ids(store.list_audit_logs(by_type).await.expect("type")),
        vec![system.id, update.id]
    );
    let by_resource = AuditLogFilter {
        resource_type: Some("agent".to_owned()),
        resource_id: Some("agent-1".to_owned()),
        ..audit_filter()
    };
    assert_eq!(ids(store.list_audit_logs(by_resource).await.expect("resource")), vec![update.id]);

    let from = AuditLogFilter { from: Some(failed.created_at), ..audit_filter() };
    let from_ids = ids(store.list_audit_logs(from).await.expect("from"));
    assert_eq!(from_ids.len(), 5, "from is inclusive");
    assert!(!from_ids.contains(&login.id));
    let until = AuditLogFilter { to: Some(failed.created_at), ..audit_filter() };
    assert_eq!(
        ids(store.list_audit_logs(until).await.expect("to")),
        vec![login.id],
        "to is exclusive"
    );
    let window = AuditLogFilter {
        from: Some(between),
        to: Some(logout.created_at),
        actor_id: Some(ann.id),
        ..audit_filter()
    };
    assert_eq!(ids(store.list_audit_logs(window).await.expect("window")), vec![update.id]);
}

async fn audit_batch_append(store: Arc<dyn Store>) {
    let ann = create_user(&store, "ann@example.com", "Ann").await;
    assert!(store.append_audit_logs(&[]).await.expect("nothing").is_empty());

    let entries: Vec<NewAuditLog> = ["agent.create", "agent.update", "agent.delete"]
        .into_iter()
        .map(|action| {
            let mut entry = audit_entry(Some(ann.id), action, "agent", "agent-1");
            entry.changes = Some(json!({ "action": action }));
            entry
        })
        .collect();
    let appended = store.append_audit_logs(&entries).await.expect("batch");
    let mut by_id: Vec<(Uuid, String, Option<serde_json::Value>)> =
        appended.iter().map(|row| (row.id, row.action.clone(), row.changes.clone())).collect();
    by_id.sort_by_key(|(id, _, _)| *id);
    let expected: Vec<(Uuid, String, Option<serde_json::Value>)> = entries
        .iter()
        .map(|entry| (entry.id, entry.action.clone(), entry.changes.clone()))
        .collect();
    assert_eq!(by_id, expected, "each entry once, with its own id and fields");
    assert!(
        appended.iter().all(|row| row.created_at == appended[0].created_at),
        "one statement, one time"
    );
    let listed: Vec<Uuid> = store
        .list_audit_logs(audit_filter())
        .await
        .expect("list")
        .items
        .iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(
        listed,
        entries.iter().rev().map(|entry| entry.id).collect::<Vec<_>>(),
        "newest first"
    );

    // One bad entry fails the statement: nothing of the batch is written.
    let good = audit_entry(Some(ann.id), "agent.create", "agent", "agent-2");
    let ghost = audit_entry(Some(Uuid::now_v7()), "agent.create", "agent", "agent-3");
    let refused = store.append_audit_logs(&[good, ghost]).await;
    assert!(matches!(refused, Err(StoreError::ReferenceViolated(_))), "{refused:?}");
    assert_eq!(store.list_audit_logs(audit_filter()).await.expect("list").items.len(), 3);
}

async fn audit_cursor_paging(store: Arc<dyn Store>) {
    let ann = create_user(&store, "ann@example.com", "Ann").await;
    let mut appended = Vec::new();
    for index in 0..23 {
        let action = if index % 2 == 0 { "workflow.run" } else { "auth.refresh" };
        let entry = store
            .append_audit_log(audit_entry(Some(ann.id), action, "workflow", &index.to_string()))
            .await
            .expect("append");
        appended.push(entry);
    }
    let mut newest_first = appended.clone();
    newest_first.sort_by_key(|entry| std::cmp::Reverse((entry.created_at, entry.id)));

    let mut seen = Vec::new();
    let mut cursor = None;
    let mut page_sizes = Vec::new();
    loop {
        let page = store
            .list_audit_logs(AuditLogFilter {
                cursor: cursor.clone(),
                limit: 10,
                ..AuditLogFilter::default()
            })
            .await
            .expect("page");
        page_sizes.push(page.items.len());
        seen.extend(page.items.iter().map(|entry| entry.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(page_sizes, vec![10, 10, 3]);
    assert_eq!(
        seen,
        newest_first.iter().map(|entry| entry.id).collect::<Vec<_>>(),
        "no gap, no duplicate, in order"
    );
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 23);

    // An exactly full last page has no next cursor.
    let filtered = |cursor| AuditLogFilter {
        action: Some(AuditActionFilter::Exact("auth.refresh".to_owned())),
        cursor,
        limit: 11,
        ..AuditLogFilter::default()
    };
    let only_page = store.list_audit_logs(filtered(None)).await.expect("refreshes");
    assert_eq!(only_page.items.len(), 11);
    assert!(only_page.next_cursor.is_none());

    // Cursor and filter combine; entries appended after the first page do not shift the next.
    let first =
        store.list_audit_logs(AuditLogFilter { limit: 5, ..filtered(None) }).await.expect("first");
    store
        .append_audit_log(audit_entry(Some(ann.id), "auth.refresh", "workflow", "late"))
        .await
        .expect("late");
    let second = store
        .list_audit_logs(AuditLogFilter { limit: 5, ..filtered(first.next_cursor.clone()) })
        .await
        .expect("second");
    let expected_refreshes: Vec<_> = newest_first
        .iter()
        .filter(|entry| entry.action == "auth.refresh")
        .map(|entry| entry.id)
        .collect();
    let first_ids: Vec<_> = first.items.iter().map(|entry| entry.id).collect();
    let second_ids: Vec<_> = second.items.iter().map(|entry| entry.id).collect();
    assert_eq!(first_ids, expected_refreshes[..5]);
    assert_eq!(second_ids, expected_refreshes[5..10]);

    let tampered = store
        .list_audit_logs(AuditLogFilter {
            cursor: Some("not a cursor!".to_owned()),
            ..AuditLogFilter::default()
        })
        .await;
    assert!(matches!(tampered, Err(StoreError::InvalidCursor)), "{tampered:?}");
}

crate::conformance!(
    user_create_get_and_lookups,
    user_first_user_becomes_admin,
    user_first_admin_counts_only_live_users,
    user_profile_role_password_and_login,
    user_list_filter_sort_search_paginate,
    user_soft_delete,
    session_create_revoke_and_poll,
    refresh_rotation_and_reuse,
    session_found_by_refresh_token,
    refresh_rotation_rejects_expired_and_revoked,
    refresh_concurrent_double_rotation,
    session_purge_expired_rows,
    password_reset_is_single_use_and_atomic,
    api_key_lifecycle_and_scoping,
    audit_append_and_filter,
    audit_batch_append,
    audit_cursor_paging,
);

/// On PostgreSQL a batch statement's text does not depend on its number of rows: every
/// connection prepares the audit trail's `INSERT` once, whatever the batch sizes it meets
/// (with one `VALUES` row per entry it prepared, and kept, one statement per size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_audit_batches_share_one_prepared_statement() {
    use turbocat::store::IdentityStore as _;
    let database = crate::support::postgres().await;
    // One connection, so every statement below is prepared on the connection asked last.
    let store =
        turbocat::store::PostgresStore::connect(&database.url, 1).await.expect("connect store");
    let ann = store.create_user(NewUser::new("ann@example.com", "Ann")).await.expect("user");
    let mut appended = 0;
    for size in 1..=6 {
        let entries: Vec<NewAuditLog> = (0..size)
            .map(|index| audit_entry(Some(ann.id), "agent.create", "agent", &format!("a-{index}")))
            .collect();
        appended += store.append_audit_logs(&entries).await.expect("batch").len();
    }
    assert_eq!(appended, 21);
    let prepared: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'INSERT INTO audit_logs%'",
    )
    .fetch_one(store.connections())
    .await
    .expect("prepared statements");
    assert_eq!(prepared, 1, "one prepared INSERT for batches of 1 to 6 rows");
}
