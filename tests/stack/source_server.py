#!/usr/bin/env python3
"""Stand-in for GitHub's tarball endpoint and for https archive hosts.

Serves the plugin-source tests of Plugin Delivery over TLS on loopback:

    python3 source_server.py --port 0 --root DIR --tls-dir TLS [--plain-port 0]

TLS must hold server.pem and server.key (tests/stack/make-test-ca.sh TLS);
clients trust TLS/ca.pem. Once listening, the ports are written to
DIR/ports.json (or --ports-file) and printed as one JSON line on stdout.

Routes (the same on the https and the optional plain-http listener):

    GET /repos/{owner}/{repo}/tarball[/{ref}]    GitHub API: 302 to codeload
    GET /codeload/{owner}/{repo}/tar.gz/{ref}    the tarball (gzip'd pax tar)
    GET /files/{path}                            DIR/files/{path}
    GET /redirect/{path}                         302 to https .../files/{path}
    GET /redirect-to-http/{path}                 302 to http://...:Q/files/{path}
    GET /slow/{path}                             DIR/files/{path}, 1 byte per
                                                 --slow-interval seconds
    GET /_server/health, /_server/requests       for the tests themselves

Fixture layout under DIR:

    github/{owner}/{repo}/refs/{ref}/...   the tree of {ref}; a ref with '/'
                                           is nested dirs (refs/release/v1/)
    github/{owner}/{repo}/refs/{ns}/.not-a-ref
                                           marks {ns} as a mere namespace:
                                           asking for ref {ns} gives 404
    github/{owner}/{repo}/commits          lines "<40-hex sha> <ref>"
    github/{owner}/{repo}/token            private repo: this token required
    github/{owner}/{repo}/default_branch   ref used when none is given (main)
    files/{path}                           static archives for https sources

HEAD works wherever GET does. Only the standard library is used.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socketserver
import ssl
import stat
import sys
import tarfile
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler

import stack_server

PROG = "source-server"
HOST = stack_server.LOOPBACK

# Every entry of a generated tarball carries this mtime, so the same fixture
# always yields the same bytes (2024-01-01T00:00:00Z).
TAR_MTIME = 1704067200

GITHUB_DOC_URL = "https://docs.github.com/rest/repos/contents#download-a-repository-archive-tar"
NAMESPACE_MARKER = ".not-a-ref"

# GitHub owner and repository names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SHA_RE = re.compile(r"^[0-9a-fA-F]{40}$")

# Requests remembered for GET /_server/requests (oldest dropped first).
MAX_RECORDED = 10000


log = stack_server.make_log(PROG, stamped=False)


class NotFound(Exception):
    """The resource does not exist (or must look as if it did not)."""


def safe_join(base, segments):
    """base/seg1/seg2/..., or NotFound if a segment could escape base."""
    for seg in segments:
        if seg in ("", ".", "..") or "/" in seg or "\\" in seg or "\0" in seg:
            raise NotFound()
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
            raise NotFound()
    path = os.path.join(base, *segments)
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    if real != real_base and not real.startswith(real_base + os.sep):
        raise NotFound()
    return path


def split_path(raw):
    """'/a/b%2Fc/d' -> ['a', 'b/c', 'd']: split first, then percent-decode."""
    return [urllib.parse.unquote(s) for s in raw.split("/")[1:]]


# --------------------------------------------------------------------------
# GitHub fixtures


class Repo:
    def __init__(self, root, owner, repo):
        if not NAME_RE.match(owner) or not NAME_RE.match(repo):
            raise NotFound()
        self.owner = owner
        self.repo = repo
        self.dir = safe_join(root, ["github", owner, repo])
        if not os.path.isdir(self.dir):
            raise NotFound()

    def _read(self, name):
        try:
            with open(os.path.join(self.dir, name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def token(self):
        raw = self._read("token")
        return None if raw is None else raw.strip()

    def default_branch(self):
        raw = self._read("default_branch")
        return (raw or "").strip() or "main"

    def commits(self):
        """[(sha, ref)] from the commits file, in file order."""
        raw = self._read("commits") or ""
        out = []
        for line in raw.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) == 2 and SHA_RE.match(parts[0]):
                out.append((parts[0].lower(), parts[1].strip()))
        return out

    def _ref_dir(self, ref):
        path = safe_join(os.path.join(self.dir, "refs"), ref.split("/"))
        if not os.path.isdir(path) or os.path.exists(os.path.join(path, NAMESPACE_MARKER)):
            raise NotFound()
        return path

    def resolve(self, ref):
        """(tree dir, commit sha) for a ref name or a listed commit sha.

        The commit sha is the one asked for, else the first one the commits
        file lists for the ref, else sha1("owner/repo/ref"). A 40-hex ref is
        looked up in the commits file first, then as a directory refs/<hex>/.
        """
        if not ref:
            raise NotFound()
        commits = self.commits()
        if SHA_RE.match(ref):
            for sha, name in commits:
                if sha == ref.lower():
                    return self._ref_dir(name), sha
            return self._ref_dir(ref), ref.lower()
        tree = self._ref_dir(ref)
        for sha, name in commits:
            if name == ref:
                return tree, sha
        fake = hashlib.sha1(f"{self.owner}/{self.repo}/{ref}".encode()).hexdigest()
        return tree, fake


def authorized(token, header):
    """True if the Authorization header carries `token` (Bearer or token)."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token"):
        return False
    return bool(token) and value.strip() == token


