//! Redis Cluster: authentication and revocations through the cluster, the change subscription
//! moving to another node when its node dies, and outages of the node that holds keygate's
//! slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::redis::Cluster;
use crate::common::{self, Gateway, Upstream, eventually_async};
use crate::{
    WITHIN_A_SECOND, all_within, documented_acl, healthy_again, not_ready_for_refused_credentials,
    outage_waves, outlive_positive_ttl, refused_start, status,
};

/// A gateway on `cluster` (with `extra` settings) serves a key, and feels its revocation within
/// a second while polling every 30 s: through the change subscription.
async fn serves_and_hears_revocations(cluster: &Cluster, extra: &[(&str, &str)]) {
    let nodes = format!(
        "[{}]",
        cluster
            .urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let upstream = Upstream::start().await;
    let mut o = vec![
        ("KEYGATE_STORE_BACKEND", "redis-cluster"),
        ("KEYGATE_STORE_CLUSTER_NODES", nodes.as_str()),
        ("KEYGATE_STORE_POLL_INTERVAL", "30s"),
        ("KEYGATE_RATE_LIMIT_PER_KEY", "100/min"),
    ];
    o.extend_from_slice(extra);
    let gw = Gateway::start(&upstream.url(), &o).await;
    let key = gw.create_key("clustered").await;
    all_within(&[&gw], &key, StatusCode::OK, WITHIN_A_SECOND).await;
    gw.store.set_active("clustered", false).await.unwrap();
    let took = all_within(&[&gw], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    eprintln!("revocation through the cluster took {took:?}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_gateway_on_a_redis_cluster_authenticates_and_sees_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    serves_and_hears_revocations(&cluster, &[]).await;
}

/// A cluster that speaks TLS only (clients and bus), with client certificates required:
/// `rediss://` seed URLs and `store.tls_*`'s CA and certificate reach every node, and the
/// subscription too.
#[tokio::test]
async fn a_redis_cluster_over_tls_is_reached_with_the_store_s_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let tls = common::redis::TlsFiles::generate(&dir.path().join("tls"));
    let cluster = Cluster::start_tls(&dir.path().join("cluster"), &tls);
    serves_and_hears_revocations(&cluster, &tls.store_settings()).await;
}

/// Redis Cluster: the change subscription is not tied to the first seed node (killed here, with
/// polling slowed to 30 s, a revocation still arrives within a second through another node), and
/// with the node that holds keygate's slot down, requests are answered within the store timeout
/// (cached keys 200, unseen keys 503) and health says 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_gateway_follows_any_node_and_answers_outages_within_the_store_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(
        dir.path(),
        &[
            "--cluster-require-full-coverage",
            "no",
            "--cluster-node-timeout",
            "1000",
        ],
    );
    // The node that holds keygate's slot answers a write to it; the others redirect.
    let owner = cluster
        .nodes
        .iter()
        .position(|n| n.cli(&["SET", "{keygate}:owner", "1"]).as_deref() == Some("OK"))
        .expect("a node holds the {keygate} slot");
    // Seed nodes with another node first: it is killed below, and the subscription must not
    // depend on it.
    let first = (owner + 1) % 3;
    let order = [first, owner, (owner + 2) % 3];
    let nodes = format!(
        "[{}]",
        order
            .iter()
            .map(|&i| format!("\"redis://127.0.0.1:{}\"", cluster.nodes[i].port))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let upstream = Upstream::start().await;
    let o = [
        ("KEYGATE_STORE_BACKEND", "redis-cluster"),
        ("KEYGATE_STORE_CLUSTER_NODES", nodes.as_str()),
        ("KEYGATE_STORE_POLL_INTERVAL", "30s"),
        ("KEYGATE_STORE_TIMEOUT", "500ms"),
        ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
        ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
        ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", ""),
    ];
    let gw = Gateway::start(&upstream.url(), &o).await;
    let key = gw.create_key("clustered").await;
    let unseen: Vec<String> = futures_util::future::join_all((0..8).map(|i| {
        let store = Arc::clone(&gw.store);
        async move { common::create_key(store.as_ref(), &format!("unseen-{i}")).await }
    }))
    .await;
    all_within(&[&gw], &key, StatusCode::OK, Duration::from_secs(2)).await;

    // The first seed node dies: the subscription moves on, and a revocation still arrives.
    cluster.nodes[first].kill();
    let what = "the subscription to move to another node";
    let took = eventually_async(Duration::from_secs(10), what, async || {
        gw.store.set_active("clustered", false).await.unwrap();
        if status(&gw, &key).await == StatusCode::UNAUTHORIZED {
            return true;
        }
        // Not yet resubscribed: try the change again (each one is published again).
        gw.store.set_active("clustered", true).await.unwrap();
        all_within(&[&gw], &key, StatusCode::OK, Duration::from_secs(60)).await;
        false
    })
    .await;
    eprintln!("first seed node killed: a revocation arrived through another node {took:?} later");
    gw.store.set_active("clustered", true).await.unwrap();
    all_within(&[&gw], &key, StatusCode::OK, WITHIN_A_SECOND).await;

    // The node holding keygate's slot dies: answers within the store timeout, health 503.
    cluster.nodes[owner].kill();
    outlive_positive_ttl().await;
    outage_waves(
        &gw,
        &key,
        &unseen,
        "cluster slot owner down",
        Duration::from_millis(900),
    )
    .await;
    let started = Instant::now();
    let (code, body) = gw.health().await;
    eprintln!(
        "cluster slot owner down: health {code} in {:?}",
        started.elapsed()
    );
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() < Duration::from_millis(900));
    gw.shutdown().await;
}

