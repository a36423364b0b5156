//! Stages 5 and 6: the client's lockout and its credential, then the key's policy (networks,
//! scopes) and rate limit.

use std::sync::Arc;

use http::request::Parts;

use super::Gateway;
use super::context::RequestContext;
use crate::auth::Authenticated;
use crate::error::{GatewayError, Refused};
use crate::metrics::AuthReason;
use crate::proxy::ClientInfo;
use crate::ratelimit::Allowance;

impl Gateway {
    /// A client locked out for too many failed keys is refused before its key is looked at;
    /// otherwise its key is authenticated, and a failed attempt counts against its address.
    pub(super) async fn authenticate(
        &self,
        parts: &Parts,
        client: &ClientInfo<'_>,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Authenticated, GatewayError> {
        if let Some(locked) = self.limits.ip_locked(client.client_ip) {
            return Err(Refused::RateLimited(locked).into());
        }
        match self.auth.authenticate(&parts.headers, &self.cache).await {
            Ok(authenticated) => {
                ctx.auth = Some(AuthReason::Ok);
                ctx.key = Some(Arc::clone(&authenticated.key));
                Ok(authenticated)
            }
            Err(denial) => {
                ctx.key = denial.key;
                if let GatewayError::Client(refused) = &denial.error
                    && refused.is_failed_attempt()
                    && let Some(locked) = self.limits.record_failure(client.client_ip).await
                {
                    // Locked out by this attempt: the log still says why the key failed.
                    ctx.auth = denial.error.auth_reason();
                    return Err(Refused::RateLimited(locked).into());
                }
                Err(denial.error)
            }
        }
    }

    /// A valid key's policy (networks, scopes) and its rate limit; the rate-limit state to
    /// report on the forwarded response.
    pub(super) async fn authorize(
        &self,
        parts: &Parts,
        client: &ClientInfo<'_>,
        authenticated: &Authenticated,
    ) -> Result<Option<Allowance>, Refused> {
        let key = &authenticated.key;
        key.policy
            .check(client.client_ip, &parts.method, parts.uri.path())
            .map_err(Refused::Forbidden)?;
        match self.limits.admit_key(&key.record.id, key.policy.rate).await {
            Some(Err(throttled)) => Err(Refused::RateLimited(throttled)),
            Some(Ok(allowance)) => Ok(Some(allowance)),
            None => Ok(None),
        }
    }
}
