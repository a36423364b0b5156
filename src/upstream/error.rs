//! How a forward fails, tagged where it arose when it arose (as pingora's errors are), so no
//! caller has to recover that from a chain of causes.

use std::fmt;

/// Which side of the forward an error arose on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: its request body broke off, stalled or went past its limit.
    Client,
    /// The upstream: connecting, writing the request, or reading the response failed.
    Upstream,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection to the upstream could be opened (refused, unreachable, timed out).
    Connect,
    /// The upstream sent no response head within `upstream.response_timeout` of the request's
    /// end.
    Timeout,
    /// The upstream broke HTTP/1.1, or its connection failed or closed mid-exchange.
    Protocol,
    /// The client's body went past its limit (`server.max_body_bytes`).
    BodyTooLarge,
    /// The client sent none of its body for `server.body_read_timeout`.
    BodyTimeout,
    /// The client's body broke off or was malformed.
    BodyBroken,
}

impl ErrorKind {
    /// The side this kind of failure arises on.
    pub fn side(self) -> Side {
        match self {
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Protocol => Side::Upstream,
            ErrorKind::BodyTooLarge | ErrorKind::BodyTimeout | ErrorKind::BodyBroken => {
                Side::Client
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Connect => "cannot connect to the upstream",
            ErrorKind::Timeout => "the upstream did not respond in time",
            ErrorKind::Protocol => "upstream exchange failed",
            ErrorKind::BodyTooLarge => "request body exceeds server.max_body_bytes",
            ErrorKind::BodyTimeout => "the client stopped sending its request body",
            ErrorKind::BodyBroken => "the client's request body broke off",
        }
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A failed forward: what failed, whether the request may be sent again (nothing of it reached
/// the upstream), and why.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    retry: bool,
    cause: Option<Cause>,
}

impl Error {
    /// A failure of `kind`, caused by `cause`; not to be retried.
    pub fn new(kind: ErrorKind, cause: impl Into<Cause>) -> Self {
        Self {
            kind,
            retry: false,
            cause: Some(cause.into()),
        }
    }

    /// A failure of `kind` with nothing more to say.
    pub fn bare(kind: ErrorKind) -> Self {
        Self {
            kind,
            retry: false,
            cause: None,
        }
    }

    /// The same failure, marked as one after which the request may be sent again: none of it
    /// was taken by the upstream.
    pub(crate) fn retryable(mut self) -> Self {
        self.retry = true;
        self
    }

    /// What failed.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Which side it arose on.
    pub fn side(&self) -> Side {
        self.kind.side()
    }

    /// Whether the request may be sent again.
    pub fn may_retry(&self) -> bool {
        self.retry
    }
}

impl fmt::Display for Error {
    /// The kind, then each cause once (`a: b: c`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        let mut next: Option<&(dyn std::error::Error + 'static)> = match &self.cause {
            Some(cause) => Some(cause.as_ref()),
            None => None,
        };
        let mut last = String::new();
        while let Some(e) = next {
            let text = e.to_string();
            // An error that prints its source as part of its own message (io::Error wrapping
            // one, for example) would otherwise show it twice.
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            next = e.source();
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connect to 127.0.0.1:1")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = Error::new(ErrorKind::Connect, Connect(refused));
        assert_eq!(
            e.to_string(),
            "cannot connect to the upstream: connect to 127.0.0.1:1: connection refused"
        );
        // An io::Error made from another error prints that error as its own message.
        let wrapped =
            std::io::Error::other(Connect(std::io::Error::from(std::io::ErrorKind::TimedOut)));
        let e = Error::new(ErrorKind::Protocol, wrapped);
        assert_eq!(
            e.to_string(),
            "upstream exchange failed: connect to 127.0.0.1:1: timed out"
        );
        assert_eq!(
            Error::bare(ErrorKind::BodyTimeout).to_string(),
            "the client stopped sending its request body"
        );
    }

    #[test]
    fn kinds_know_their_side() {
        assert_eq!(ErrorKind::Connect.side(), Side::Upstream);
        assert_eq!(ErrorKind::BodyTooLarge.side(), Side::Client);
        let e = Error::bare(ErrorKind::Protocol).retryable();
        assert!(e.may_retry());
        assert!(!Error::bare(ErrorKind::Protocol).may_retry());
    }
}
