//! Clients for Redis nodes: the TLS material they present, how a connection manager to a node
//! reconnects ([`Managed`]), why a cluster connection reached no node ([`Clustered`]), and what a
//! node's errors and answers say about it (gone, a replica, refused by the ACL or at
//! authentication, its role).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ErrorKind, Pipeline, RedisError,
    RedisFuture, RedisResult, ServerErrorKind, TlsCertificates, Value,
};

use super::Tls;

/// `tls`'s CA and client certificate, as the Redis client takes them; `None` when it has none.
pub(super) fn certificates(tls: &Tls) -> Option<TlsCertificates> {
    if tls.ca.is_none() && tls.client.is_none() {
        return None;
    }
    Some(TlsCertificates {
        client_tls: tls.client.as_ref().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        root_cert: tls.ca.clone(),
    })
}

/// A client for `url`, with `tls`'s material when there is some.
pub(super) fn client_for(tls: &Tls, url: &str) -> RedisResult<Client> {
    match certificates(tls) {
        Some(certs) => Client::build_with_tls(url, certs),
        None => Client::open(url),
    }
}

/// How a connection manager to one node reconnects: connecting bounded by the store timeout, a
/// few quick retries, then the caller's error. An answer may take `wait` longer (a `WAIT` for
/// replicas); every round trip is bounded by the caller too ([`RedisStore::within`]).
///
/// [`RedisStore::within`]: super::RedisStore::within
pub(super) fn manager_config(timeout: Duration, wait: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout + wait))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
        .set_number_of_retries(2)
}

/// A connection manager to one node, started afresh when the node refuses keygate's
/// credentials. redis-rs's manager reconnects after an I/O error only: once a reconnect has
/// been refused at authentication, it answers every later command with that refusal, also
/// after Redis has come to accept the credentials again.
#[derive(Clone)]
pub(super) struct Managed(Arc<ManagedInner>);

struct ManagedInner {
    client: Client,
    config: ConnectionManagerConfig,
    current: ArcSwap<ConnectionManager>,
}

impl Managed {
    /// A manager for `client`; it connects at its first command.
    pub(super) fn new(client: Client, config: ConnectionManagerConfig) -> RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Self(Arc::new(ManagedInner {
            client,
            config,
            current: ArcSwap::from_pointee(manager),
        })))
    }

    fn manager(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.0.current.load())
    }

    /// After `result`: a refusal at authentication replaces the manager, so the next command
    /// connects (and authenticates) anew.
    fn after<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        let inner = &self.0;
        if let Err(e) = &result
            && is_unauthenticated(e)
            && let Ok(fresh) =
                ConnectionManager::new_lazy_with_config(inner.client.clone(), inner.config.clone())
        {
            inner.current.store(Arc::new(fresh));
        }
        result
    }
}

impl ConnectionLike for Managed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut manager = self.manager();
        Box::pin(async move {
            let result = manager.req_packed_command(cmd).await;
            self.after(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut manager = self.manager();
        Box::pin(async move {
            let result = manager.req_packed_commands(pipeline, offset, count).await;
            self.after(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.0.client.get_connection_info().redis_settings().db()
    }
}

/// A Redis Cluster connection that says why it reached no node. Once redis-rs cannot connect to
/// the nodes it answers "No connections found", or the redirection it could not follow, whatever
/// the cause; a refusal at authentication (credentials changed in Redis first) is found by
/// asking the seed nodes.
#[derive(Clone)]
pub(super) struct Clustered {
    conn: ClusterConnection,
    seeds: Arc<[Client]>,
    timeout: Duration,
}

impl Clustered {
    /// `conn`, whose seed nodes are `seeds`, each asked within `timeout` when it is needed.
    pub(super) fn new(conn: ClusterConnection, seeds: Vec<Client>, timeout: Duration) -> Self {
        let seeds = seeds.into();
        Self {
            conn,
            seeds,
            timeout,
        }
    }

    /// `result`; in place of an error that says the cluster client did not reach the node it
    /// needed, the refusal at authentication a seed node gives, if one does.
    async fn explained<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        let Err(e) = result else {
            return result;
        };
        // A broken or refused connection says why itself.
        let unreached = e.kind() == ErrorKind::ClusterConnectionNotFound || e.is_cluster_error();
        if !unreached {
            return Err(e);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let asked = self.seeds.iter().map(async |seed| {
            match seed
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                // Credentials are sent when connecting; none where some are required shows at
                // the first command.
                Ok(mut conn) => redis::cmd("PING").query_async::<()>(&mut conn).await.err(),
                Err(refused) => Some(refused),
            }
        });
        let refusal = futures_util::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .find(is_unauthenticated);
        Err(refusal.unwrap_or(e))
    }
}

impl ConnectionLike for Clustered {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.conn.req_packed_command(cmd).await;
            self.explained(result).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.conn.req_packed_commands(pipeline, offset, count).await;
            self.explained(result).await
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// A broken or refused connection, or one that stopped answering: the node may be gone.
pub(super) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

pub(super) fn is_read_only(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// Refused by an ACL: directly (`NOPERM`), or inside a script (where Redis says "can't").
pub(super) fn is_denied(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) || is_denial_text(&e.to_string())
}

/// Refused at authentication: a wrong user or password (`WRONGPASS`, or redis-rs's own
/// `AuthenticationFailed`), or none given where one is required (`NOAUTH`). A cluster client
/// that reached no node gives an I/O error with the last node's error as text only.
pub(super) fn is_unauthenticated(e: &RedisError) -> bool {
    let refusal = |text: &str| {
        ["AuthenticationFailed", "NOAUTH", "WRONGPASS"]
            .iter()
            .any(|word| text.contains(word))
    };
    e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
        || (e.kind() == ErrorKind::Io && e.detail().is_some_and(refusal))
}

fn is_denial_text(text: &str) -> bool {
    text.contains("NOPERM")
        || text.contains("no permissions")
        || text.contains("The user executing the script can't")
}

/// `role` in a `HELLO` answer (a flat list of names and values).
pub(super) fn hello_role(answer: &Value) -> Option<String> {
    let items: Vec<&Value> = match answer {
        Value::Array(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return None,
    };
    items.chunks(2).find_map(|pair| match pair {
        [name, value] => {
            let name: String = redis::from_redis_value_ref(name).ok()?;
            if name != "role" {
                return None;
            }
            redis::from_redis_value_ref(value).ok()
        }
        _ => None,
    })
}