def auth_kind(header):
    """What kind of Authorization was sent, for logs (never the value)."""
    if header is None:
        return None
    scheme = header.strip().partition(" ")[0].lower()
    return scheme if scheme in ("bearer", "token", "basic") else "other"


def git_mode(st_mode):
    return 0o755 if st_mode & 0o111 else 0o644


def build_tarball(tree, prefix, commit):
    """gzip'd pax tar of `tree` under one top-level directory `prefix/`.

    Like GitHub's: a pax global header comment=<commit>, a directory entry
    for every directory, git's modes (0755 / 0644), symlinks kept as
    symlinks (their targets untouched), uid/gid 0. Deterministic.
    """
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT,
                          pax_headers={"comment": commit}) as tar:

            def info(name, kind, mode, size=0, link=""):
                ti = tarfile.TarInfo(name)
                ti.type = kind
                ti.mode = mode
                ti.size = size
                ti.linkname = link
                ti.mtime = TAR_MTIME
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                return ti

            def walk(path, name):
                tar.addfile(info(name, tarfile.DIRTYPE, 0o755))
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
                for e in entries:
                    child = f"{name}/{e.name}"
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        tar.addfile(info(child, tarfile.SYMTYPE, 0o777, link=os.readlink(e.path)))
                    elif stat.S_ISDIR(st.st_mode):
                        walk(e.path, child)
                    elif stat.S_ISREG(st.st_mode):
                        with open(e.path, "rb") as f:
                            data = f.read()
                        tar.addfile(info(child, tarfile.REGTYPE, git_mode(st.st_mode), len(data)),
                                    io.BytesIO(data))
                    # Sockets, fifos, devices: git has no such thing.

            walk(tree, prefix)
    return raw.getvalue()


