//! The change feed as Redis keeps it: read from a position (the change counter, the stream and
//! the identity marker in one round trip) and judged against what the gateway has seen of the
//! store ([`Seen`]), and the subscription to the change channel that signals a change at once.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{Client, ErrorKind, RedisError, RedisResult};
use tokio::sync::Notify;

use super::client::client_for;
use super::scripts::marker_id;
use super::sentinel::Failover;
use super::{RedisStore, Target};
use crate::key::KeyDigest;
use crate::logging::Throttle;
use crate::store::{Changes, Identity, StoreError};

/// One change-stream entry as XRANGE returns it: id and field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// What the gateway reading the change feed has seen of the store's identity.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) marker: Option<Identity>,
    /// Why the store is lost, until a new marker (or generation) is adopted.
    lost: Option<String>,
    /// The Sentinel primary's generation at the last read of the feed (0: not Sentinel).
    primary: u64,
}

/// The marker from `HMGET id generation`, if there is one.
pub(super) fn parse_marker(fields: &[Option<String>]) -> Option<Identity> {
    match fields {
        [Some(id), generation] => Some(Identity {
            id: id.clone(),
            generation: generation
                .as_deref()
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
        }),
        _ => None,
    }
}

/// Where [`RedisStore::subscribe_loop`] connects.
pub(super) enum Subscription {
    /// One of these nodes, the next after each failure.
    Nodes(Vec<Client>),
    /// The current Sentinel primary.
    Primary(Weak<Failover>),
}

