//! The client's request body on its way to the upstream: streamed as it arrives, held to its
//! size limit and to an idle timeout between its bytes ([`RequestBody`]), and handed to hyper's
//! client saying when it has been taken whole ([`Outbound`], [`Sent`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use tokio::sync::oneshot;

use super::error::{Error, ErrorKind};
use crate::http::drain_unread;

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

/// The request body as hyper's client takes it: the client's body (or none), its trailers
/// dropped, saying when it has been taken whole.
#[derive(Debug)]
pub struct Outbound {
    body: Option<RequestBody>,
    sent: Option<oneshot::Sender<()>>,
}

impl Outbound {
    /// `body` (`None`: the request has none), and what hears when it has been taken whole (at
    /// once for none).
    pub fn new(body: Option<RequestBody>) -> (Self, Sent) {
        let (tx, rx) = oneshot::channel();
        let mut outbound = Self {
            body,
            sent: Some(tx),
        };
        if outbound.body.is_none() {
            outbound.taken();
        }
        (
            outbound,
            Sent {
                rx: Some(rx),
                done: false,
            },
        )
    }

    fn taken(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

/// Whether a request's body has been taken whole.
#[derive(Debug)]
pub struct Sent {
    /// `None` once it has answered (a receiver must not be polled again after that).
    rx: Option<oneshot::Receiver<()>>,
    done: bool,
}

impl Sent {
    /// Waits until the body has been taken whole, or dropped unfinished.
    pub async fn wait(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            self.done = rx.await.is_ok();
            self.rx = None;
        }
    }

    /// Whether the body has been taken whole.
    pub fn done(&mut self) -> bool {
        if let Some(rx) = self.rx.as_mut() {
            match rx.try_recv() {
                Ok(()) => self.done = true,
                Err(oneshot::error::TryRecvError::Empty) => return false,
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
            self.rx = None;
        }
        self.done
    }
}

impl Drop for Outbound {
    /// What the client still sends of a body hyper stopped taking (the upstream closed the
    /// connection, or its exchange failed) is read and dropped, so the client gets its answer
    /// whole.
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            drain_unread(body);
        }
    }
}

impl Body for Outbound {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(body) = this.body.as_mut() else {
                this.taken();
                return Poll::Ready(None);
            };
            match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => this.body = None,
                // Trailers of a chunked request are not passed on.
                Some(Ok(frame)) if !frame.is_data() => {}
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => {
                    // hyper asks no further of a body that says it has ended.
                    if body.is_end_stream() {
                        this.body = None;
                        this.taken();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sent_answers_again_after_its_body_was_dropped_or_taken() {
        // Dropped unfinished: waited on (by the response's wait), then asked and waited on
        // again (by the end of the response body).
        let (tx, rx) = oneshot::channel();
        let mut sent = Sent {
            rx: Some(rx),
            done: false,
        };
        drop(tx);
        sent.wait().await;
        assert!(!sent.done());
        sent.wait().await;
        assert!(!sent.done());

        // Taken whole: no body at all.
        let (_outbound, mut sent) = Outbound::new(None);
        sent.wait().await;
        sent.wait().await;
        assert!(sent.done());
        let (_outbound, mut sent) = Outbound::new(None);
        assert!(sent.done());
        sent.wait().await;
        assert!(sent.done());
    }
}
