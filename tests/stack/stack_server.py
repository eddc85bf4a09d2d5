"""Server scaffolding shared by the stack's local servers (moto_server.py,
eic_emulator.py, ssm_emulator.py, source_server.py), so each of them holds
only what it serves: the move into the repo's .venv when a third-party
import fails, the threading HTTP server, the loopback-only checks of --host
and of endpoint URLs, the --host/--port arguments, the serve-until-stopped
loop and the stderr log lines.

Standard library only: the servers import it before boto3, moto or werkzeug.
"""

import ipaddress
import os
import signal
import sys
import time
import urllib.parse
from http.server import ThreadingHTTPServer

LOOPBACK = "127.0.0.1"
VENV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".venv")


def run_in_venv(script, missing):
    """Re-run `script` with the repo's .venv python, after an ImportError.

    Call it from the `except ImportError` of the script's third-party
    imports. Already in the venv (or no venv): write `missing` and exit 2.
    A venv's python is a symlink to the system one, so the prefixes are
    compared, not the binaries.
    """
    python = os.path.join(VENV, "bin", "python3")
    if os.path.exists(python) and os.path.realpath(sys.prefix) != os.path.realpath(VENV):
        os.execv(python, [python, os.path.abspath(script)] + sys.argv[1:])
    sys.stderr.write(missing + "\n")
    sys.exit(2)


def make_log(name, stamped=True):
    """log(msg) writing "<UTC time> <name> <msg>", or "<name>: <msg>" unstamped."""

    def log(msg):
        if stamped:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            sys.stderr.write("%s %s %s\n" % (stamp, name, msg))
        else:
            sys.stderr.write("%s: %s\n" % (name, msg))
        sys.stderr.flush()

    return log


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def is_loopback_url(url):
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_listen_args(parser, port, short=False):
    """--host (loopback, default 127.0.0.1) and --port; -H/-p too if `short`."""
    parser.add_argument(*(("-H", "--host") if short else ("--host",)),
                        default=LOOPBACK, help="loopback address to bind")
    parser.add_argument(*(("-p", "--port") if short else ("--port",)),
                        type=int, default=port)


def check_loopback_host(parser, host):
    try:
        if not ipaddress.ip_address(host).is_loopback:
            parser.error("--host must be a loopback address")
    except ValueError:
        parser.error("--host must be an IP address")


def exit_on(*signums):
    """Turn these signals into SystemExit(0), so `finally` blocks run."""

    def handler(signum, frame):
        raise SystemExit(0)

    for signum in signums:
        signal.signal(signum, handler)


def serve(server, banner, log, on_stop=None):
    """Log `banner`, serve until interrupted, then on_stop() and close."""
    log(banner)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if on_stop is not None:
            on_stop()
        server.server_close()
