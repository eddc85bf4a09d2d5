#!/usr/bin/env python3
"""Local EC2 Instance Connect endpoint for the Plugin Delivery test stack.

Speaks the AWS JSON 1.1 protocol the SDKs use for SendSSHPublicKey, checks
the instance against EC2 (moto) with DescribeInstances, and drops accepted
keys into a directory that the sshd hosts read through their
AuthorizedKeysCommand (see eic-authorized-keys).

    python3 eic_emulator.py --port 5001 --keys-dir DIR \
        --ec2-endpoint http://127.0.0.1:5000

An accepted key is written to
    DIR/<instance-id>/<os-user>/<expiry-epoch>-<random>.pub
and is honoured for 60 seconds, like the service's.

Test-control endpoints (plain JSON, never reached by an AWS SDK):
    POST /_emulator/throttle  {"count": N[, "instance_id": "i-..."]}
    GET  /_emulator/calls
    POST /_emulator/reset     [{"keys": true}]
    GET  /_emulator/health

Only the standard library and boto3 are used.
"""

import argparse
import base64
import json
import os
import re
import secrets
import struct
import sys
import threading
import time
import urllib.parse
import uuid

import stack_server
from aws_json_http import JSON_CT, ApiError, AwsJsonHandler

try:
    import boto3
    import botocore.config
    import botocore.exceptions
except ImportError:  # pragma: no cover - fall back to the repo's venv
    stack_server.run_in_venv(
        __file__, "eic-emulator: boto3 is not installed (run tests/stack/stack.sh install)")

SERVICE = "eic-emulator"
TARGET_PREFIX = "AWSEC2InstanceConnectService."
KEY_VALIDITY_SECONDS = 60
# Expired key files are removed once they are this old (seconds past expiry).
PRUNE_GRACE_SECONDS = 300

# Constraints from the service model (ec2-instance-connect 2018-04-02).
INSTANCE_ID_RE = re.compile(r"^i-[a-f0-9]+$")
OS_USER_RE = re.compile(
    r"(^[A-Za-z_][A-Za-z0-9@._-]{0,30}[A-Za-z0-9$_-]?$)"
    r"|(^(?=.{2,32}$)[0-9]{1,32}[A-Za-z@._-][A-Za-z0-9@._-]*[A-Za-z0-9$_-]?$)")
AZ_RE = re.compile(r"^(\w+-){2,3}\d+\w+$")
REGION_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")

ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": ("nistp256", 65),
    "ecdsa-sha2-nistp384": ("nistp384", 97),
    "ecdsa-sha2-nistp521": ("nistp521", 133),
}
MIN_RSA_BITS = 2048


log = stack_server.make_log(SERVICE)


# --------------------------------------------------------------------------
# SSH public key validation
# --------------------------------------------------------------------------

def _read_string(blob, pos):
    if pos + 4 > len(blob):
        raise ValueError("truncated key blob")
    (length,) = struct.unpack(">I", blob[pos:pos + 4])
    pos += 4
    if pos + length > len(blob):
        raise ValueError("truncated key blob")
    return blob[pos:pos + length], pos + length


def parse_public_key(text):
    """Return the normalised "<type> <base64>" line, or raise ValueError."""
    if not isinstance(text, str):
        raise ValueError("SSHPublicKey must be a string")
    line = text.strip()
    if "\n" in line or "\r" in line or "\0" in line:
        raise ValueError("SSHPublicKey must be a single line")
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("SSHPublicKey is not an OpenSSH public key line")
    key_type, b64 = fields[0], fields[1]
    if key_type not in ("ssh-ed25519", "ssh-rsa") and key_type not in ECDSA_CURVES:
        raise ValueError("unsupported key type")
    try:
        blob = base64.b64decode(b64, validate=True)
    except (ValueError, TypeError):
        raise ValueError("key data is not valid base64")
    inner_type, pos = _read_string(blob, 0)
    if inner_type != key_type.encode():
        raise ValueError("key data does not match key type")
    if key_type == "ssh-ed25519":
        point, pos = _read_string(blob, pos)
        if len(point) != 32:
            raise ValueError("bad ed25519 key length")
    elif key_type == "ssh-rsa":
        exponent, pos = _read_string(blob, pos)
        modulus, pos = _read_string(blob, pos)
        if not exponent or not modulus:
            raise ValueError("bad RSA key")
        bits = int.from_bytes(modulus, "big").bit_length()
        if bits < MIN_RSA_BITS:
            raise ValueError("RSA key must be at least %d bits" % MIN_RSA_BITS)
    else:
        curve, point_len = ECDSA_CURVES[key_type]
        name, pos = _read_string(blob, pos)
        if name != curve.encode():
            raise ValueError("ECDSA curve does not match key type")
        point, pos = _read_string(blob, pos)
        if len(point) != point_len or point[0] != 4:
            raise ValueError("bad ECDSA point")
    if pos != len(blob):
        raise ValueError("trailing data in key blob")
    return "%s %s" % (key_type, b64)


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------

