//! Real `redis-server` and `redis-sentinel` processes for tests: one server (plain or TLS, with
//! AOF or without persistence), a replica, a three-master cluster, and a Sentinel group, each on
//! its own free loopback port with its own data directory, stopped (SIGKILL) when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::eventually;

/// A free loopback port whose `port + 10000` (the cluster bus port) is free too.
fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Skips nothing: the tests need `redis-server` (and `redis-sentinel`); `.ci/run` installs
/// them.
pub fn require_redis() {
    for program in ["redis-server", "redis-sentinel"] {
        let ok = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{program} is not installed: run scripts/install-test-deps.sh"
        );
    }
}

/// PEM files of a TLS server: its CA, certificate and key (and the client's, to connect).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A private CA (made now with rcgen), a server certificate for 127.0.0.1 and localhost, and
    /// a client certificate, all signed by it, written into `dir`.
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keygate test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(vec!["keygate".into()], ExtendedKeyUsagePurpose::ClientAuth);
        let files = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        std::fs::write(&files.ca, ca_cert.pem()).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        std::fs::write(&files.client_cert, client_cert).unwrap();
        std::fs::write(&files.client_key, client_key).unwrap();
        files
    }

    /// The `KEYGATE_STORE_TLS_*` settings that trust this CA and present the client certificate.
    pub fn store_settings(&self) -> [(&'static str, &str); 3] {
        let utf8 = "temporary paths are UTF-8";
        [
            ("KEYGATE_STORE_TLS_CA_FILE", self.ca.to_str().expect(utf8)),
            (
                "KEYGATE_STORE_TLS_CERT_FILE",
                self.client_cert.to_str().expect(utf8),
            ),
            (
                "KEYGATE_STORE_TLS_KEY_FILE",
                self.client_key.to_str().expect(utf8),
            ),
        ]
    }

    /// `redis-cli`'s arguments to connect with these files.
    fn cli_args(&self, command: &mut Command) {
        command
            .arg("--tls")
            .arg("--cacert")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.client_cert)
            .arg("--key")
            .arg(&self.client_key);
    }

    /// The `sentinel.conf` lines of a sentinel that speaks TLS only, on `port`, to its clients,
    /// the other sentinels and the Redis servers it watches.
    fn sentinel_conf(&self, port: u16) -> String {
        format!(
            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
             tls-client-cert-file {}\ntls-client-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients yes\ntls-replication yes\n",
            self.cert.display(),
            self.key.display(),
            self.client_cert.display(),
            self.client_key.display(),
            self.ca.display(),
        )
    }
}

/// One `redis-server`.
pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    /// Served over TLS only (clients must present a certificate).
    tls: Option<TlsFiles>,
}

impl Redis {
    /// Starts a server with AOF persistence (so a `kill -9` and restart keeps the keys).
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// Starts a server with extra arguments (e.g. cluster mode); later arguments override
    /// earlier ones, so `["--appendonly", "no"]` makes a server that keeps nothing.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        Self::start_inner(dir, extra, None)
    }

    /// Starts a server that keeps nothing across a restart: it comes back empty.
    pub fn start_volatile(dir: &Path) -> Self {
        Self::start_with(dir, &["--appendonly", "no"])
    }

    /// Starts a replica of `primary` (over TLS if `primary` speaks it), and waits until it has
    /// synchronised.
    pub fn start_replica(dir: &Path, primary: &Redis) -> Self {
        let port = primary.port.to_string();
        let args = ["--replicaof", "127.0.0.1", &port];
        let replica = Self::start_inner(dir, &args, primary.tls.clone());
        let what = format!("the replica on {} to synchronise", replica.port);
        eventually(Duration::from_secs(20), &what, || {
            replica
                .cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"))
        });
        replica
    }

    /// Starts a server that speaks TLS only, with `tls`'s certificate, and requires clients to
    /// present one signed by its CA; as a replica it presents `tls`'s client certificate.
    pub fn start_tls(dir: &Path, tls: &TlsFiles) -> Self {
        Self::start_inner(dir, &[], Some(tls.clone()))
    }

    fn start_inner(dir: &Path, extra: &[&str], tls: Option<TlsFiles>) -> Self {
        require_redis();
        let mut server = Self {
            port: free_port(),
            dir: dir.to_owned(),
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            tls,
        };
        std::fs::create_dir_all(dir).unwrap();
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .arg("--tls-client-cert-file")
                .arg(&tls.client_cert)
                .arg("--tls-client-key-file")
                .arg(&tls.client_key)
                .args(["--tls-auth-clients", "yes", "--tls-replication", "yes"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let what = format!("redis-server on {} to start", self.port);
        eventually(Duration::from_secs(10), &what, || {
            self.cli(&["PING"]).as_deref() == Some("PONG")
        });
    }

    /// `redis://127.0.0.1:<port>/0` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; `None` when it cannot connect.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let mut command = Command::new("redis-cli");
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(tls) = &self.tls {
            tls.cli_args(&mut command);
        }
        cli_output(command.args(args))
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Calls so far of every command but INFO (which these readings themselves issue).
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let stats = self.cli(&["INFO", "commandstats"]).unwrap_or_default();
        stats
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                let calls = rest.split(',').next()?.parse::<u64>().ok()?;
                (name != "info").then(|| (name.to_owned(), calls))
            })
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// A cluster whose nodes take `extra` arguments too.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        Self::start_inner(dir, extra, None)
    }

    /// A cluster that speaks TLS only, to its clients and on its bus, with `tls`'s files (as
    /// [`Redis::start_tls`]).
    pub fn start_tls(dir: &Path, tls: &TlsFiles) -> Self {
        Self::start_inner(dir, &["--tls-cluster", "yes"], Some(tls))
    }

    fn start_inner(dir: &Path, extra: &[&str], tls: Option<&TlsFiles>) -> Self {
        let nodes: Vec<Redis> = (0..3)
            .map(|i| {
                let d = dir.join(format!("node{i}"));
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ];
                args.extend_from_slice(extra);
                Redis::start_inner(&d, &args, tls.cloned())
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(tls) = tls {
            tls.cli_args(&mut create);
        }
        let status = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create failed");
        eventually(Duration::from_secs(20), "the cluster to become ok", || {
            nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            })
        });
        Self { nodes }
    }

    /// Seed URLs (`rediss://` over TLS).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.url().trim_end_matches("/0").to_owned())
            .collect()
    }
}