impl RedisStore {
    /// Where the change feed starts: the change counter now, with the identity marker (written
    /// first if changes were made without one) adopted as what the store is trusted as
    /// ([`KeyStore::change_position`](crate::store::KeyStore::change_position)).
    pub(super) async fn read_position(&self) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.named("seq"));
        pipe.cmd("HMGET")
            .arg(self.named("store"))
            .arg("id")
            .arg("generation");
        let (seq, marker): (Option<u64>, Vec<Option<String>>) = self.pipe(&pipe).await?;
        let seq = seq.unwrap_or(0);
        let mut marker = parse_marker(&marker);
        if marker.is_none() && seq > 0 {
            // Changes without a marker: written by a keygate that wrote none.
            let fields: Vec<Option<String>> = self
                .invoke(
                    self.scripts
                        .init
                        .key(self.named("store"))
                        .key(self.named("seq"))
                        .arg(marker_id()?),
                )
                .await?;
            marker = parse_marker(&fields);
        }
        if let Ok(mut seen) = self.seen.lock() {
            // The feed starts here: whatever the store holds now is what it is trusted as.
            *seen = Seen {
                marker,
                lost: None,
                primary: self.primary_generation(),
            };
        }
        Ok(seq)
    }

    /// The changes after position `since`, or what the feed must report instead
    /// ([`KeyStore::changes_since`](crate::store::KeyStore::changes_since)).
    pub(super) async fn read_changes(&self, since: u64) -> Result<Changes, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.named("seq"));
        pipe.cmd("XRANGE")
            .arg(self.named("changes"))
            .arg(format!("{}-0", since.saturating_add(1)))
            .arg("+");
        pipe.cmd("HMGET")
            .arg(self.named("store"))
            .arg("id")
            .arg("generation");
        let primary = self.primary_generation();
        let (seq, entries, marker): (Option<u64>, Vec<StreamEntry>, Vec<Option<String>>) =
            self.pipe(&pipe).await?;
        let current = seq.unwrap_or(0);
        if let Some(verdict) = self.judge(parse_marker(&marker), current, since, primary) {
            return Ok(verdict);
        }
        if current < since {
            // The data was replaced (FLUSHALL, a fresh server): nothing cached can be trusted.
            return Ok(Changes::Gap { next: current });
        }
        if current == since {
            return Ok(Changes::Digests {
                digests: Vec::new(),
                next: since,
            });
        }
        let first = entries
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok());
        if first != Some(since + 1) {
            // The stream was trimmed past our position.
            return Ok(Changes::Gap { next: current });
        }
        let mut next = since;
        let mut digests = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            if let Some(seq) = id.split('-').next().and_then(|s| s.parse::<u64>().ok()) {
                next = next.max(seq);
            }
            digests.extend(
                fields
                    .iter()
                    .filter(|(f, _)| f == "d")
                    .filter_map(|(_, v)| KeyDigest::from_hex(v)),
            );
        }
        Ok(Changes::Digests { digests, next })
    }

    /// Where the change subscription connects.
    pub(super) fn subscription(&self) -> Result<Subscription, StoreError> {
        let tls = &self.settings.tls;
        match (&self.settings.target, &self.failover) {
            (Target::Single(url), _) => Ok(Subscription::Nodes(vec![
                client_for(tls, url).map_err(|e| self.error(e))?,
            ])),
            (Target::Cluster(nodes), _) => Ok(Subscription::Nodes(
                nodes
                    .iter()
                    .map(|n| client_for(tls, n).map_err(|e| self.error(e)))
                    .collect::<Result<_, _>>()?,
            )),
            (Target::Sentinel { .. }, Some(failover)) => {
                Ok(Subscription::Primary(Arc::downgrade(failover)))
            }
            (Target::Sentinel { .. }, None) => Err(StoreError::Unavailable(
                "Sentinel settings missing".to_owned(),
            )),
        }
    }

    /// Keeps a subscription to the change channel, raising `signal` on every message and after
    /// every (re)subscription (events may have been missed meanwhile), until `signal` is
    /// dropped. A cluster's subscription moves to the next seed node when one fails (PUBLISH
    /// reaches every node); a Sentinel group's follows the primary.
    pub(super) async fn subscribe_loop(
        subscription: Subscription,
        channel: String,
        timeout: Duration,
        signal: Weak<Notify>,
    ) {
        static LOST: Throttle = Throttle::new(Duration::from_secs(30));
        let mut backoff = Duration::from_millis(100);
        let mut at = 0usize;
        loop {
            let result: RedisResult<()> = async {
                let (client, mut moved) = match &subscription {
                    Subscription::Nodes(clients) => {
                        let Some(client) = clients.get(at % clients.len().max(1)) else {
                            return Ok(());
                        };
                        (client.clone(), None)
                    }
                    Subscription::Primary(failover) => {
                        let Some(failover) = failover.upgrade() else {
                            return Ok(());
                        };
                        let mut moved = failover.moved.subscribe();
                        moved.mark_unchanged();
                        (failover.primary().await?.client.clone(), Some(moved))
                    }
                };
                let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| RedisError::from((ErrorKind::Io, "no answer")))??;
                pubsub.subscribe(&channel).await?;
                backoff = Duration::from_millis(100);
                LOST.reset();
                // (Re)subscribed: events may have been missed meanwhile, so catch up now.
                match signal.upgrade() {
                    Some(s) => s.notify_one(),
                    None => return Ok(()),
                }
                let mut messages = pubsub.on_message();
                loop {
                    let moved_on = async {
                        match moved.as_mut() {
                            Some(m) => m.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        msg = futures_util::StreamExt::next(&mut messages) => {
                            if msg.is_none() {
                                break;
                            }
                            match signal.upgrade() {
                                Some(s) => s.notify_one(),
                                None => return Ok(()),
                            }
                        }
                        still = moved_on => {
                            if !still {
                                return Ok(());
                            }
                            // The primary moved: subscribe there.
                            return Err(RedisError::from((ErrorKind::Io, "the primary moved")));
                        }
                    }
                }
                Err(RedisError::from((ErrorKind::Io, "subscription closed")))
            }
            .await;
            if signal.strong_count() == 0 {
                return;
            }
            match result {
                Ok(()) => return,
                Err(e) if e.to_string().contains("the primary moved") => continue,
                Err(e) => {
                    at += 1;
                    if let Some(suppressed) = LOST.allow() {
                        tracing::warn!(error = %e, suppressed, "change subscription lost; resubscribing (polling continues)");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// The Sentinel primary's generation (0: not Sentinel, or none found yet).
    fn primary_generation(&self) -> u64 {
        self.failover
            .as_ref()
            .and_then(|f| f.current.load().as_ref().map(|p| p.generation))
            .unwrap_or(0)
    }

    /// The marker and the change counter, as the change feed reads them from position `since`:
    /// what the feed must report instead of changes, if anything (the store is lost, or a new
    /// marker is adopted: a gap).
    ///
    /// `primary` is the Sentinel primary's generation when the feed was read: a counter that
    /// went back across a failover is the new primary missing changes written to the old one
    /// after its replica was promoted. With confirmed writes those were never confirmed (the CLI
    /// said so), so the store is read as it is (a gap), not reported lost.
    fn judge(
        &self,
        marker: Option<Identity>,
        current: u64,
        since: u64,
        primary: u64,
    ) -> Option<Changes> {
        let Ok(mut seen) = self.seen.lock() else {
            return None;
        };
        let failed_over = std::mem::replace(&mut seen.primary, primary) != primary;
        match (&seen.marker, marker) {
            (Some(_), None) => {
                let reason = format!(
                    "the store's identity marker {} is gone: {} lost its data (restarted without \
                     persistence, flushed, or replaced by an empty server); unknown keys get 503 \
                     until the data is restored (`keygate keys import`) or accepted \
                     (`keygate store accept`)",
                    self.named("store"),
                    self.display
                );
                seen.lost = Some(reason.clone());
                Some(Changes::Lost { reason })
            }
            (Some(known), Some(m)) if *known != m => {
                tracing::warn!(
                    old_id = %known.id,
                    old_generation = known.generation,
                    id = %m.id,
                    generation = m.generation,
                    "the store's identity marker changed: adopting the store as it is now"
                );
                seen.marker = Some(m);
                seen.lost = None;
                Some(Changes::Gap { next: current })
            }
            (Some(_), Some(_)) => {
                if let Some(reason) = &seen.lost {
                    return Some(Changes::Lost {
                        reason: reason.clone(),
                    });
                }
                if current < since && failed_over && self.settings.confirm_replicas > 0 {
                    tracing::warn!(
                        from = since,
                        to = current,
                        "the new Redis primary misses the last changes made on the old one \
                         (written after its replica was promoted, and never confirmed): dropping \
                         every cached key decision"
                    );
                    return Some(Changes::Gap { next: current });
                }
                if current < since {
                    let reason = format!(
                        "the change counter {} went back from {since} to {current}: {} was \
                         rolled back (restored from an older copy, or failed over to a replica \
                         that missed changes); unknown keys get 503 until the data is checked \
                         and accepted (`keygate store accept`)",
                        self.named("seq"),
                        self.display
                    );
                    seen.lost = Some(reason.clone());
                    return Some(Changes::Lost { reason });
                }
                None
            }
            (None, m) => {
                // The store's first change (or the first read of it): from now on, a vanishing
                // marker means lost data.
                seen.marker = m;
                None
            }
        }
    }
}
