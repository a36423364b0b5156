//! The primary of a Sentinel group ([`Failover`]): asked of the sentinels, asked again when a
//! command meets `READONLY` or a broken connection or a sentinel announces `+switch-master`, and
//! the commands sent to it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionLike;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisResult,
    ServerErrorKind, TlsMode, Value,
};
use tokio::sync::watch;

use super::Tls;
use super::client::{
    Managed, certificates, is_connection_error, is_denied, is_read_only, manager_config,
};
use crate::logging::Throttle;

/// The primary of a Sentinel group, found through the sentinels and followed when it moves.
pub struct Failover {
    master: String,
    sentinel: tokio::sync::Mutex<SentinelClient>,
    pub(super) current: ArcSwapOption<Primary>,
    /// The current primary's generation, bumped on each move: the change subscription moves with
    /// it, and the `+switch-master` watcher ends when this sender is dropped with the store.
    pub(super) moved: watch::Sender<u64>,
    timeout: Duration,
    /// How much longer than `timeout` an answer may take (a `WAIT`).
    wait: Duration,
    pub(super) db: i64,
}

/// One primary, as found.
pub(super) struct Primary {
    addr: String,
    pub(super) client: Client,
    manager: Managed,
    pub(super) generation: u64,
}

impl Failover {
    pub(super) fn new(
        sentinels: &[String],
        master: &str,
        node: &str,
        tls: &Tls,
        timeout: Duration,
        wait: Duration,
    ) -> RedisResult<Self> {
        let mut addrs = Vec::with_capacity(sentinels.len());
        let mut auth = None;
        for url in sentinels {
            let info = url.as_str().into_connection_info()?;
            let settings = info.redis_settings();
            if auth.is_none() && settings.password().is_some() {
                auth = Some((
                    settings.username().map(str::to_owned),
                    settings.password().map(str::to_owned),
                ));
            }
            addrs.push(info.addr().clone());
        }
        let node = node.into_connection_info()?;
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
            .set_client_to_redis_db(node.redis_settings().db());
        if let Some(user) = node.redis_settings().username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = node.redis_settings().password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let ConnectionAddr::TcpTls { insecure, .. } = node.addr() {
            builder = builder.set_client_to_redis_tls_mode(if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            });
            if let Some(certs) = certificates(tls) {
                builder = builder.set_client_to_redis_certificates(certs);
            }
        }
        if let Some((user, password)) = auth {
            if let Some(user) = user {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = password {
                builder = builder.set_client_to_sentinel_password(password);
            }
        }
        if sentinels.iter().any(|s| s.starts_with("rediss://"))
            && let Some(certs) = certificates(tls)
        {
            builder = builder.set_client_to_sentinel_certificates(certs);
        }
        let (moved, _) = watch::channel(0);
        Ok(Self {
            master: master.to_owned(),
            sentinel: tokio::sync::Mutex::new(builder.build()?),
            current: ArcSwapOption::empty(),
            moved,
            timeout,
            wait,
            db: node.redis_settings().db(),
        })
    }

    /// The primary as last found; found now if it never was.
    pub(super) async fn primary(&self) -> RedisResult<Arc<Primary>> {
        match self.current.load_full() {
            Some(p) => Ok(p),
            None => self.find(None).await,
        }
    }

    /// The primary's address as last found.
    pub(super) fn addr(&self) -> Option<String> {
        self.current.load().as_ref().map(|p| p.addr.clone())
    }

    /// Asks the sentinels for the primary, unless the one of generation `suspect` (`None`: none
    /// found yet) was already replaced meanwhile. One lookup at a time.
    async fn find(&self, suspect: Option<u64>) -> RedisResult<Arc<Primary>> {
        let mut sentinel = self.sentinel.lock().await;
        let current = self.current.load_full();
        if let Some(p) = &current
            && suspect != Some(p.generation)
        {
            return Ok(Arc::clone(p));
        }
        let client = tokio::time::timeout(self.timeout, sentinel.async_get_client())
            .await
            .map_err(|_| {
                RedisError::from((
                    ErrorKind::Io,
                    "no sentinel named the primary within the store timeout",
                ))
            })?
            .map_err(|e| {
                if is_denied(&e) {
                    // redis-rs asks each sentinel ROLE to check it is one, and the primary to
                    // check it really is the primary; its error does not say which refused.
                    RedisError::from((
                        ErrorKind::Server(ServerErrorKind::NoPerm),
                        "keygate's user may not run ROLE, which the Sentinel client asks of the sentinels and of the primary",
                        "grant +role on both (see the ACLs in docs/fleet.md)".to_owned(),
                    ))
                } else {
                    e
                }
            })?;
        let addr = client.get_connection_info().addr().to_string();
        if let Some(p) = &current
            && p.addr == addr
        {
            return Ok(Arc::clone(p));
        }
        let manager = Managed::new(client.clone(), manager_config(self.timeout, self.wait))?;
        let generation = current.as_ref().map_or(1, |p| p.generation + 1);
        let primary = Arc::new(Primary {
            addr: addr.clone(),
            client,
            manager,
            generation,
        });
        self.current.store(Some(Arc::clone(&primary)));
        self.moved.send_replace(generation);
        match &current {
            Some(old) => tracing::warn!(
                master = %self.master,
                from = %old.addr,
                to = %addr,
                "the Redis primary moved: following it"
            ),
            None => {
                tracing::info!(master = %self.master, primary = %addr, "Redis primary found through the sentinels")
            }
        }
        Ok(primary)
    }

