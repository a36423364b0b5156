#!/usr/bin/env python3
"""New-connection load for the load benchmark: every request on a TLS connection of its own.

    handshakes.py URL KEYS_FILE ORIGIN --tls 1.3|1.2 --resume on|off [--clients 16]
                  [--processes 2] [--seconds 5]

CLIENTS workers (threads, spread over PROCESSES processes so the client is not held to one core by
Python's lock) each loop until SECONDS are over: open a TCP connection, do a TLS handshake with
exactly the version asked for (minimum and maximum version both set; ALPN offers http/1.1 only),
POST the benchmark's JSON with the next key of KEYS_FILE (each worker from its own offset, one key
per request) and `Connection: close`, and read the response to the server's close.

Resumption is the client's decision, as a browser's is:
  --resume off  no session is ever offered: every handshake is a full one (certificate, signature,
                key exchange);
  --resume on   each worker offers the session its previous connection ended with (TLS 1.3: the
                last ticket the server sent on it; TLS 1.2: its session id or ticket), so all but a
                worker's first handshake are resumptions, if the server accepts them.
Whether the server resumed is read from the handshake itself (OpenSSL's SSL_session_reused).

Prints one line, as benches/load/keys.lua does for wrk:
  RESULT rps=... p50_us=... p99_us=... bad=... requests=... resumed=... late=... ciphers=...
rps counts the responses completed within SECONDS; a latency is from connect() to the end of the
response; bad counts non-2xx responses, connection errors and handshakes of another TLS version
(any of which voids the run); resumed counts the handshakes the server resumed among the
requests; late counts the connections that were under way at the end and completed after it (the
server did their work too, so run.sh divides its CPU time by requests + late); ciphers names the
cipher suites the server chose.
"""
import argparse
import multiprocessing
import socket
import ssl
import sys
import threading
import time
import urllib.parse

VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}
NAMES = {"1.3": "TLSv1.3", "1.2": "TLSv1.2"}
BODY = b'{"video_url":"https://media.example/clip.mp4","preset":"720p"}'


def request_for(key: str, host: str, path: str, origin: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\nOrigin: {origin}\r\n"
        f"Content-Type: application/json\r\nUser-Agent: keygate-load/1\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + BODY


def status_of(response: bytes) -> int:
    """The status of a complete HTTP/1.1 response, or 0 when it is cut short."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return 0
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            if not value.strip().isdigit() or len(body) != int(value):
                return 0
    return int(parts[1])


def worker(args, requests, deadline, out):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = VERSIONS[args.tls]
    ctx.set_alpn_protocols(["http/1.1"])
    url = urllib.parse.urlsplit(args.url)
    address = (url.hostname, url.port or 443)
    session = None
    latencies, bad, resumed, late, i = [], 0, 0, 0, 0
    ciphers = set()
    while True:
        start = time.monotonic()
        if start >= deadline:
            break
        request = requests[i % len(requests)]
        i += 1
        chunks = []
        try:
            with socket.create_connection(address, timeout=10) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                offered = session if args.resume == "on" else None
                with ctx.wrap_socket(raw, server_hostname=url.hostname, session=offered) as tls:
                    tls.sendall(request)
                    while True:
                        try:
                            chunk = tls.recv(65536)
                        except ssl.SSLEOFError:  # closed without close_notify: the TCP end is the end
                            chunk = b""
                        if not chunk:
                            break
                        chunks.append(chunk)
                    ok_version = tls.version() == NAMES[args.tls]
                    ciphers.add(tls.cipher()[0])
                    was_resumed = tls.session_reused
                    if args.resume == "on":
                        session = tls.session
        except OSError:
            bad += 1
            continue
        end = time.monotonic()
        if end > deadline:
            late += 1
            break
        status = status_of(b"".join(chunks))
        if not ok_version or not 200 <= status < 300:
            bad += 1
        resumed += was_resumed
        latencies.append(int((end - start) * 1e6))
    out.append((latencies, bad, resumed, late, ciphers))


def process(args, keys, offset, threads, deadline, queue):
    url = urllib.parse.urlsplit(args.url)
    host = url.netloc
    out = []
    pool = []
    for t in range(threads):
        start = (offset + t) * len(keys) // args.clients
        rotated = keys[start:] + keys[:start]
        requests = [request_for(k, host, url.path or "/", args.origin) for k in rotated]
        pool.append(threading.Thread(target=worker, args=(args, requests, deadline, out)))
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    queue.put(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("keys")
    p.add_argument("origin")
    p.add_argument("--tls", choices=sorted(VERSIONS), required=True)
    p.add_argument("--resume", choices=["on", "off"], required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    if args.clients < 1 or args.processes < 1 or args.seconds <= 0:
        sys.exit("--clients and --processes must be at least 1 and --seconds above 0")
    with open(args.keys) as f:
        keys = [line.strip() for line in f if line.strip()]
    if not keys:
        sys.exit(f"{args.keys}: no keys (one key a line expected)")
    processes = min(args.processes, args.clients)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    deadline = time.monotonic() + args.seconds
    children, offset = [], 0
    for n in range(processes):
        threads = args.clients // processes + (1 if n < args.clients % processes else 0)
        child = ctx.Process(target=process, args=(args, keys, offset, threads, deadline, queue))
        child.start()
        children.append(child)
        offset += threads
    results = [r for _ in children for r in queue.get()]
    for child in children:
        child.join()
    latencies = sorted(x for r in results for x in r[0])
    bad = sum(r[1] for r in results)
    resumed = sum(r[2] for r in results)
    late = sum(r[3] for r in results)
    ciphers = ",".join(sorted(set().union(*(r[4] for r in results)))) or "-"
    if latencies:
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    else:
        p50 = p99 = 0
    print(f"RESULT rps={len(latencies) / args.seconds:.1f} p50_us={p50} p99_us={p99} bad={bad} "
          f"requests={len(latencies)} resumed={resumed} late={late} ciphers={ciphers}")


if __name__ == "__main__":
    main()