class State:
    def __init__(self, keys_dir, ec2_endpoint, default_region):
        self.keys_dir = keys_dir
        self.ec2_endpoint = ec2_endpoint
        self.default_region = default_region
        self.lock = threading.Lock()
        self.clients = {}
        self.reset_counters()

    def reset_counters(self):
        with self.lock:
            self.calls = 0
            self.ok = 0
            self.errors = {}
            self.by_instance = {}
            self.throttle_all = 0
            self.throttle_instance = {}

    def ec2(self, region):
        with self.lock:
            client = self.clients.get(region)
            if client is None:
                client = boto3.session.Session().client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self.ec2_endpoint,
                    aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                    aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
                    config=botocore.config.Config(
                        connect_timeout=3, read_timeout=10,
                        retries={"max_attempts": 2, "mode": "standard"}),
                )
                self.clients[region] = client
            return client

    def count_call(self, instance_id):
        """Count a SendSSHPublicKey call; return True if it must be throttled."""
        with self.lock:
            self.calls += 1
            per = self.by_instance.setdefault(instance_id or "", {"calls": 0, "ok": 0})
            per["calls"] += 1
            left = self.throttle_instance.get(instance_id, 0)
            if left > 0:
                self.throttle_instance[instance_id] = left - 1
                return True
            if self.throttle_all > 0:
                self.throttle_all -= 1
                return True
            return False

    def count_result(self, instance_id, error_name):
        with self.lock:
            if error_name is None:
                self.ok += 1
                self.by_instance.setdefault(instance_id or "", {"calls": 0, "ok": 0})["ok"] += 1
            else:
                self.errors[error_name] = self.errors.get(error_name, 0) + 1

    def snapshot(self):
        with self.lock:
            return {
                "send_ssh_public_key": self.calls,
                "send_ssh_public_key_ok": self.ok,
                "errors": dict(self.errors),
                "by_instance": {k: dict(v) for k, v in self.by_instance.items() if k},
                "throttle_pending": self.throttle_all,
                "throttle_pending_by_instance": {
                    k: v for k, v in self.throttle_instance.items() if v > 0},
            }


# --------------------------------------------------------------------------
# Key files
# --------------------------------------------------------------------------

def _mkdir_public(path):
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    os.chmod(path, 0o755)


def store_key(keys_dir, instance_id, os_user, key_line, now):
    expiry = int(now) + KEY_VALIDITY_SECONDS
    inst_dir = os.path.join(keys_dir, instance_id)
    user_dir = os.path.join(inst_dir, os_user)
    _mkdir_public(inst_dir)
    _mkdir_public(user_dir)
    name = "%d-%s.pub" % (expiry, secrets.token_hex(8))
    tmp = os.path.join(user_dir, ".tmp-" + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, (key_line + "\n").encode())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(user_dir, name))
    return expiry