/// A Sentinel group: `redis-sentinel` processes watching one primary under a name, quorum 2,
/// with short failure-detection times so a test's failover takes seconds. Over TLS (with the
/// primary's files) when the primary speaks TLS.
pub struct Sentinels {
    pub master: String,
    pub ports: Vec<u16>,
    /// The password every sentinel requires of its clients (and of the other sentinels).
    password: Option<String>,
    tls: Option<TlsFiles>,
    children: Vec<Child>,
}

impl Sentinels {
    /// Starts `n` sentinels watching `primary` (and its replicas) as `master`, and waits until
    /// each knows the primary, a replica and the other sentinels.
    pub fn start(dir: &Path, master: &str, primary: &Redis, n: usize) -> Self {
        Self::start_inner(dir, master, primary, n, None)
    }

    /// As [`Sentinels::start`], each sentinel requiring `password` of its clients
    /// (`requirepass`), the other sentinels included (`sentinel sentinel-pass`).
    pub fn start_with_password(
        dir: &Path,
        master: &str,
        primary: &Redis,
        n: usize,
        password: &str,
    ) -> Self {
        Self::start_inner(dir, master, primary, n, Some(password))
    }

    fn start_inner(
        dir: &Path,
        master: &str,
        primary: &Redis,
        n: usize,
        password: Option<&str>,
    ) -> Self {
        require_redis();
        let mut group = Self {
            master: master.to_owned(),
            ports: Vec::new(),
            password: password.map(str::to_owned),
            tls: primary.tls.clone(),
            children: Vec::new(),
        };
        let auth = password.map_or_else(String::new, |p| {
            format!("requirepass {p}\nsentinel sentinel-pass {p}\n")
        });
        for i in 0..n {
            let port = free_port();
            let listen = group
                .tls
                .as_ref()
                .map_or_else(|| format!("port {port}\n"), |tls| tls.sentinel_conf(port));
            let d = dir.join(format!("sentinel{i}"));
            std::fs::create_dir_all(&d).unwrap();
            // Sentinel rewrites its configuration file: each has its own.
            let conf = d.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {master} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {master} 1000\n\
                     sentinel failover-timeout {master} 10000\n\
                     sentinel parallel-syncs {master} 1\n{auth}",
                    dir = d.display(),
                    primary = primary.port,
                ),
            )
            .unwrap();
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            group.ports.push(port);
            group.children.push(child);
        }
        let what = "the sentinels to find the primary, its replica and each other";
        eventually(Duration::from_secs(30), what, || {
            group.ports.iter().all(|&port| {
                let ask = |what: &str| group.cli_at(port, &["SENTINEL", what, master]);
                ask("replicas").is_some_and(|r| r.contains("slave") && !r.contains("s_down"))
                    && ask("sentinels").is_some_and(|s| s.matches("127.0.0.1").count() >= n - 1)
            })
        });
        group
    }

    /// `["redis://127.0.0.1:<port>", ...]` as a TOML array (for KEYGATE_STORE_SENTINELS).
    pub fn urls_toml(&self) -> String {
        self.urls_toml_with("")
    }

    /// [`Sentinels::urls_toml`] with `userinfo` (e.g. `":password@"`) before each host.
    pub fn urls_toml_with(&self, userinfo: &str) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"{scheme}://{userinfo}127.0.0.1:{p}\""))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// Runs `redis-cli` against the first sentinel that answers.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        self.ports.iter().find_map(|&p| self.cli_at(p, args))
    }

    /// Runs `redis-cli` against the sentinel on `port`; `None` when it cannot connect.
    pub fn cli_at(&self, port: u16, args: &[&str]) -> Option<String> {
        let mut command = Command::new("redis-cli");
        command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(password) = &self.password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        if let Some(tls) = &self.tls {
            tls.cli_args(&mut command);
        }
        cli_output(command.args(args))
    }

    /// `host:port` of the primary, as the sentinels name it now.
    pub fn primary(&self) -> Option<String> {
        let answer = self.cli(&["SENTINEL", "get-master-addr-by-name", &self.master])?;
        let mut lines = answer.lines();
        Some(format!("{}:{}", lines.next()?, lines.next()?))
    }
}

/// What `redis-cli` printed; `None` when it failed or could not connect.
fn cli_output(command: &mut Command) -> Option<String> {
    let out = command.stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
