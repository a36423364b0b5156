//! The permission check: every command keygate runs, tried on the store with keygate's Redis
//! user, and the first the ACL refuses named with the rule that grants it.

use std::time::Duration;

use redis::{Cmd, Value};

use super::RedisStore;
use super::client::is_denied;
use super::feed::Subscription;
use super::scripts::SCRIPT_COMMANDS;
use crate::store::StoreError;

impl RedisStore {
    /// Checks every command keygate runs: directly, inside a script, on a rate-limit bucket and
    /// on the change channel
    /// ([`KeyStore::check_access`](crate::store::KeyStore::check_access)).
    pub(super) async fn check_permissions(&self) -> Result<(), StoreError> {
        self.check_commands().await?;
        // The commands the scripts run, tried inside a script on scratch keys.
        let denied: Vec<String> = self
            .invoke(
                self.scripts
                    .probe
                    .key(self.key("probe", "h"))
                    .key(self.key("probe", "s"))
                    .key(self.key("probe", "z"))
                    .key(self.key("probe", "set"))
                    .key(self.key("probe", "x"))
                    .arg(&self.channel),
            )
            .await?;
        if let Some(first) = denied.first() {
            // "<command>\t<what Redis said>"
            let (name, says) = first.split_once('\t').unwrap_or((first, ""));
            let grant = SCRIPT_COMMANDS
                .iter()
                .find(|(command, _)| *command == name)
                .map_or("it", |(_, grant)| grant);
            let says = says.split(" script:").next().unwrap_or(says).trim();
            return Err(self.denied(name, grant, &format!("inside a script: {says}")));
        }
        // The rate limiter's buckets are keys of their own: `{prefix:rl:...}`.
        let bucket = format!("{{{}:rl:probe}}", &self.prefix[1..self.prefix.len() - 1]);
        match self
            .invoke::<Vec<i64>>(self.scripts.gcra.key(bucket).arg(1).arg(1_000_000))
            .await
        {
            Err(StoreError::Denied(_)) => {
                return Err(self.denied(
                    "the rate limiter's script",
                    "+time and the key pattern ~{prefix}*",
                    "refused on a rate-limit bucket key",
                ));
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // The change subscription.
        let client = match self.subscription()? {
            Subscription::Nodes(clients) => clients.into_iter().next(),
            Subscription::Primary(failover) => match failover.upgrade() {
                Some(f) => Some(f.primary().await.map_err(|e| self.error(e))?.client.clone()),
                None => None,
            },
        };
        if let Some(client) = client {
            let subscribed = self
                .within(Duration::ZERO, async {
                    let mut pubsub = client.get_async_pubsub().await.map_err(|e| self.error(e))?;
                    Ok(pubsub.subscribe(&self.channel).await)
                })
                .await?;
            if let Err(e) = subscribed
                && is_denied(&e)
            {
                return Err(self.denied(
                    "SUBSCRIBE",
                    "+@pubsub and the channel pattern &{prefix}:*",
                    &e.to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Checks the commands keygate runs directly; the first the ACL refuses, as `Denied`.
    async fn check_commands(&self) -> Result<(), StoreError> {
        let mut checks: Vec<(&str, &str, Cmd)> = vec![
            ("PING", "+@connection", redis::cmd("PING")),
            ("HELLO", "+@connection", redis::cmd("HELLO").arg(2).clone()),
            (
                "GET",
                "+@read",
                redis::cmd("GET").arg(self.named("seq")).clone(),
            ),
            (
                "HGETALL",
                "+@read",
                redis::cmd("HGETALL").arg(self.named("store")).clone(),
            ),
            (
                "HMGET",
                "+@read",
                redis::cmd("HMGET")
                    .arg(self.named("store"))
                    .arg("id")
                    .clone(),
            ),
            (
                "ZRANGE",
                "+@read",
                redis::cmd("ZRANGE")
                    .arg(self.named("all"))
                    .arg(0)
                    .arg(0)
                    .clone(),
            ),
            (
                "ZCOUNT",
                "+@read",
                redis::cmd("ZCOUNT")
                    .arg(self.named("active"))
                    .arg(0)
                    .arg(0)
                    .clone(),
            ),
            (
                "SCARD",
                "+@read",
                redis::cmd("SCARD").arg(self.named("legacy")).clone(),
            ),
            (
                "XRANGE",
                "+@read",
                redis::cmd("XRANGE")
                    .arg(self.named("changes"))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .clone(),
            ),
        ];
        if self.settings.confirm_replicas > 0 {
            checks.push((
                "WAIT",
                "+@connection",
                redis::cmd("WAIT").arg(0).arg(0).clone(),
            ));
        }
        // One at a time: a cluster pipeline may not mix keyless commands with keyed ones.
        let mut conn = self.conn().await?;
        for (name, grant, cmd) in &checks {
            let result = self
                .within(Duration::ZERO, async {
                    Ok(cmd.query_async::<Value>(&mut conn).await)
                })
                .await?;
            match result {
                Err(e) if is_denied(&e) => return Err(self.denied(name, grant, &e.to_string())),
                Err(e) => return Err(self.error(e)),
                Ok(_) => {}
            }
        }
        let loaded = self
            .within(Duration::ZERO, async {
                Ok(self
                    .scripts
                    .probe
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await)
            })
            .await?;
        if let Err(e) = loaded
            && is_denied(&e)
        {
            return Err(self.denied("SCRIPT LOAD", "+@scripting", &e.to_string()));
        }
        Ok(())
    }

    fn denied(&self, command: &str, grant: &str, redis_says: &str) -> StoreError {
        let who = format!("{} refuses keygate's Redis user", self.display);
        let text = if redis_says.contains("access a key") || redis_says.contains("of the keys") {
            format!(
                "{who} its keys ({command}: {redis_says}): grant the key pattern ~{}*",
                &self.prefix[..self.prefix.len() - 1]
            )
        } else if redis_says.contains("channel") {
            format!(
                "{who} the channel {} ({command}: {redis_says}): grant &{}:*",
                self.channel, self.prefix
            )
        } else {
            let grant = grant.replace("{prefix}", &self.prefix);
            format!("{who} the command {command} ({redis_says}): grant {grant}")
        };
        StoreError::Denied(format!("{text}; docs/fleet.md has the complete ACL"))
    }
}
