//! The store's connection ([`Conn`]: one of any kind, each reconnecting on its own) and its
//! round trips: each bounded by the store timeout, a read retried once on a broken connection,
//! and a Redis error turned into what a caller can do about it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};

use super::client::{
    Clustered, Managed, certificates, client_for, is_denied, is_read_only, is_unauthenticated,
    manager_config,
};
use super::sentinel::Failover;
use super::{RedisStore, Target};
use crate::store::StoreError;

/// One connection of any kind; all reconnect on their own.
#[derive(Clone)]
pub(super) enum Conn {
    Single(Managed),
    Cluster(Clustered),
    Sentinel(Arc<Failover>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(f) => Box::pin(f.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(f) => Box::pin(f.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(f) => f.db,
        }
    }
}

impl RedisStore {
    async fn connect(&self) -> Result<Conn, StoreError> {
        match &self.settings.target {
            Target::Single(url) => {
                let client = client_for(&self.settings.tls, url).map_err(|e| self.error(e))?;
                let manager = Managed::new(
                    client,
                    manager_config(self.timeout, self.settings.confirm_timeout),
                )
                .map_err(|e| self.error(e))?;
                Ok(Conn::Single(manager))
            }
            Target::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout + self.settings.confirm_timeout)
                    .retries(2);
                if let Some(certs) = certificates(&self.settings.tls) {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(|e| self.error(e))?;
                let conn = tokio::time::timeout(self.timeout, client.get_async_connection())
                    .await
                    .map_err(|_| self.no_answer(Duration::ZERO))?
                    .map_err(|e| self.error(e))?;
                let seeds = nodes
                    .iter()
                    .map(|node| client_for(&self.settings.tls, node))
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.error(e))?;
                Ok(Conn::Cluster(Clustered::new(conn, seeds, self.timeout)))
            }
            Target::Sentinel { .. } => {
                let failover = self.failover.as_ref().ok_or_else(|| {
                    StoreError::Unavailable("Sentinel settings missing".to_owned())
                })?;
                tokio::spawn(Failover::watch_switches(Arc::downgrade(failover)));
                Ok(Conn::Sentinel(Arc::clone(failover)))
            }
        }
    }

    pub(super) async fn conn(&self) -> Result<Conn, StoreError> {
        self.within(Duration::ZERO, self.conn.get_or_try_init(|| self.connect()))
            .await
            .cloned()
    }

    /// `fut`, or the store's "no answer" error once the store timeout (plus `extra`) has passed.
    pub(super) async fn within<T>(
        &self,
        extra: Duration,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout + extra, fut)
            .await
            .unwrap_or_else(|_| Err(self.no_answer(extra)))
    }

    fn no_answer(&self, extra: Duration) -> StoreError {
        let setting = if extra.is_zero() {
            "store.timeout"
        } else {
            "store.timeout + store.confirm_timeout"
        };
        StoreError::Unavailable(format!(
            "no answer from {} within {:?} ({setting})",
            self.display,
            self.timeout + extra
        ))
    }

    /// A Redis error as the store reports it: what a caller can do about it, in one line.
    pub(super) fn error(&self, e: RedisError) -> StoreError {
        if is_read_only(&e) {
            let fix = match self.settings.target {
                Target::Sentinel { .. } => "the sentinels have not named a new primary yet",
                _ => {
                    "point store.url at the primary, or use backend = \"redis-sentinel\" to follow it"
                }
            };
            return StoreError::ReadOnly(format!(
                "{} is a replica that takes no writes (READONLY): {fix}",
                self.display
            ));
        }
        if is_unauthenticated(&e) {
            let fix = match self.settings.target {
                Target::Sentinel { .. } => {
                    "check the sentinels' password in store.sentinels and the primary's user and password in store.url"
                }
                Target::Cluster(_) => "check the user and password in store.cluster_nodes",
                Target::Single(_) => "check the user and password in store.url",
            };
            return StoreError::Unauthenticated(format!("{} ({e}): {fix}", self.display));
        }
        if is_denied(&e) {
            return StoreError::Denied(format!(
                "{} refuses a command to keygate's Redis user ({e}); the ACL in docs/fleet.md grants what keygate needs",
                self.display
            ));
        }
        StoreError::Unavailable(format!("{}: {e}", self.display))
    }

    /// Runs a read-only command, retried once like every read ([`Self::read_retried`]).
    pub(super) async fn query<T: FromRedisValue + Send>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.read_retried(cmd).await
    }

    /// Runs a pipeline of reads, retried once like every read ([`Self::read_retried`]).
    pub(super) async fn pipe<T: FromRedisValue + Send>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        self.read_retried(pipe).await
    }

    /// Runs a read. A connection found broken (Redis restarted since the last call) is retried
    /// once on the fresh connection the manager makes.
    async fn read_retried<T: FromRedisValue + Send>(
        &self,
        read: &impl Read,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        self.within(Duration::ZERO, async {
            match read.send(&mut conn).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    read.send(&mut conn).await.map_err(|e| self.error(e))
                }
                other => other.map_err(|e| self.error(e)),
            }
        })
        .await
    }
}

/// A read [`RedisStore::read_retried`] can send a second time: a command or a pipeline.
trait Read: Sync {
    fn send<'a, T: FromRedisValue + Send + 'a>(&'a self, conn: &'a mut Conn) -> RedisFuture<'a, T>;
}

impl Read for Cmd {
    fn send<'a, T: FromRedisValue + Send + 'a>(&'a self, conn: &'a mut Conn) -> RedisFuture<'a, T> {
        Box::pin(self.query_async(conn))
    }
}

impl Read for Pipeline {
    fn send<'a, T: FromRedisValue + Send + 'a>(&'a self, conn: &'a mut Conn) -> RedisFuture<'a, T> {
        Box::pin(self.query_async(conn))
    }
}