# --------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "source-server"
    # Idle keep-alive connections and stalled clients are dropped after this.
    timeout = 30
    # Headers and body go out in separate writes; do not let Nagle delay them.
    disable_nagle_algorithm = True

    # -- plumbing -----------------------------------------------------------

    def version_string(self):
        return self.server_version

    def handle_one_request(self):
        self._status = None
        self._sent = 0
        self._note = ""
        self._start = time.monotonic()
        self.requestline = ""
        self.command = None
        self.path = ""
        self.headers = None
        try:
            super().handle_one_request()
        finally:
            if self.requestline or self._status is not None:
                self._log_request_line()

    def log_request(self, code="-", size="-"):
        # Called by send_response; the line is written once the request is done.
        try:
            self._status = int(code)
        except (TypeError, ValueError):
            self._status = code

    def log_error(self, fmt, *args):
        # Folded into the request's one line (idle keep-alive timeouts vanish).
        self._note = (fmt % args)[:200]

    def log_message(self, fmt, *args):
        log(f"[{self.server.scheme}] {self.client_address[0]} {fmt % args}")

    def _log_request_line(self):
        app = self.server.app
        path = self.path or ""
        shown, _, query = path.partition("?")
        if query:
            shown += "?…"  # query values are never logged
        header = self.headers.get("Authorization") if self.headers is not None else None
        kind = auth_kind(header)
        ms = (time.monotonic() - self._start) * 1000
        note = f" {self._note}" if self._note else ""
        log(f"[{self.server.scheme}] {self.client_address[0]} {self.command or '-'} {shown or '-'}"
            f" -> {self._status if self._status is not None else '-'} {self._sent}B"
            f" auth={kind or 'none'} {ms:.0f}ms{note}")
        app.record({
            "scheme": self.server.scheme,
            "method": self.command,
            "path": shown,
            "status": self._status,
            "bytes": self._sent,
            "auth": kind,
            "note": self._note or None,
        })

    def _reply(self, code, body=b"", ctype="text/plain; charset=utf-8", headers=(), head=None):
        head = self.command == "HEAD" if head is None else head
        self.send_response(code)
        if body or code not in (204, 304):
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)
            self._sent += len(body)

    def _json(self, code, obj, headers=()):
        body = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        self._reply(code, body, "application/json; charset=utf-8", headers)

    def _github_404(self):
        self._json(404, {"message": "Not Found", "documentation_url": GITHUB_DOC_URL,
                         "status": "404"})

    def _redirect(self, location):
        body = f"Found. Redirecting to {location}\n".encode()
        self._reply(302, body, headers=[("Location", location)])

    # -- routing ------------------------------------------------------------

    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route()

    def _route(self):
        raw_path = urllib.parse.urlsplit(self.path).path
        segs = split_path(raw_path)
        try:
            if segs[:1] == ["repos"]:
                return self._github_api(segs[1:])
            if segs[:1] == ["codeload"]:
                return self._codeload(segs[1:])
            if segs[:1] == ["files"]:
                return self._file(segs[1:], slow=False)
            if segs[:1] == ["slow"]:
                return self._file(segs[1:], slow=True)
            if segs[:1] == ["redirect"]:
                rest = raw_path[len("/redirect"):]
                return self._redirect(f"{self.server.app.https_base}/files{rest}")
            if segs[:1] == ["redirect-to-http"]:
                return self._redirect_to_http(raw_path[len("/redirect-to-http"):])
            if segs[:1] == ["_server"]:
                return self._control(segs[1:])
        except NotFound:
            pass
        if segs[:1] == ["repos"]:
            return self._github_404()
        self._reply(404, b"404: Not Found\n")

    # /repos/{owner}/{repo}/tarball[/{ref...}]
    def _github_api(self, segs):
        if len(segs) < 3 or segs[2] != "tarball":
            raise NotFound()
        repo = Repo(self.server.app.root, segs[0], segs[1])
        if not authorized(repo.token(), self.headers.get("Authorization")):
            self._note = "private repo, no valid token"
            raise NotFound()
        ref = "/".join(segs[3:]).strip("/") or repo.default_branch()
        repo.resolve(ref)  # 404 here, like GitHub, not at codeload
        location = (f"{self.server.app.https_base}/codeload/"
                    f"{urllib.parse.quote(repo.owner)}/{urllib.parse.quote(repo.repo)}/tar.gz/"
                    f"{urllib.parse.quote(ref, safe='/')}")
        self._redirect(location)

    # /codeload/{owner}/{repo}/tar.gz/{ref...}
    def _codeload(self, segs):
        if len(segs) < 4 or segs[2] != "tar.gz":
            raise NotFound()
        repo = Repo(self.server.app.root, segs[0], segs[1])
        ref = "/".join(segs[3:]).strip("/")
        tree, commit = repo.resolve(ref)
        prefix = f"{repo.owner}-{repo.repo}-{commit[:7]}"
        body = build_tarball(tree, prefix, commit)
        self._note = f"commit={commit}"
        self._reply(200, body, "application/x-gzip", headers=[
            ("Content-Disposition", f"attachment; filename={prefix}.tar.gz"),
            ("ETag", f'"{hashlib.sha256(body).hexdigest()}"'),
        ])

    # /files/{path}, /slow/{path}
    def _file(self, segs, slow):
        path = safe_join(os.path.join(self.server.app.root, "files"), segs)
        if not os.path.isfile(path):
            raise NotFound()
        with open(path, "rb") as f:
            body = f.read()
        if not slow:
            return self._reply(200, body, "application/gzip")
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        if self.command == "HEAD":
            return
        interval = self.server.app.slow_interval
        stopping = self.server.app.stopping
        try:
            for i in range(len(body)):
                if stopping.wait(interval):
                    self._note = "slow: server stopping"
                    self.close_connection = True
                    return
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                self._sent += 1
        except (OSError, ValueError):
            self._note = f"slow: client left after {self._sent} of {len(body)} bytes"
            self.close_connection = True

    # /redirect-to-http/{path}
    def _redirect_to_http(self, rest):
        base = self.server.app.http_base
        if base is None:
            self._note = "no --plain-port"
            return self._reply(500, b"source-server: started without --plain-port\n")
        self._redirect(f"{base}/files{rest}")

    # /_server/...
    def _control(self, segs):
        app = self.server.app
        if segs == ["health"]:
            return self._json(200, {"service": PROG, "root": app.root, **app.ports()})
        if segs == ["requests"]:
            return self._json(200, {"requests": app.recorded()})
        raise NotFound()


