//! The runners a caller can see: the shared ones and their own (an admin sees every runner),
//! attached to this replica or (in `serve`) to any other.
//! May call: the engine (`Engine::runners_of_every_replica`).

use super::validate::{Validator, page_request};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller};
use crate::error::ServiceResult;
use crate::proto::v1 as pb;

/// Runners attached to any replica, oldest connection first, paged. This replica's own are
/// current; the others' are at most a couple of seconds old.
pub async fn list_runners(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListRunnersRequest,
) -> ServiceResult<pb::ListRunnersResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let caller_id = caller.user_id.to_string();
    let mut visible: Vec<pb::Runner> = context
        .engine
        .runners_of_every_replica()
        .await
        .into_iter()
        .filter(|runner| {
            runner.owner_id.is_empty() || caller.is_admin() || runner.owner_id == caller_id
        })
        .collect();
    visible.sort_by(|left, right| {
        let key = |runner: &pb::Runner| {
            runner.connected_at.map(|time| (time.seconds, time.nanos)).unwrap_or_default()
        };
        key(left).cmp(&key(right)).then_with(|| left.id.cmp(&right.id))
    });
    let total = i64::try_from(visible.len()).unwrap_or(i64::MAX);
    let start = usize::try_from(page.offset()).unwrap_or(usize::MAX);
    let runners = visible.into_iter().skip(start).take(page.page_size as usize).collect();
    Ok(pb::ListRunnersResponse {
        runners,
        pagination: Some(super::convert::pagination(page, total)),
    })
}
