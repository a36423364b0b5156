//! New-connection load for `benches/load/run.sh`: every request on a TLS connection of its own.
//!
//! ```text
//! handshakes URL KEYS_FILE ORIGIN --tls 1.3|1.2 --resume on|off [--clients 16] [--seconds 5]
//! ```
//!
//! CLIENTS threads each loop until SECONDS are over: open a TCP connection, do a TLS handshake
//! with exactly the version asked for (ALPN offers http/1.1 only, key exchange X25519 first), POST
//! the benchmark's JSON with the next key of KEYS_FILE (each thread from its own offset) and
//! `Connection: close`, and read the response to the server's close.
//!
//! Resumption is the client's decision, as a browser's is:
//! - `--resume off`: no session is ever offered, so every handshake is a full one (certificate,
//!   signature, key exchange);
//! - `--resume on`: each thread keeps its own session store and offers what its previous
//!   connection left (TLS 1.3: a ticket the server sent; TLS 1.2: its session id or ticket), so all
//!   but a thread's first handshake are resumptions, if the server accepts them.
//!
//! Whether the server resumed is read from the handshake itself. The server's certificate is not
//! checked against a root (the benchmark's servers share a generated one), but its signature over
//! the handshake is, as any client's is.
//!
//! Native, because on a shared machine the new-connection rate carries the client's cost: this
//! client spends about what the server does per connection; a Python one spends three to four
//! times as much and holds every server's rate near the same figure.
//!
//! Prints one line, as `benches/load/keys.lua` does for wrk:
//! `RESULT rps=... p50_us=... p99_us=... bad=... requests=... resumed=... late=... ciphers=...`
//! rps counts the responses completed within SECONDS; a latency is from `connect()` to the end of
//! the response; bad counts non-2xx responses, connection errors and handshakes of another TLS
//! version (any of which voids the run); resumed counts the handshakes the server resumed; late
//! counts the connections under way at the end that completed after it (the server did their work
//! too, so run.sh divides its CPU time by requests + late); ciphers names the cipher suites the
//! server chose.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, StreamOwned};

const BODY: &str = r#"{"video_url":"https://media.example/clip.mp4","preset":"720p"}"#;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "One POST per TLS connection, for benches/load/run.sh")]
struct Args {
    /// `https://host:port/path` to POST to.
    url: url::Url,
    /// File with one key a line; each request takes the next.
    keys: std::path::PathBuf,
    /// `Origin` header of every request.
    origin: String,
    #[arg(long, value_enum)]
    tls: Version,
    #[arg(long, value_enum)]
    resume: Resume,
    /// Concurrent connections (one thread each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Version {
    #[value(name = "1.3")]
    Tls13,
    #[value(name = "1.2")]
    Tls12,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Resume {
    On,
    Off,
}

/// What one thread counted.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    bad: u64,
    resumed: u64,
    late: u64,
    ciphers: BTreeSet<String>,
}

