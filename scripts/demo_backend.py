#!/usr/bin/env python3
"""A demo backend for scripts/run: answers every request with its own name,
the path it was asked for, and the headers ELB added."""
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        length = int(self.headers.get("Content-Length") or 0)
        received = len(self.rfile.read(length)) if length else 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                received += size
                self.rfile.read(size + 2)
                if size == 0:
                    break
        body = (
            f"hello from {self.server.name}: {self.path}\n"
            f"X-Real-IP: {self.headers.get('X-Real-IP')}\n"
            f"body bytes: {received}\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port, name = int(sys.argv[1]), sys.argv[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.name = name
    server.serve_forever()