/// Redis Cluster with keygate's own ACL user (docs/fleet.md's line and `+cluster|slots`, on every
/// node): the gateway serves and sees revocations. A wrong password stops the start in one line
/// that names `store.cluster_nodes`. A password changed on the nodes while the gateway runs is an
/// outage (cached keys 200, unseen keys 503, readiness gives the refusal) that ends by itself
/// once the nodes accept keygate's password again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_s_acl_user_is_enough_and_refused_credentials_are_named_and_outlived() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    let mut acl = documented_acl("+time");
    acl.push("+cluster|slots".to_owned());
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    for node in &cluster.nodes {
        assert_eq!(node.cli(&acl).as_deref(), Some("OK"), "{acl:?}");
    }
    let nodes_with = |password: &str| {
        let urls: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("\"redis://keygate:{password}@127.0.0.1:{}\"", n.port))
            .collect();
        format!("[{}]", urls.join(", "))
    };
    let nodes = nodes_with("CHANGE-ME");
    let upstream = Upstream::start().await;
    let o = [
        ("KEYGATE_STORE_BACKEND", "redis-cluster"),
        ("KEYGATE_STORE_CLUSTER_NODES", nodes.as_str()),
        ("KEYGATE_STORE_TIMEOUT", "300ms"),
    ];
    let gw = Gateway::start(&upstream.url(), &o).await;
    let key = gw.create_key("acl").await;
    all_within(&[&gw], &key, StatusCode::OK, WITHIN_A_SECOND).await;
    gw.store.set_active("acl", false).await.unwrap();
    all_within(&[&gw], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    gw.store.set_active("acl", true).await.unwrap();
    all_within(&[&gw], &key, StatusCode::OK, WITHIN_A_SECOND).await;

    // A wrong password: refused at start, in one line that says where to look.
    let wrong = nodes_with("NOT-THE-PASSWORD");
    let env = [
        ("KEYGATE_STORE_BACKEND", "redis-cluster"),
        ("KEYGATE_STORE_CLUSTER_NODES", wrong.as_str()),
    ];
    let line = refused_start(&gw.config_path, &env, "NOT-THE-PASSWORD");
    assert!(
        line.starts_with("keygate: error: key store refuses keygate's credentials: ")
            && line.contains("store.cluster_nodes"),
        "{line}"
    );

    // The password changes on every node, and keygate's connections are cut.
    let unseen = keygate::key::generate().unwrap().expose().to_owned();
    for node in &cluster.nodes {
        let rotate = ["ACL", "SETUSER", "keygate", "resetpass", ">ROTATED"];
        assert_eq!(node.cli(&rotate).as_deref(), Some("OK"));
        assert!(node.cli(&["CLIENT", "KILL", "USER", "keygate"]).is_some());
    }
    not_ready_for_refused_credentials(&gw).await;
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    assert_eq!(status(&gw, &unseen).await, StatusCode::SERVICE_UNAVAILABLE);

    // The nodes accept keygate's password again: healthy, and revocations arrive again.
    for node in &cluster.nodes {
        let restore = ["ACL", "SETUSER", "keygate", ">CHANGE-ME"];
        assert_eq!(node.cli(&restore).as_deref(), Some("OK"));
    }
    healthy_again(&gw).await;
    assert_eq!(status(&gw, &unseen).await, StatusCode::UNAUTHORIZED);
    gw.store.set_active("acl", false).await.unwrap();
    all_within(&[&gw], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    gw.shutdown().await;
}
