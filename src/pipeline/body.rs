//! The gateway's response body: a small body of its own (errors, health, redirects), or the
//! upstream's, streamed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::upstream;

/// The gateway's response body.
#[derive(Debug)]
pub enum GatewayBody {
    /// A complete body made by the gateway.
    Full(Option<Bytes>),
    /// The upstream's response body, streamed.
    Upstream(upstream::ResponseBody),
}

impl GatewayBody {
    /// An empty body.
    pub fn empty() -> Self {
        GatewayBody::Full(None)
    }

    /// A complete body.
    pub fn full(bytes: Bytes) -> Self {
        GatewayBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = upstream::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, upstream::Error>>> {
        match self.get_mut() {
            GatewayBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            GatewayBody::Upstream(incoming) => Pin::new(incoming).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(bytes) => bytes.is_none(),
            GatewayBody::Upstream(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            GatewayBody::Upstream(incoming) => incoming.size_hint(),
        }
    }
}

/// Makes a gateway-made response an answer to HEAD: its headers as they are, with the length
/// its body would have had, and no body. HTTP/2 has no framing that drops a body for HEAD (a DATA
/// frame there is an error), so none is ever made. A response streamed from the upstream is left
/// alone (the upstream client reads no body after HEAD).
pub(super) fn head_only(response: &mut Response<GatewayBody>) {
    if let GatewayBody::Full(full) = response.body_mut()
        && let Some(bytes) = full.take()
    {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
}
