//! The OpenAPI 3.1 document of the control API, generated from the
//! handlers' `#[utoipa::path]` annotations and the types' `ToSchema`
//! derives, served at `/api/v1/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{disks, jobs, mounts, policy, tokens};

/// The document (module doc).
#[derive(OpenApi)]
#[openapi(
    info(title = "novabackup agent API", description = "Disks, change tracking, mounts, backups, snapshots, restores, jobs, tokens, retention, garbage collection, schedules, quotas."),
    paths(
        crate::routes::health,
        disks::list, disks::attach, disks::get, disks::detach, disks::cbt, disks::cbt_reset,
        jobs::backup, jobs::restore, jobs::verify_many, jobs::verify_one, jobs::snapshots,
        jobs::snapshot, jobs::partitions, jobs::files, jobs::files_tar, jobs::delete_snapshot, jobs::jobs, jobs::job, jobs::cancel, jobs::resume, jobs::events,
        jobs::metrics, jobs::store_info,
        mounts::list, mounts::mount, mounts::unmount, mounts::promote,
        tokens::list, tokens::create, tokens::revoke,
        policy::protect, policy::unprotect, policy::policies, policy::policy,
        policy::create_policy, policy::update_policy, policy::delete_policy, policy::prune,
        policy::gc, policy::sync, policy::schedules, policy::schedule, policy::create_schedule,
        policy::update_schedule, policy::delete_schedule, policy::quotas, policy::set_quotas,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ApiError, crate::error::ErrorCode)),
    modifiers(&Bearer),
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
