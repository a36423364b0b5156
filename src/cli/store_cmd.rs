//! `keygate store ...`: what the configured store says about itself, and `accept`, which vouches
//! for its data after the gateways found it lost (identity marker gone, change counter back).

use std::io::Write as _;

use serde::Serialize;

use super::StoreCommand;
use crate::logging::AuditEvent;
use crate::store::{Identity, SharedStore, Status};

/// `keygate store status` as JSON.
#[derive(Debug, Serialize)]
struct StatusView {
    /// The identity marker; absent: none written yet (a new store) or lost with the data.
    identity: Option<Identity>,
    /// The change counter.
    change_position: u64,
    #[serde(flatten)]
    status: Status,
    active_keys: u64,
}

pub(super) async fn run(
    cmd: StoreCommand,
    store: &SharedStore,
    audit_log: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        StoreCommand::Status(flag) => {
            let view = StatusView {
                identity: store.identity().await?,
                change_position: store.change_position().await?,
                status: store.status().await?,
                active_keys: store.count_active().await?,
            };
            if flag.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
                return Ok(());
            }
            match &view.identity {
                Some(i) => writeln!(out, "identity marker: {} generation {}", i.id, i.generation)?,
                None => writeln!(
                    out,
                    "identity marker: none (a store without keys yet, a SQLite store, or one that lost its data)"
                )?,
            }
            writeln!(out, "change counter:  {}", view.change_position)?;
            writeln!(out, "active keys:     {}", view.active_keys)?;
            writeln!(
                out,
                "writable:        {}",
                if view.status.read_only {
                    "no (a replica)"
                } else {
                    "yes"
                }
            )?;
            if let Some(node) = &view.status.node {
                writeln!(out, "node:            {node}")?;
            }
            Ok(())
        }
        StoreCommand::Accept => match store.accept_identity().await? {
            Some(identity) => {
                let mut event = AuditEvent::new("store_accepted", None, None);
                event.detail = Some(format!(
                    "identity marker {} generation {}",
                    identity.id, identity.generation
                ));
                super::audit(audit_log, event);
                eprintln!(
                    "accepted the store as it is now (identity {} generation {}): running gateways \
                     drop their cached keys and read them from it again",
                    identity.id, identity.generation
                );
                Ok(())
            }
            None => {
                eprintln!("this store keeps no identity marker (SQLite): nothing to accept");
                Ok(())
            }
        },
    }
}
