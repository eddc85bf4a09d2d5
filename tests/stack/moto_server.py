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

Fault injection (the fault campaign, tests/support/faults.rs): a share of
the requests signed with one access key, to the services named, is answered
with the errors S3 and EC2 send under load (500 InternalError, 503 SlowDown
for S3, 503 RequestLimitExceeded and 500 InternalError for EC2) instead of
reaching moto. Only that key's requests are touched, so a campaign never
disturbs the tests running beside it.

    POST   /_stack/faults {"access_key": k, "services": ["s3", "ec2"],
                           "rate": 0.3, "seed": 7}    start (replaces a plan)
    GET    /_stack/faults                             what was injected
    DELETE /_stack/faults                             stop; what was injected
"""

import argparse
import calendar
import json
import os
import random
import re
import signal
import sys
import threading
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
FAULTS_PATH = "/_stack/faults"
CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/[^/]+/[^/]+/([^/]+)/aws4_request")
S3_FAULTS = [("500 Internal Server Error", "InternalError",
              "We encountered an internal error. Please try again."),
             ("503 Slow Down", "SlowDown", "Please reduce your request rate.")]
EC2_FAULTS = [("500 Internal Server Error", "InternalError",
               "An internal error has occurred."),
              ("503 Service Unavailable", "RequestLimitExceeded", "Request limit exceeded.")]
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
                                               "fault_injection": True,
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
    def _json(start_response, payload, status="200 OK"):
        data = json.dumps(payload).encode()
        start_response(status, [("Content-Type", "application/json"),
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


def credential(environ):
    """(access key, service) of a SigV4 request, header or query signed."""
    found = CREDENTIAL_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if found:
        return found.group(1), found.group(2)
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    scope = query.get("X-Amz-Credential", [""])[0].split("/")
    if len(scope) == 5:
        return scope[0], scope[3]
    return None, None


class FaultInjector:
    """WSGI middleware: S3 and EC2 errors for a share of one key's requests."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.plan = None
        self.rng = random.Random()
        self.injected = {}
        self.passed = 0

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == FAULTS_PATH:
            return self._control(environ, start_response)
        plan = self.plan
        if plan is not None:
            key, service = credential(environ)
            if key == plan["access_key"] and service in plan["services"]:
                with self.lock:
                    hit = self.rng.random() < plan["rate"]
                    fault = self.rng.choice(S3_FAULTS if service == "s3" else EC2_FAULTS)
                    if hit:
                        name = "%s %s %s" % (service, fault[0].split()[0], fault[1])
                        self.injected[name] = self.injected.get(name, 0) + 1
                    else:
                        self.passed += 1
                if hit:
                    return self._error(environ, start_response, service, fault)
        return self.app(environ, start_response)

    def _report(self):
        return {"injected": dict(self.injected), "passed": self.passed,
                "active": self.plan is not None}

    def _control(self, environ, start_response):
        method = environ.get("REQUEST_METHOD")
        with self.lock:
            if method == "POST":
                try:
                    size = int(environ.get("CONTENT_LENGTH") or 0)
                    plan = json.loads(environ["wsgi.input"].read(size))
                    seed = plan.get("seed")
                    plan = {"access_key": str(plan["access_key"]),
                            "services": [str(s) for s in plan["services"]],
                            "rate": float(plan["rate"])}
                except (KeyError, ValueError, TypeError) as e:
                    return PresignExpiry._json(start_response, {"error": str(e)},
                                               "400 Bad Request")
                self.rng = random.Random(seed)
                self.plan = plan
                self.injected, self.passed = {}, 0
                log("faults on for key %s: %s at rate %.2f" % (
                    plan["access_key"], ",".join(plan["services"]), plan["rate"]))
            elif method == "DELETE":
                self.plan = None
                log("faults off: %s" % json.dumps(self.injected, sort_keys=True))
            return PresignExpiry._json(start_response, self._report())

    @staticmethod
    def _error(environ, start_response, service, fault):
        status, code, message = fault
        request_id = uuid.uuid4().hex[:16].upper()
        if service == "s3":
            data = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
                    "<Message>%s</Message><RequestId>%s</RequestId></Error>"
                    % (code, message, request_id)).encode()
        else:
            data = ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                    "<Code>%s</Code><Message>%s</Message></Error></Errors>"
                    "<RequestID>%s</RequestID></Response>" % (code, message, request_id)).encode()
        # The request body is not read: drain it so the connection stays usable.
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            if size:
                environ["wsgi.input"].read(size)
        except (ValueError, OSError):
            pass
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
        if environ.get("REQUEST_METHOD") == "HEAD":
            data = b""
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
    run_simple(args.host, args.port, FaultInjector(PresignExpiry(moto_app)), threaded=True,
               use_reloader=False, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