/// One completed exchange.
struct Exchange {
    status: u16,
    version: Option<rustls::ProtocolVersion>,
    resumed: bool,
    cipher: Option<String>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err("--seconds must be above 0".into());
    }
    let keys: Vec<String> = std::fs::read_to_string(&args.keys)
        .map_err(|e| format!("{}: {e}", args.keys.display()))?
        .lines()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Err(format!("{}: no keys (one key a line expected)", args.keys.display()).into());
    }
    if args.url.scheme() != "https" {
        return Err(format!("{}: an https URL expected", args.url).into());
    }
    let host = args.url.host_str().ok_or("the URL has no host")?.to_owned();
    let port = args.url.port_or_known_default().unwrap_or(443);
    let address = (host.as_str(), port)
        .to_socket_addrs()?
        .next()
        .ok_or("the URL's host has no address")?;
    let name = ServerName::try_from(host.clone())?;
    let authority = match args.url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let request_for = |key: &str| {
        format!(
            "POST {} HTTP/1.1\r\nHost: {authority}\r\nX-API-Key: {key}\r\nOrigin: {}\r\n\
             Content-Type: application/json\r\nUser-Agent: keygate-load/1\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            args.url.path(),
            args.origin,
            BODY.len()
        )
        .into_bytes()
    };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let clients = args.clients as usize;
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|n| {
                let start = n * keys.len() / clients;
                let requests: Vec<Vec<u8>> = keys[start..]
                    .iter()
                    .chain(&keys[..start])
                    .map(|k| request_for(k))
                    .collect();
                // Each thread its own configuration, so its session store is its own.
                let config = client_config(&provider, args.tls, args.resume)?;
                let name = name.clone();
                Ok(s.spawn(move || worker(config, address, name, requests, args.tls, deadline)))
            })
            .collect::<Result<_, rustls::Error>>()?;
        Ok::<_, rustls::Error>(
            workers
                .into_iter()
                .map(|w| w.join().expect("worker panicked"))
                .collect(),
        )
    })?;

    let mut latencies: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let ciphers: BTreeSet<&str> = tallies
        .iter()
        .flat_map(|t| t.ciphers.iter().map(String::as_str))
        .collect();
    let ciphers = if ciphers.is_empty() {
        "-".to_owned()
    } else {
        ciphers.into_iter().collect::<Vec<_>>().join(",")
    };
    println!(
        "RESULT rps={:.1} p50_us={} p99_us={} bad={} requests={} resumed={} late={} ciphers={ciphers}",
        latencies.len() as f64 / args.seconds,
        at(0.5),
        at(0.99),
        sum(|t| t.bad),
        latencies.len(),
        sum(|t| t.resumed),
        sum(|t| t.late),
    );
    Ok(())
}

fn client_config(
    provider: &Arc<CryptoProvider>,
    version: Version,
    resume: Resume,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match version {
        Version::Tls13 => &[&rustls::version::TLS13],
        Version::Tls12 => &[&rustls::version::TLS12],
    };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(
            provider.signature_verification_algorithms,
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = match resume {
        Resume::On => Resumption::in_memory_sessions(4),
        Resume::Off => Resumption::disabled(),
    };
    Ok(Arc::new(config))
}

fn worker(
    config: Arc<ClientConfig>,
    address: SocketAddr,
    name: ServerName<'static>,
    requests: Vec<Vec<u8>>,
    version: Version,
    deadline: Instant,
) -> Tally {
    let wanted = match version {
        Version::Tls13 => rustls::ProtocolVersion::TLSv1_3,
        Version::Tls12 => rustls::ProtocolVersion::TLSv1_2,
    };
    let mut tally = Tally::default();
    for request in requests.iter().cycle() {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        let Ok(exchange) = exchange(&config, address, &name, request) else {
            tally.bad += 1;
            continue;
        };
        let end = Instant::now();
        if end > deadline {
            tally.late += 1;
            break;
        }
        if exchange.version != Some(wanted) || !(200..300).contains(&exchange.status) {
            tally.bad += 1;
        }
        tally.resumed += u64::from(exchange.resumed);
        tally.ciphers.extend(exchange.cipher);
        tally
            .latencies_us
            .push(end.duration_since(start).as_micros() as u64);
    }
    tally
}

fn exchange(
    config: &Arc<ClientConfig>,
    address: SocketAddr,
    name: &ServerName<'static>,
    request: &[u8],
) -> io::Result<Exchange> {
    let tcp = TcpStream::connect_timeout(&address, TIMEOUT)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let connection =
        ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(connection, tcp);
    tls.write_all(request)?;
    let mut response = Vec::with_capacity(1024);
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // Closed without close_notify: with `Connection: close`, the TCP end is the end.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    let connection = &tls.conn;
    Ok(Exchange {
        status: status_of(&response),
        version: connection.protocol_version(),
        resumed: connection.handshake_kind() == Some(HandshakeKind::Resumed),
        cipher: connection
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(str::to_owned),
    })
}

/// The status of a complete HTTP/1.1 response, or 0 when it is cut short.
fn status_of(response: &[u8]) -> u16 {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(length)) = head.parse(response) else {
        return 0;
    };
    let body = response.len() - length;
    let declared = head
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
    match declared {
        Some(Some(n)) if n == body => head.code.unwrap_or(0),
        Some(_) => 0,
        None => head.code.unwrap_or(0),
    }
}

/// Accepts any certificate, but checks the server's signature over the handshake with it.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}
