//! The client's request body on its way to the upstream: streamed as it arrives, held to its
//! size limit and to an idle timeout between its bytes.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::error::{Error, ErrorKind};

/// A client's request body, as the upstream connection takes it.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    /// At most this many bytes (`server.max_body_bytes`), for bodies without (or lying
    /// about) a length.
    limit: Option<u64>,
    seen: u64,
    /// The longest the client may leave the body waiting (`server.body_read_timeout`).
    idle: Duration,
    /// Armed the first time the body has nothing ready, moved on when it had something since.
    timer: Option<Pin<Box<Sleep>>>,
    moved: bool,
}

impl RequestBody {
    /// `inner`, at most `limit` bytes of it, none of it left waiting for longer than `idle`.
    pub fn new(inner: Incoming, limit: Option<u64>, idle: Duration) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            idle,
            timer: None,
            moved: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.moved = true;
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.limit.is_some_and(|max| this.seen > max) {
                        // The upstream sees an aborted request, never a clean end of a cut body.
                        return Poll::Ready(Some(Err(Error::bare(ErrorKind::BodyTooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(Error::new(ErrorKind::BodyBroken, e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = Instant::now() + this.idle;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if this.moved {
                            timer.as_mut().reset(deadline);
                        }
                        timer
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.moved = false;
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Error::bare(ErrorKind::BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
