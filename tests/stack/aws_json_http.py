"""HTTP plumbing shared by the stack's AWS emulators (EC2 Instance Connect,
SSM): request bodies (plain or chunked, capped at 1 MiB), JSON responses,
errors the way AWS JSON 1.1 services send them (`__type` in the body and
`x-amzn-ErrorType` in the headers, which is what the SDKs read), and POST
routing: `/` is the AWS API (`_aws`), `/_emulator/...` the test controls
(`_control`); subclasses provide both and `_log`.

Standard library only.
"""

import json
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

JSON_CT = "application/x-amz-json-1.1"
MAX_BODY = 1 << 20


class ApiError(Exception):
    """An error answered the way the service answers it."""

    def __init__(self, name, message, status=400):
        super().__init__(message)
        self.name = name
        self.message = message
        self.status = status


class AwsJsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aws-emulator"

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler API
        pass  # one line per call is written by the handlers themselves

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline(65537)
                if len(data) > MAX_BODY:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status, payload, content_type, extra=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_aws_error(self, err, request_id):
        """`err` is an ApiError (or has its `status`, `name` and `message`)."""
        self._send(err.status, {"__type": err.name, "message": err.message}, JSON_CT,
                   {"x-amzn-ErrorType": err.name, "x-amzn-RequestId": request_id})

    def do_POST(self):
        started = time.time()
        path = urllib.parse.urlsplit(self.path).path
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(413, {"message": "bad body"}, "application/json")
            return
        if path.startswith("/_emulator/"):
            self._control(path, raw)
        elif path == "/":
            self._aws(raw, started)
        else:
            self._send(404, {"message": "not found"}, "application/json")
            self._log("POST %s 404" % path)

