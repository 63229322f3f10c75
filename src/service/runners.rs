//! The runners a caller can see: the shared ones and their own (an admin sees every runner).
//! May call: the engine's registry of attached runners.

use super::validate::{Validator, page_request};
use crate::api::AppContext;
use crate::auth::caller::{Access, Caller};
use crate::engine::runners::RunnerOwner;
use crate::error::ServiceResult;
use crate::proto::v1 as pb;

/// Runners attached to this server, oldest connection first, paged.
pub fn list_runners(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListRunnersRequest,
) -> ServiceResult<pb::ListRunnersResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let visible: Vec<pb::Runner> = context
        .engine
        .runners
        .all()
        .iter()
        .filter(|runner| match runner.owner {
            RunnerOwner::Shared => true,
            RunnerOwner::User(owner_id) => caller.is_admin() || owner_id == caller.user_id,
        })
        .map(|runner| runner.to_proto())
        .collect();
    let total = i64::try_from(visible.len()).unwrap_or(i64::MAX);
    let start = usize::try_from(page.offset()).unwrap_or(usize::MAX);
    let runners = visible.into_iter().skip(start).take(page.page_size as usize).collect();
    Ok(pb::ListRunnersResponse {
        runners,
        pagination: Some(super::convert::pagination(page, total)),
    })
}
