#!/usr/bin/env python3
"""moto's server, with the expiry of presigned (SigV4 query-string) URLs enforced.

moto serves presigned S3 URLs forever: it never looks at X-Amz-Date or
X-Amz-Expires. This launcher serves the same WSGI app as the `moto_server`
command (DomainDispatcherApplication(create_backend_app), werkzeug's
run_simple with threads and moto's request handler) behind a small
middleware that answers the way S3 does:

  - query string with X-Amz-Expires not an integer in 1..604800, or an
    X-Amz-Date that is not yyyymmddTHHMMSSZ, or a SigV4 query signature
    missing either of them:
        400 AuthorizationQueryParametersError
  - now > X-Amz-Date + X-Amz-Expires:
        403 AccessDenied "Request has expired"
  - SigV2 query authentication (AWSAccessKeyId, Signature, Expires) with
    now > Expires: the same 403

Everything else (including /moto-api/) goes to moto untouched. The
signature itself is not checked (moto does not check it either).

    python3 moto_server.py -H 127.0.0.1 -p 5000

GET /_stack/moto-wrapper answers {"service": "moto-wrapper", ...} so the
stack scripts can tell this launcher from a plain moto_server.
"""

import argparse
import calendar
import json
import os
import re
import signal
import sys
import time
import urllib.parse
import uuid
from xml.sax.saxutils import escape

import stack_server

try:
    from werkzeug.serving import run_simple
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
except ImportError:  # pragma: no cover - fall back to the repo's venv
    stack_server.run_in_venv(
        __file__, "moto_server.py: moto[server] is not installed (run tests/stack/stack.sh install)")

SERVICE = "moto-wrapper"
WRAPPER_PATH = "/_stack/moto-wrapper"
MAX_EXPIRES = 604800  # seven days, S3's limit for SigV4 presigned URLs
AMZ_DATE_RE = re.compile(r"^\d{8}T\d{6}Z$")
SIGV4_MARKERS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature",
                 "X-Amz-SignedHeaders")


log = stack_server.make_log(SERVICE)


def _iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class PresignExpiry:
    """WSGI middleware: S3's checks of SigV4 query-string authentication."""

    def __init__(self, app, clock=time.time):
        self.app = app
        self.clock = clock
        self.rejected = 0

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == WRAPPER_PATH:
            return self._json(start_response, {"service": SERVICE, "ok": True,
                                               "presign_expiry": True,
                                               "max_expires": MAX_EXPIRES,
                                               "rejected": self.rejected})
        query = environ.get("QUERY_STRING", "")
        if "X-Amz-" in query or "Signature=" in query:
            verdict = self._check(urllib.parse.parse_qs(query, keep_blank_values=True))
            if verdict is not None:
                self.rejected += 1
                status, code, message, extra = verdict
                log("%s %s -> %s %s (%s)" % (environ.get("REQUEST_METHOD"),
                                            environ.get("PATH_INFO"), status, code, message))
                return self._xml_error(environ, start_response, status, code, message, extra)
        return self.app(environ, start_response)

    def _check(self, params):
        """None if the request may go on, else (status, code, message, extra)."""
        v2_expires = params.get("Expires", [None])[0]
        if v2_expires is not None and "AWSAccessKeyId" in params and "Signature" in params:
            # SigV2 query authentication: Expires is an absolute epoch second.
            if not re.match(r"^\d+$", v2_expires):
                return ("403 Forbidden", "AccessDenied", "Invalid date (should be seconds "
                        "since epoch): %s" % v2_expires, [])
            now = self.clock()
            if int(now) > int(v2_expires):
                return ("403 Forbidden", "AccessDenied", "Request has expired",
                        [("Expires", _iso(int(v2_expires))), ("ServerTime", _iso(now))])
            return None
        date = params.get("X-Amz-Date", [None])[0]
        expires = params.get("X-Amz-Expires", [None])[0]
        signed = any(k in params for k in SIGV4_MARKERS)
        if date is None and expires is None:
            return None
        if expires is None or date is None:
            if not signed and expires is None:
                return None  # an X-Amz-Date alone is not a presigned URL
            return ("400 Bad Request", "AuthorizationQueryParametersError",
                    "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                    "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
                    "and X-Amz-Expires parameters.", [])
        if not re.match(r"^-?\d+$", expires):
            return ("400 Bad Request", "AuthorizationQueryParametersError",
                    "X-Amz-Expires should be a number", [])
        seconds = int(expires)
        if seconds < 1:
            return ("400 Bad Request", "AuthorizationQueryParametersError",
                    "X-Amz-Expires must be non-negative", [])
        if seconds > MAX_EXPIRES:
            return ("400 Bad Request", "AuthorizationQueryParametersError",
                    "X-Amz-Expires must be less than a week (in seconds) that is; "
                    "%d seconds" % MAX_EXPIRES, [])
        if not AMZ_DATE_RE.match(date):
            return ("400 Bad Request", "AuthorizationQueryParametersError",
                    "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"",
                    [])
        try:
            signed_at = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            return ("400 Bad Request", "AuthorizationQueryParametersError",
                    "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"",
                    [])
        now = self.clock()
        if int(now) > signed_at + seconds:
            return ("403 Forbidden", "AccessDenied", "Request has expired",
                    [("X-Amz-Expires", str(seconds)),
                     ("Expires", _iso(signed_at + seconds)),
                     ("ServerTime", _iso(now))])
        return None

    @staticmethod
    def _json(start_response, payload):
        data = json.dumps(payload).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data)))])
        return [data]

    @staticmethod
    def _xml_error(environ, start_response, status, code, message, extra):
        request_id = uuid.uuid4().hex[:16].upper()
        fields = "".join("<%s>%s</%s>" % (k, escape(v), k) for k, v in extra)
        data = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                "<Error><Code>%s</Code><Message>%s</Message>%s"
                "<RequestId>%s</RequestId><HostId>%s</HostId></Error>"
                % (code, escape(message), fields, request_id, uuid.uuid4().hex)).encode()
        headers = [("Content-Type", "application/xml"),
                   ("x-amz-request-id", request_id)]
        if environ.get("REQUEST_METHOD") == "HEAD":
            start_response(status, headers + [("Content-Length", "0")])
            return [b""]
        start_response(status, headers + [("Content-Length", str(len(data)))])
        return [data]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="moto server with presigned-URL expiry enforced")
    stack_server.add_listen_args(parser, int(os.environ.get("MOTO_PORT", 5000)), short=True)
    args = parser.parse_args(argv)
    stack_server.check_loopback_host(parser, args.host)

    # moto builds some URLs (e.g. SQS queue URLs) from MOTO_PORT.
    os.environ.setdefault("MOTO_PORT", str(args.port))
    stack_server.exit_on(signal.SIGINT, signal.SIGTERM)

    moto_app = DomainDispatcherApplication(create_backend_app)
    moto_app.debug = True
    log("serving moto on http://%s:%d (presigned URL expiry enforced)" % (args.host, args.port))
    run_simple(args.host, args.port, PresignExpiry(moto_app), threaded=True,
               use_reloader=False, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
