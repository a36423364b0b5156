//! Stage 7: the request goes upstream with its headers rewritten (forwarding headers, the
//! credential removed, the identity added and, when configured, signed), its body streamed.

use std::time::Instant;

use http::Response;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use hyper::body::Incoming;

use super::context::RequestContext;
use super::{Forward, Gateway, GatewayBody};
use crate::auth::CredentialSource;
use crate::error::{GatewayError, RATELIMIT, RATELIMIT_POLICY, Refused};
use crate::http::strip_hop_by_hop;
use crate::metrics::{Outcome, UpstreamErrorKind};
use crate::proxy::ClientInfo;
use crate::upstream::{self, ErrorKind, RequestBody};

impl Gateway {
    /// Sends the request upstream and returns its response, streaming; a failure says whose it
    /// was (the client's body, or the upstream), with its cause kept for the log.
    pub(super) async fn forward(
        &self,
        parts: &Parts,
        body: Incoming,
        client: &ClientInfo<'_>,
        forward: Forward,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        let upstream = &self.upstreams[ctx.conn.worker % self.upstreams.len()];
        let mut edits = crate::proxy::edits(
            &parts.headers,
            &parts.uri,
            client,
            upstream.host_header(),
            self.preserve_host,
        );
        // Client-sent identity headers are never trusted, whatever the auth outcome: dropped,
        // and replaced when a key authenticated the request.
        edits.drop(&self.id_header);
        edits.drop(&self.name_header);
        edits.drop(&self.owner_header);
        edits.drop(&self.signature_header);
        if let Some(a) = &forward.key {
            if !self.forward_credentials {
                edits.drop(self.auth.key_header());
                if a.source == CredentialSource::Bearer {
                    edits.drop(&crate::proxy::AUTHORIZATION);
                }
            }
            edits.add(self.id_header.clone(), a.key.id_header.clone());
            edits.add(self.name_header.clone(), a.key.name_header.clone());
            if let Some(owner) = &a.key.owner_header {
                edits.add(self.owner_header.clone(), owner.clone());
            }
        }
        if let Some(signer) = &self.signer {
            let key = forward.key.as_ref().map_or(crate::identity::NO_KEY, |a| {
                let owner = a.key.owner_header.as_ref();
                [
                    a.key.id_header.as_bytes(),
                    a.key.name_header.as_bytes(),
                    owner.map_or(&b""[..], HeaderValue::as_bytes),
                ]
            });
            let signature = signer.sign(&parts.method, &parts.uri, ctx.request_id.as_bytes(), key);
            edits.add(self.signature_header.clone(), signature);
        }
        let sent = Instant::now();
        let request = upstream::Request {
            method: &parts.method,
            uri: &parts.uri,
            host: edits.host(),
            headers: &parts.headers,
            keep: |name: &HeaderName| edits.keeps(name),
            added: edits.added(),
            body: RequestBody::new(body, forward.body_limit, self.body_read_timeout),
        };
        match upstream.send(request).await {
            Ok(mut response) => {
                self.metrics
                    .upstream_duration
                    .record(sent.elapsed().as_secs_f64());
                let headers = response.headers_mut();
                strip_hop_by_hop(headers);
                if let Some(allowance) = forward.allowance {
                    headers.insert(RATELIMIT_POLICY, allowance.policy);
                    headers.insert(RATELIMIT, allowance.state);
                }
                ctx.outcome = Outcome::Forwarded;
                Ok(response.map(GatewayBody::Upstream))
            }
            Err(e) => {
                ctx.cause = Some(e.to_string());
                let upstream = |kind| GatewayError::Upstream {
                    kind,
                    retry: e.may_retry(),
                };
                Err(match e.kind() {
                    ErrorKind::Connect => upstream(UpstreamErrorKind::Connect),
                    ErrorKind::Timeout => upstream(UpstreamErrorKind::Timeout),
                    ErrorKind::Protocol => upstream(UpstreamErrorKind::Protocol),
                    ErrorKind::BodyTooLarge => Refused::PayloadTooLarge.into(),
                    ErrorKind::BodyTimeout => Refused::BodyTimeout.into(),
                    ErrorKind::BodyBroken => Refused::BadRequestBody.into(),
                })
            }
        }
    }
}