class Server(stack_server.Server):
    request_queue_size = 64

    def __init__(self, app, port, tls_context):
        self.app = app
        self.tls_context = tls_context
        self.scheme = "https" if tls_context else "http"
        super().__init__((HOST, port), Handler)

    def server_bind(self):
        # HTTPServer.server_bind would look the host name up (getfqdn).
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, in the connection's own thread, so a
        # client that never speaks cannot hold up the accept loop.
        if self.tls_context is None:
            return self._serve(request, client_address)
        request.settimeout(10)
        try:
            conn = self.tls_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log(f"[https] {client_address[0]} TLS handshake failed: {e}")
            request.close()
            return
        try:
            self._serve(conn, client_address)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _serve(self, conn, client_address):
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except (ConnectionError, ssl.SSLError, TimeoutError) as e:
            log(f"[{self.scheme}] {client_address[0]} connection ended: {type(e).__name__}")

    def handle_error(self, request, client_address):
        log(f"[{self.scheme}] {client_address[0]} internal error:")
        traceback.print_exc(file=sys.stderr)


class App:
    def __init__(self, root, slow_interval):
        self.root = root
        self.slow_interval = slow_interval
        self.stopping = threading.Event()
        self.https_port = None
        self.http_port = None
        self._lock = threading.Lock()
        self._requests = []

    @property
    def https_base(self):
        return f"https://{HOST}:{self.https_port}"

    @property
    def http_base(self):
        return None if self.http_port is None else f"http://{HOST}:{self.http_port}"

    def ports(self):
        return {
            "port": self.https_port,
            "plain_port": self.http_port,
            "https_url": self.https_base,
            "http_url": self.http_base,
            "pid": os.getpid(),
        }

    def record(self, entry):
        with self._lock:
            self._requests.append(entry)
            if len(self._requests) > MAX_RECORDED:
                del self._requests[: len(self._requests) - MAX_RECORDED]

    def recorded(self):
        with self._lock:
            return list(self._requests)


def tls_context(tls_dir):
    cert = os.path.join(tls_dir, "server.pem")
    key = os.path.join(tls_dir, "server.key")
    for f in (cert, key):
        if not os.path.isfile(f):
            raise SystemExit(f"{PROG}: {f} is missing (run tests/stack/make-test-ca.sh {tls_dir})")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def write_atomically(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def remove_if_ours(path):
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="source_server.py",
        description="HTTPS stand-in for GitHub tarballs and archive hosts (loopback only).")
    p.add_argument("--port", type=int, required=True, help="https port on 127.0.0.1 (0: any free port)")
    p.add_argument("--root", required=True, help="fixture directory (github/, files/)")
    p.add_argument("--tls-dir", required=True, help="directory with server.pem and server.key")
    p.add_argument("--plain-port", type=int, help="also serve plain http on this port (0: any free port)")
    p.add_argument("--ports-file", help="where to write the ports (default: ROOT/ports.json)")
    p.add_argument("--slow-interval", type=float, default=1.0,
                   help="seconds between the bytes of /slow/ bodies (default 1)")
    args = p.parse_args(argv)
    for name in ("port", "plain_port"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 65535:
            p.error(f"--{name.replace('_', '-')} must be 0..65535")
    if args.slow_interval < 0:
        p.error("--slow-interval must not be negative")
    return args


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        raise SystemExit(f"{PROG}: --root {root} is not a directory")
    ports_file = os.path.abspath(args.ports_file or os.path.join(root, "ports.json"))
    ctx = tls_context(args.tls_dir)

    # A stale file from an earlier run must not be mistaken for ours.
    try:
        os.unlink(ports_file)
    except FileNotFoundError:
        pass

    app = App(root, args.slow_interval)
    servers = []
    try:
        https = Server(app, args.port, ctx)
        servers.append(https)
        app.https_port = https.server_port
        if args.plain_port is not None:
            plain = Server(app, args.plain_port, None)
            servers.append(plain)
            app.http_port = plain.server_port
    except OSError as e:
        for s in servers:
            s.server_close()
        raise SystemExit(f"{PROG}: cannot listen: {e}")

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2},
                                name=f"serve-{s.scheme}", daemon=True) for s in servers]
    for t in threads:
        t.start()

    info = json.dumps(app.ports())
    write_atomically(ports_file, info + "\n")
    log(f"listening on {app.https_base}"
        + (f" and {app.http_base}" if app.http_base else "") + f", root {root}")
    try:
        sys.stdout.write(info + "\n")
        sys.stdout.flush()
    except OSError:
        pass  # nobody reads stdout; ports.json is there

    while not stop.wait(0.5):
        pass

    app.stopping.set()
    for s in servers:
        s.shutdown()
        s.server_close()
    remove_if_ours(ports_file)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
