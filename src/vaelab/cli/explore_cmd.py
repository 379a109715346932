"""`vaelab explore`: write the run's offline latent-space explorer, and optionally serve it."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from vaelab.cli import add_json_flag, example, print_json, shown


def add_parser(sub) -> None:
    p = sub.add_parser(
        "explore",
        help="write an interactive latent-space explorer (one offline HTML file)",
        description="Write RUN/explorer.html: one self-contained page with the model's weights "
        "inside that decodes and encodes in the browser, offline. Drag a point over the test "
        "set's latent means, move sliders, draw a digit to encode it, interpolate between two "
        "points. Unconditional MLP models with a Bernoulli decoder (the seed's family) only. "
        "--serve also serves the page over HTTP (it opens no browser).",
        epilog=example(
            "vaelab explore runs/seed\n"
            "vaelab explore runs/seed --serve --port 8000\n"
            "vaelab explore runs/seed --out /tmp/seed.html --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by vaelab train")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default RUN/explorer.html)")
    p.add_argument("--serve", action="store_true", help="serve the page over HTTP until Ctrl-C")
    p.add_argument("--host", help="address to serve on, IPv4 or IPv6 (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to serve on (default 0: a free one)")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.errors import ConfigError
    from vaelab.explorer import PAGE, write_explorer

    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError(f"option --port: must be in 0..65535, got {args.port}")
    if not args.serve and (args.port is not None or args.host is not None):
        option = "--port" if args.port is not None else "--host"
        raise ConfigError(f"option {option}: has no effect without --serve")
    host, port = args.host or "127.0.0.1", args.port or 0
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"option --out: {out} must end in .html")
    if not args.serve:
        path = write_explorer(args.run_dir, out)
        if args.json:
            print_json({"out": str(path), "bytes": path.stat().st_size})
        else:
            print(shown(f"wrote {path}"))
        return 0

    # the address first: a port in use or an unknown host is refused before the page is written
    server = make_server(out or Path(args.run_dir) / PAGE, host, port)
    try:
        path = write_explorer(args.run_dir, out)
    except BaseException:
        server.server_close()
        raise
    host, port = server.server_address[:2]
    url = f"http://{_url_host(host)}:{port}/"
    if args.json:
        print_json({"out": str(path), "bytes": path.stat().st_size, "url": url})
    else:
        print(shown(f"wrote {path}"))
        print(shown(f"serving it at {url} (Ctrl-C stops)"))
    sys.stdout.flush()
    # Ctrl-C and SIGTERM stop it, also where SIGINT came in ignored (a job started with `&`)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
    return 0


def _stop(signum, frame):
    raise KeyboardInterrupt


def make_server(path: Path, host: str, port: int):
    """An HTTP server that answers GET / (and /NAME.html) with `path` and 404 otherwise.

    On a loopback address it answers only requests addressed to this machine (a Host header
    of localhost or a loopback address such as 127.0.0.1): a web page elsewhere that points its
    own name at 127.0.0.1 (DNS rebinding) is refused. An idle connection is closed after 30 s.
    """
    import http.server
    import ipaddress
    import socket

    from vaelab.errors import ConfigError

    name = "/" + path.name
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 30  # seconds an idle connection is kept

        def do_GET(self):  # noqa: N802 (the http.server API)
            self._answer(body=True)

        def do_HEAD(self):  # noqa: N802
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            if loopback and not _addressed_here(self.headers.get("Host")):
                asked = self.headers.get("Host")
                print(shown(f"vaelab explore: refused a request for host {asked} (only localhost and "
                            "loopback addresses are served)"), file=sys.stderr)
                self.send_error(403, "this server answers only requests for localhost or a loopback address")
                return
            if self.path.split("?")[0] not in ("/", name):
                self.send_error(404, "only the explorer is served here")
                return
            try:
                data = path.read_bytes()  # read per request: a rewritten file is served fresh
            except OSError as e:
                print(shown(f"vaelab explore: {path}: cannot be read ({e.strerror or e})"), file=sys.stderr)
                self.send_error(404, "the explorer page is gone; write it again with vaelab explore")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 (quiet: the page is one file)
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # (--host ::1)

    try:
        server = Server((host, port), Handler)
    except OSError as e:
        reason = e.strerror or e
        raise ConfigError(f"option --host/--port: cannot serve on {host}:{port} ({reason})") from None
    server.daemon_threads = True
    return server


def _addressed_here(header: str | None) -> bool:
    """Whether a request's Host header names this machine: localhost or a loopback address."""
    import ipaddress

    if header is None:  # (HTTP/1.0 sends none)
        return True
    if header.startswith("[") and "]" in header:  # [IPv6]:port
        hostname = header[1:header.index("]")]
    else:  # name:port, or a bare IPv6 address
        hostname = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    hostname = hostname.lower().rstrip(".")
    if hostname == "localhost":
        return True
    try:  # an address typed as such cannot be a rebound name
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