    /// Looks the primary up again in the background (after a broken connection): the caller
    /// gets its error now, and the next call the new primary.
    pub(super) fn find_soon(self: &Arc<Self>, suspect: u64) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = this.find(Some(suspect)).await {
                tracing::debug!(error = %e, "Redis primary lookup failed");
            }
        });
    }

    pub(super) async fn command(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        let primary = self.primary().await?;
        match primary.manager.clone().req_packed_command(cmd).await {
            Err(e) if is_read_only(&e) => {
                // The node was demoted: nothing was written. Ask again; retry once if it moved.
                let next = self.find(Some(primary.generation)).await?;
                if next.generation == primary.generation {
                    return Err(e);
                }
                next.manager.clone().req_packed_command(cmd).await
            }
            Err(e) if is_connection_error(&e) => {
                self.find_soon(primary.generation);
                Err(e)
            }
            other => other,
        }
    }

    pub(super) async fn pipeline(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let primary = self.primary().await?;
        match primary
            .manager
            .clone()
            .req_packed_commands(pipeline, offset, count)
            .await
        {
            Err(e) if is_read_only(&e) => {
                let next = self.find(Some(primary.generation)).await?;
                if next.generation == primary.generation {
                    return Err(e);
                }
                next.manager
                    .clone()
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }
            Err(e) if is_connection_error(&e) => {
                self.find_soon(primary.generation);
                Err(e)
            }
            other => other,
        }
    }

    /// Listens to the sentinels' `+switch-master` announcements (on the first sentinel that
    /// answers) and follows the primary at each one for this group, until the store is dropped.
    pub(super) async fn watch_switches(failover: Weak<Failover>) {
        static LOST: Throttle = Throttle::new(Duration::from_secs(30));
        let Some(mut closed) = failover.upgrade().map(|f| f.moved.subscribe()) else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let result: RedisResult<()> = async {
                let Some(f) = failover.upgrade() else {
                    return Ok(());
                };
                let (master, timeout) = (f.master.clone(), f.timeout);
                let client = {
                    let mut sentinel = f.sentinel.lock().await;
                    tokio::time::timeout(timeout, sentinel.async_get_sentinel_client()).await
                };
                drop(f);
                let client = client
                    .map_err(|_| RedisError::from((ErrorKind::Io, "no sentinel answered")))??;
                let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| RedisError::from((ErrorKind::Io, "no sentinel answered")))??;
                pubsub.subscribe("+switch-master").await?;
                backoff = Duration::from_millis(100);
                LOST.reset();
                // A switch announced while nobody listened is found by asking now.
                if let Some(f) = failover.upgrade() {
                    let suspect = f.current.load().as_ref().map(|p| p.generation);
                    if suspect.is_some() {
                        let _ = f.find(suspect).await;
                    }
                }
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        msg = futures_util::StreamExt::next(&mut messages) => {
                            let Some(msg) = msg else { break };
                            // "<master name> <old ip> <old port> <new ip> <new port>"
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if payload.split(' ').next() != Some(master.as_str()) {
                                continue;
                            }
                            let Some(f) = failover.upgrade() else { return Ok(()) };
                            let suspect = f.current.load().as_ref().map(|p| p.generation);
                            if let Err(e) = f.find(suspect).await {
                                tracing::warn!(error = %e, "Redis primary lookup after +switch-master failed");
                            }
                        }
                        changed = closed.changed() => if changed.is_err() { return Ok(()) },
                    }
                }
                Err(RedisError::from((ErrorKind::Io, "sentinel subscription closed")))
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) => {
                    if let Some(suppressed) = LOST.allow() {
                        tracing::warn!(error = %e, suppressed, "listening for Redis failovers failed; retrying (commands still follow the primary)");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                changed = closed.changed() => if changed.is_err() { return },
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
