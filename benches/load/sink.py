#!/usr/bin/env python3
"""The upload sink of the load benchmark: an HTTP/1.1 server that reads every request body to its
last byte (Content-Length or chunked) and only then answers 200 with the upstream's small JSON
body, on keep-alive connections, one thread per connection.

    sink.py PORT

The benchmark's upstream nginx relays /api/v1/video/upload/ here, unbuffered, so a gateway's
upload is answered only once the whole body went through it, and every gateway carries exactly
the same bytes. `GET /bytes` answers the count of body bytes read so far, which run.sh compares
with the uploads the client saw succeed. Listens on 127.0.0.1 only.
"""
import http.server
import sys
import threading

RESPONSE = b'{"status":"accepted","job_id":"bench"}'
CHUNK = 1 << 20


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.total += n


received = Counter()


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.buffer = memoryview(bytearray(CHUNK))

    def discard(self, n: int) -> bool:
        """Reads and drops n body bytes; False when the connection ends first."""
        while n > 0:
            got = self.rfile.readinto(self.buffer[: min(n, CHUNK)])
            if not got:
                return False
            n -= got
            received.add(got)
        return True

    def read_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    return False
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return True
                if not self.discard(size) or self.rfile.readline(8) not in (b"\r\n", b"\n"):
                    return False
        length = self.headers.get("Content-Length", "0")
        return length.isdigit() and self.discard(int(length))

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if not self.read_body():
            self.close_connection = True
            self.send_error(400, "request body cut short or badly framed")
            return
        self.answer(RESPONSE)

    do_PUT = do_POST

    def do_GET(self) -> None:
        if self.path == "/bytes":
            with received.lock:
                total = received.total
            self.answer(str(total).encode())
        else:
            self.answer(RESPONSE)

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
