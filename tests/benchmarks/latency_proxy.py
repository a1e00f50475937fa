"""A stand-in for a remote service: an HTTP reverse proxy on 127.0.0.1 that adds a fixed latency
in front of a local server (the skyrl Tinker server, the local Messages server).

Every request waits `latency` seconds, then is forwarded as is (method, path, headers, body) and
the upstream's reply is returned as is. Each request has its own thread, so concurrent requests
overlap their latency the way requests to a distant service do.

    with LatencyProxy("http://127.0.0.1:8123", latency=1.0) as proxy:
        os.environ["TINKER_BASE_URL"] = proxy.url
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}


class _Server(ThreadingHTTPServer):
    # many clients connect at the same moment (concurrency 32 and more): the default listen
    # backlog of 5 refuses some of them, and their SDKs retry after a back-off
    request_queue_size = 256


class LatencyProxy:
    def __init__(self, upstream: str, latency: float) -> None:
        target = urlsplit(upstream)
        if target.hostname != "127.0.0.1":
            raise ValueError(f"latency proxy: only 127.0.0.1 upstreams ({upstream})")
        host, port = target.hostname, target.port or 80
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                outer.requests += 1
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                time.sleep(latency)  # the simulated distance to the service
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn = http.client.HTTPConnection(host, port, timeout=600)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()


class ProxyProcess:
    """`LatencyProxy` in its own process: for benchmarks whose client runs in this process (the
    SDK's threads would otherwise share one GIL with the proxy's, which a distant service does
    not). Same use: `url`, `requests` (asked of the child), a context manager."""

    def __init__(self, upstream: str, latency: float) -> None:
        import subprocess
        import sys

        self._proc = subprocess.Popen(
            [sys.executable, __file__, upstream, str(latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in, self._out = self._proc.stdin, self._proc.stdout
        self.url = self._out.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"latency proxy process: no URL ({self.url!r})")

    @property
    def requests(self) -> int:
        self._in.write("count\n")
        self._in.flush()
        return int(self._out.readline())

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._in.close()
        self._proc.wait(timeout=30)


def _serve(upstream: str, latency: float) -> None:
    """The child of `ProxyProcess`: prints its URL, answers `count` lines with the number of
    requests so far, stops at the end of stdin."""
    import sys

    with LatencyProxy(upstream, latency) as proxy:
        print(proxy.url, flush=True)
        for line in sys.stdin:
            if line.strip() == "count":
                print(proxy.requests, flush=True)


if __name__ == "__main__":
    import sys

    _serve(sys.argv[1], float(sys.argv[2]))