def prune_keys(keys_dir, now, everything=False):
    """Delete expired key files (or all of them); return how many went."""
    removed = 0
    limit = now - PRUNE_GRACE_SECONDS
    try:
        instances = os.listdir(keys_dir)
    except FileNotFoundError:
        return 0
    for inst in instances:
        inst_dir = os.path.join(keys_dir, inst)
        if not os.path.isdir(inst_dir):
            continue
        for user in os.listdir(inst_dir):
            user_dir = os.path.join(inst_dir, user)
            if not os.path.isdir(user_dir):
                continue
            for name in os.listdir(user_dir):
                head = name.split("-", 1)[0]
                stale = everything or (head.isdigit() and int(head) < limit)
                if stale and name.endswith(".pub"):
                    try:
                        os.unlink(os.path.join(user_dir, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
    return removed


# --------------------------------------------------------------------------
# SendSSHPublicKey
# --------------------------------------------------------------------------

def _require_string(body, name):
    value = body.get(name)
    if value is None:
        raise ApiError("InvalidArgsException", "%s is required" % name)
    if not isinstance(value, str):
        raise ApiError("InvalidArgsException", "%s must be a string" % name)
    return value


def send_ssh_public_key(state, body, region):
    instance_id = _require_string(body, "InstanceId")
    os_user = _require_string(body, "InstanceOSUser")
    key = _require_string(body, "SSHPublicKey")
    az = body.get("AvailabilityZone")

    if not (10 <= len(instance_id) <= 32) or not INSTANCE_ID_RE.match(instance_id):
        raise ApiError("InvalidArgsException", "Invalid instance ID: %s" % instance_id)
    if not (1 <= len(os_user) <= 32) or not OS_USER_RE.match(os_user) \
            or os_user in (".", ".."):
        raise ApiError("InvalidArgsException", "Invalid OS user")
    if not (80 <= len(key) <= 4096):
        raise ApiError("InvalidArgsException",
                       "SSHPublicKey length must be between 80 and 4096 characters")
    try:
        key_line = parse_public_key(key)
    except ValueError as exc:
        raise ApiError("InvalidArgsException",
                       "Invalid input parameter received: SSH public key is invalid (%s)" % exc)
    if az is not None:
        if not isinstance(az, str) or not (6 <= len(az) <= 32) or not AZ_RE.match(az):
            raise ApiError("InvalidArgsException", "Invalid availability zone")

    try:
        resp = state.ec2(region).describe_instances(InstanceIds=[instance_id])
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code.startswith("InvalidInstanceID"):
            raise ApiError("EC2InstanceNotFoundException",
                           "Instance %s not found" % instance_id)
        log("ec2 DescribeInstances failed: %s" % code)
        raise ApiError("ServiceException", "Internal error looking up the instance", 500)
    except botocore.exceptions.BotoCoreError as exc:
        log("ec2 DescribeInstances failed: %s" % type(exc).__name__)
        raise ApiError("ServiceException", "Internal error looking up the instance", 500)

    instances = [i for r in resp.get("Reservations", []) for i in r.get("Instances", [])
                 if i.get("InstanceId") == instance_id]
    if not instances:
        raise ApiError("EC2InstanceNotFoundException", "Instance %s not found" % instance_id)
    inst = instances[0]
    inst_az = inst.get("Placement", {}).get("AvailabilityZone")
    if az is not None and inst_az and az != inst_az:
        raise ApiError("EC2InstanceNotFoundException",
                       "Instance %s not found in %s" % (instance_id, az))
    status = inst.get("State", {}).get("Name", "")
    if status == "pending":
        raise ApiError("EC2InstanceUnavailableException",
                       "Instance %s is not yet available" % instance_id, 503)
    if status != "running":
        raise ApiError("EC2InstanceStateInvalidException",
                       "Instance %s is in state %s" % (instance_id, status))

    now = time.time()
    expiry = store_key(state.keys_dir, instance_id, os_user, key_line, now)
    prune_keys(state.keys_dir, now)
    return expiry


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class Handler(AwsJsonHandler):
    server_version = "eic-emulator"

    # --- routes ---------------------------------------------------------

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        state = self.server.state
        if path == "/_emulator/calls":
            self._send(200, state.snapshot(), "application/json")
        elif path == "/_emulator/health":
            self._send(200, {"service": SERVICE, "ok": True,
                             "keys_dir": state.keys_dir,
                             "ec2_endpoint": state.ec2_endpoint,
                             "key_validity_seconds": KEY_VALIDITY_SECONDS},
                       "application/json")
        else:
            self._send(404, {"message": "not found"}, "application/json")
            return
        log("GET %s 200" % path)

    def _log(self, msg):
        log(msg)

    def _control(self, path, raw):
        state = self.server.state
        try:
            body = json.loads(raw.decode() or "{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            self._send(400, {"message": "body must be a JSON object"}, "application/json")
            log("POST %s 400" % path)
            return
        if path == "/_emulator/throttle":
            count = body.get("count")
            instance_id = body.get("instance_id")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                self._send(400, {"message": "count must be a non-negative integer"},
                           "application/json")
                log("POST %s 400" % path)
                return
            with state.lock:
                if instance_id:
                    state.throttle_instance[str(instance_id)] = count
                else:
                    state.throttle_all = count
            self._send(200, {"ok": True, "count": count, "instance_id": instance_id},
                       "application/json")
            log("POST %s 200 count=%d instance=%s" % (path, count, instance_id or "*"))
        elif path == "/_emulator/reset":
            state.reset_counters()
            removed = 0
            if body.get("keys") is True:
                removed = prune_keys(state.keys_dir, time.time(), everything=True)
            self._send(200, {"ok": True, "keys_removed": removed}, "application/json")
            log("POST %s 200 keys_removed=%d" % (path, removed))
        else:
            self._send(404, {"message": "not found"}, "application/json")
            log("POST %s 404" % path)

    def _aws(self, raw, started):
        state = self.server.state
        request_id = str(uuid.uuid4())
        target = self.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        auth = self.headers.get("Authorization", "")
        match = REGION_RE.search(auth)
        region = match.group(1) if match else state.default_region

        if operation != "SendSSHPublicKey":
            err = ApiError("UnknownOperationException",
                           "Operation %s is not supported by this emulator" % (target or "<none>"))
            self._send_aws_error(err, request_id)
            log("POST / target=%s status=%d error=%s" % (target or "-", err.status, err.name))
            return

        try:
            body = json.loads(raw.decode() or "{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            state.count_call(None)
            err = ApiError("SerializationException", "Request body is not a JSON object")
            state.count_result(None, err.name)
            self._send_aws_error(err, request_id)
            log("SendSSHPublicKey status=400 error=%s" % err.name)
            return

        instance_id = body.get("InstanceId") if isinstance(body.get("InstanceId"), str) else None
        os_user = body.get("InstanceOSUser") if isinstance(body.get("InstanceOSUser"), str) else None
        desc = "instance=%s user=%s region=%s" % (instance_id, os_user, region)
        if state.count_call(instance_id):
            err = ApiError("ThrottlingException", "Rate exceeded")
            state.count_result(instance_id, err.name)
            self._send_aws_error(err, request_id)
            log("SendSSHPublicKey %s status=400 error=%s (injected) request=%s"
                % (desc, err.name, request_id))
            return
        try:
            expiry = send_ssh_public_key(state, body, region)
        except ApiError as err:
            state.count_result(instance_id, err.name)
            self._send_aws_error(err, request_id)
            log("SendSSHPublicKey %s status=%d error=%s request=%s %.0fms"
                % (desc, err.status, err.name, request_id, (time.time() - started) * 1000))
            return
        except Exception as exc:  # keep serving; report like the service would
            err = ApiError("ServiceException", "Internal error", 500)
            state.count_result(instance_id, err.name)
            self._send_aws_error(err, request_id)
            log("SendSSHPublicKey %s status=500 error=%s (%s) request=%s"
                % (desc, err.name, type(exc).__name__, request_id))
            return
        state.count_result(instance_id, None)
        self._send(200, {"RequestId": request_id, "Success": True}, JSON_CT,
                   {"x-amzn-RequestId": request_id})
        log("SendSSHPublicKey %s status=200 expiry=%d request=%s %.0fms"
            % (desc, expiry, request_id, (time.time() - started) * 1000))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Local EC2 Instance Connect emulator")
    stack_server.add_listen_args(parser, 5001)
    parser.add_argument("--keys-dir", required=True)
    parser.add_argument("--ec2-endpoint", default="http://127.0.0.1:5000")
    parser.add_argument("--region", default=None,
                        help="region for EC2 look-ups when a request is unsigned "
                             "(default: $AWS_REGION, $AWS_DEFAULT_REGION or us-east-1)")
    args = parser.parse_args(argv)

    stack_server.check_loopback_host(parser, args.host)
    if not stack_server.is_loopback_url(args.ec2_endpoint):
        parser.error("--ec2-endpoint must point at a loopback address")

    # Never let botocore look for credentials or regions off this machine.
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    region = (args.region or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")

    keys_dir = os.path.abspath(args.keys_dir)
    os.makedirs(keys_dir, exist_ok=True)
    os.chmod(keys_dir, 0o755)

    state = State(keys_dir, args.ec2_endpoint.rstrip("/"), region)
    server = stack_server.Server((args.host, args.port), Handler)
    server.state = state
    banner = ("listening on http://%s:%d keys_dir=%s ec2_endpoint=%s region=%s"
              % (args.host, args.port, keys_dir, state.ec2_endpoint, region))
    stack_server.serve(server, banner, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
