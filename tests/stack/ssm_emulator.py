#!/usr/bin/env python3
"""Local AWS Systems Manager Run Command endpoint and agent for the test stack.

Speaks the AWS JSON 1.1 protocol (POST /, X-Amz-Target: AmazonSSM.<Op>) the
SDKs use, implements SendCommand, CancelCommand, GetCommandInvocation and
DescribeInstanceInformation itself, and runs the AWS-RunShellScript commands
on this machine the way the SSM agent does, for every "instance" registered
as an agent through the control endpoints. Every other SSM operation
(GetParameter, PutParameter, ...) is relayed verbatim to moto.

    python3 ssm_emulator.py --port 5002 --state-dir DIR \
        --moto-endpoint http://127.0.0.1:5000

A delivered command is written to
    DIR/<instance-id>/orchestration/<command-id>/awsrunShellScript/0.awsrunShellScript/_script.sh
and run there as `/bin/sh _script.sh` (new session, stdin /dev/null, clean
environment), with its full output in `stdout` / `stderr` next to it.

Test-control endpoints (plain JSON, never reached by an AWS SDK):
    POST   /_emulator/agents   {"instance_id": "i-...", "ping": "Online",
                                "execution_timeout_cap": null, "start_delay": 0}
    DELETE /_emulator/agents/<instance-id>
    GET    /_emulator/agents
    POST   /_emulator/throttle {"operation": "GetCommandInvocation", "count": N}
    GET    /_emulator/calls
    GET    /_emulator/commands[/<command-id>]
    POST   /_emulator/reset    [{"agents": true}]
    GET    /_emulator/health

Only the standard library is used. Command text is never logged: it may
carry presigned URLs.
"""

import argparse
import base64
import datetime
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import stack_server
from aws_json_http import JSON_CT, ApiError, AwsJsonHandler

SERVICE = "ssm-emulator"
TARGET_PREFIX = "AmazonSSM."

DOCUMENT_NAME = "AWS-RunShellScript"
DOCUMENT_VERSIONS = ("$DEFAULT", "$LATEST", "1")
PLUGIN_NAME = "aws:runShellScript"
PLUGIN_DIR = "awsrunShellScript"
STEP_DIR = "0.awsrunShellScript"
SCRIPT_NAME = "_script.sh"
DOCUMENT_PARAMETERS = ("commands", "workingDirectory", "executionTimeout")

# What GetCommandInvocation returns of the output (characters, per the API
# reference: "the first 24,000 characters written by the plugin to stdout").
MAX_STDOUT_CHARS = 24000
MAX_STDERR_CHARS = 8000

DEFAULT_EXECUTION_TIMEOUT = 3600
MAX_EXECUTION_TIMEOUT = 172800
DEFAULT_DELIVERY_TIMEOUT = 3600
MIN_DELIVERY_TIMEOUT = 30
MAX_DELIVERY_TIMEOUT = 2592000
MAX_COMMENT = 100
MAX_INSTANCE_IDS = 50
# Like the agent (executers_unix.go killProcess), a stopped script's process
# group gets SIGKILL at once: no trap in the script ever runs.

# The Linux agent reports a script it stopped (execution timeout or cancel) with
# this exit code: appconfig.CommandStoppedPreemptivelyExitCode = 137 ("fatal
# error (128) + SIGKILL (9)") in amazon-ssm-agent's executers_unix.go; its
# ExecuteCommand sets it on both the timeout and the cancel path, and GetStatus
# maps 137 to TimedOut (or Cancelled when the cancel flag is set).
STOPPED_PREEMPTIVELY_EXIT_CODE = 137
# -1: not finished / never started (the API reference's meaning of -1); also
# what Go's WaitStatus.ExitStatus() gives for a script killed by a signal that
# the agent did not send.
NO_RESPONSE_CODE = -1

AGENT_VERSION = "3.3.1142.0"
PING_STATUSES = ("Online", "ConnectionLost", "Inactive")
INSTANCE_ID_RE = re.compile(r"^(i-(\w{8}|\w{17})|mi-\w{17})$")
REGION_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")
EXECUTION_TIMEOUT_RE = re.compile(r"^[1-9][0-9]{0,5}$")

CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TERMINAL = ("Success", "Failed", "TimedOut", "Cancelled")

# Run Command operations that moto would answer from its own, unrelated
# state: refused loudly instead of being forwarded.
NOT_EMULATED = ("ListCommands", "ListCommandInvocations")


log = stack_server.make_log(SERVICE)


def epoch(t):
    """Timestamp as the awsJson1_1 protocol sends it: epoch seconds."""
    return round(t, 3)


def iso(t):
    if t is None:
        return ""
    dt = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)


def elapsed(start, end):
    if start is None:
        return ""
    return "PT%.3fS" % max(0.0, (end if end is not None else time.time()) - start)


def read_head(path, max_chars):
    """The first max_chars characters of a file (UTF-8, bad bytes replaced)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_chars * 4 + 4)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[:max_chars]


def _mkdir_private(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _group_alive(pgid):
    """True while a process of the group is alive (zombies do not count: they
    wait for whoever reaps orphans here, which can take a while)."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = None
    if pids is None:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for pid in pids:
        try:
            with open("/proc/%s/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parens.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------

class Agent:
    def __init__(self, instance_id, now):
        self.instance_id = instance_id
        self.ping = "Online"
        self.execution_timeout_cap = None
        self.start_delay = 0.0
        self.registered = now
        self.last_ping = now

    def ping_time(self, now):
        return now if self.ping == "Online" else self.last_ping

    def to_json(self, now):
        return {"instance_id": self.instance_id, "ping": self.ping,
                "execution_timeout_cap": self.execution_timeout_cap,
                "start_delay": self.start_delay,
                "registered": epoch(self.registered),
                "last_ping": epoch(self.ping_time(now))}


class Invocation:
    def __init__(self, command, instance_id):
        self.command = command
        self.instance_id = instance_id
        self.status = "Pending"
        self.details = "Pending"
        self.response_code = NO_RESPONSE_CODE
        self.deliver_at = None      # set once the agent is Online (+ start_delay)
        self.started = None
        self.ended = None
        self.pid = None
        self.cancel_requested = False
        self.stop_reason = None     # "timeout" | "cancel" once we signalled it
        self.execution_timeout = None
        self.stdout_content = ""
        self.stderr_content = ""
        self.wake = threading.Event()
        self.dir = None

    @property
    def terminal(self):
        return self.status in TERMINAL

    def to_debug(self):
        d = self.dir
        return {"instance_id": self.instance_id, "status": self.status,
                "status_details": self.details, "response_code": self.response_code,
                "pid": self.pid, "pgid": self.pid,
                "started": epoch(self.started) if self.started else None,
                "ended": epoch(self.ended) if self.ended else None,
                "execution_timeout": self.execution_timeout,
                "cancel_requested": self.cancel_requested,
                "stop_reason": self.stop_reason,
                "dir": d,
                "script": os.path.join(d, SCRIPT_NAME) if d else None,
                "stdout": os.path.join(d, "stdout") if d else None,
                "stderr": os.path.join(d, "stderr") if d else None}


class Command:
    def __init__(self, command_id, body, instance_ids, parameters, execution_timeout,
                 timeout_seconds, region, now):
        self.id = command_id
        self.comment = body.get("Comment") or ""
        self.document_version = body.get("DocumentVersion") or "$DEFAULT"
        self.output_bucket = body.get("OutputS3BucketName") or ""
        self.output_prefix = body.get("OutputS3KeyPrefix") or ""
        self.parameters = parameters
        self.instance_ids = instance_ids
        self.execution_timeout = execution_timeout
        self.timeout_seconds = timeout_seconds
        self.region = region
        self.requested = now
        self.invocations = {i: Invocation(self, i) for i in instance_ids}

    def status(self):
        """The command's overall status, from its invocations'."""
        statuses = [inv.status for inv in self.invocations.values()]
        if any(s == "InProgress" for s in statuses):
            return "InProgress"
        if all(s == "Pending" for s in statuses):
            return "Pending"
        if not all(s in TERMINAL for s in statuses):
            return "InProgress"
        for s in ("TimedOut", "Failed", "Cancelled"):
            if any(x == s for x in statuses):
                return s
        return "Success"

    def to_api(self):
        invs = self.invocations.values()
        done = [i for i in invs if i.terminal]
        status = self.status()
        return {
            "CommandId": self.id,
            "DocumentName": DOCUMENT_NAME,
            "DocumentVersion": self.document_version,
            "Comment": self.comment,
            "ExpiresAfter": epoch(self.requested + self.timeout_seconds),
            "Parameters": self.parameters,
            "InstanceIds": list(self.instance_ids),
            "Targets": [],
            "RequestedDateTime": epoch(self.requested),
            "Status": status,
            "StatusDetails": status,
            "OutputS3Region": self.region,
            "OutputS3BucketName": self.output_bucket,
            "OutputS3KeyPrefix": self.output_prefix,
            "MaxConcurrency": "50",
            "MaxErrors": "0",
            "TargetCount": len(self.instance_ids),
            "CompletedCount": len(done),
            "ErrorCount": len([i for i in done if i.status in ("Failed", "TimedOut")
                               and i.details != "DeliveryTimedOut"]),
            "DeliveryTimedOutCount": len([i for i in done if i.details == "DeliveryTimedOut"]),
            "ServiceRole": "",
            "NotificationConfig": {"NotificationArn": "", "NotificationEvents": [],
                                   "NotificationType": ""},
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "",
                                       "CloudWatchOutputEnabled": False},
            "TimeoutSeconds": self.timeout_seconds,
        }


class State:
    def __init__(self, state_dir, moto_endpoint, default_region):
        self.state_dir = state_dir
        self.moto_endpoint = moto_endpoint
        self.default_region = default_region
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.agents = {}
        self.commands = {}
        self.stopping = False
        self.reset_counters()

    def reset_counters(self):
        with self.lock:
            self.operations = {}
            self.errors = {}
            self.send_commands = []
            self.throttles = {}

    # --- calls / throttles ------------------------------------------------

    def count_call(self, operation):
        """Count a call; return the injected ApiError if it must fail."""
        with self.lock:
            self.operations[operation] = self.operations.get(operation, 0) + 1
            pending = self.throttles.get(operation)
            if pending and pending["count"] > 0:
                pending["count"] -= 1
                return ApiError(pending["error"], pending["message"], pending["status"])
            return None

    def count_error(self, name):
        with self.lock:
            self.errors[name] = self.errors.get(name, 0) + 1

    def calls_snapshot(self):
        with self.lock:
            return {
                "operations": dict(self.operations),
                "errors": dict(self.errors),
                "send_command": [dict(c) for c in self.send_commands],
                "throttle_pending": {op: t["count"] for op, t in self.throttles.items()
                                     if t["count"] > 0},
            }

    # --- the agent loop ---------------------------------------------------

    def kick(self):
        with self.cond:
            self.cond.notify_all()

    def scheduler(self):
        """Delivers pending invocations and times out undelivered ones."""
        while True:
            to_start = []
            with self.cond:
                if self.stopping:
                    return
                now = time.time()
                next_due = now + 1.0
                for command in self.commands.values():
                    for inv in command.invocations.values():
                        if inv.status != "Pending":
                            continue
                        deadline = command.requested + command.timeout_seconds
                        if now >= deadline:
                            self._finish_locked(inv, "TimedOut", "DeliveryTimedOut",
                                                NO_RESPONSE_CODE, now)
                            log("delivery timed out command=%s instance=%s"
                                % (command.id, inv.instance_id))
                            continue
                        next_due = min(next_due, deadline)
                        agent = self.agents.get(inv.instance_id)
                        if agent is None or agent.ping != "Online":
                            inv.deliver_at = None
                            continue
                        if inv.deliver_at is None:
                            inv.deliver_at = now + agent.start_delay
                        if now >= inv.deliver_at:
                            cap = agent.execution_timeout_cap
                            timeout = command.execution_timeout
                            if cap is not None:
                                timeout = min(timeout, cap)
                            inv.execution_timeout = timeout
                            inv.status = "InProgress"
                            inv.details = "InProgress"
                            inv.started = now
                            to_start.append(inv)
                        else:
                            next_due = min(next_due, inv.deliver_at)
                if not to_start:
                    self.cond.wait(timeout=max(0.01, next_due - time.time()))
            for inv in to_start:
                threading.Thread(target=self._run, args=(inv,), daemon=True,
                                 name="invocation-%s-%s" % (inv.command.id, inv.instance_id)
                                 ).start()

    def _finish_locked(self, inv, status, details, code, now):
        inv.status = status
        inv.details = details
        inv.response_code = code
        if inv.started is not None:
            inv.ended = now
        if inv.dir is not None:
            inv.stdout_content = read_head(os.path.join(inv.dir, "stdout"), MAX_STDOUT_CHARS)
            inv.stderr_content = read_head(os.path.join(inv.dir, "stderr"), MAX_STDERR_CHARS)
        inv.wake.set()

    def _finish(self, inv, status, details, code):
        with self.lock:
            self._finish_locked(inv, status, details, code, time.time())
        log("finished command=%s instance=%s status=%s details=%s code=%d"
            % (inv.command.id, inv.instance_id, status, details, code))

    def _child_env(self, inv):
        return {
            "PATH": CHILD_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            # The agent adds these two to every script's environment.
            "AWS_SSM_INSTANCE_ID": inv.instance_id,
            "AWS_SSM_REGION_NAME": inv.command.region,
        }

    def _run(self, inv):
        command = inv.command
        step_dir = os.path.join(self.state_dir, inv.instance_id, "orchestration",
                                command.id, PLUGIN_DIR, STEP_DIR)
        try:
            for d in (os.path.join(self.state_dir, inv.instance_id),
                      os.path.join(self.state_dir, inv.instance_id, "orchestration"),
                      os.path.join(self.state_dir, inv.instance_id, "orchestration", command.id),
                      os.path.join(self.state_dir, inv.instance_id, "orchestration",
                                   command.id, PLUGIN_DIR),
                      step_dir):
                _mkdir_private(d)
            script = os.path.join(step_dir, SCRIPT_NAME)
            fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
            try:
                os.fchmod(fd, 0o700)
                # The agent's CreateScriptFile: commands joined by "\n", plus "\n".
                os.write(fd, ("\n".join(command.parameters["commands"]) + "\n").encode())
            finally:
                os.close(fd)
            out_path = os.path.join(step_dir, "stdout")
            err_path = os.path.join(step_dir, "stderr")
            for p in (out_path, err_path):
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        except OSError as exc:
            log("cannot prepare command=%s instance=%s: %s"
                % (command.id, inv.instance_id, exc.strerror))
            self._finish(inv, "Failed", "Failed", 1)
            return
        with self.lock:
            inv.dir = step_dir
            cancelled = inv.cancel_requested
        if cancelled:
            self._finish(inv, "Cancelled", "Cancelled", NO_RESPONSE_CODE)
            return

        cwd = step_dir
        work_dir = (command.parameters.get("workingDirectory") or [""])[0]
        if work_dir:
            if not os.path.isdir(work_dir):
                with open(err_path, "a") as f:
                    f.write("Invalid workingDirectory %s, directory doesn't exist.\n" % work_dir)
                self._finish(inv, "Failed", "Failed", 1)
                return
            cwd = work_dir

        try:
            proc = subprocess.Popen(
                ["/bin/sh", script if work_dir else SCRIPT_NAME],
                cwd=cwd, env=self._child_env(inv), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True)
        except OSError as exc:
            with open(err_path, "a") as f:
                f.write("failed to run commands: %s\n" % exc.strerror)
            self._finish(inv, "Failed", "Failed", 1)
            return
        with self.lock:
            inv.pid = proc.pid
        log("started command=%s instance=%s pid=%d execution_timeout=%gs"
            % (command.id, inv.instance_id, proc.pid, inv.execution_timeout))

        # Like the agent's Go writers: the invocation ends when the shell has
        # exited AND everything holding its stdout/stderr has closed them (a
        # background job that keeps them open keeps the command InProgress).
        copiers = [threading.Thread(target=_copy_stream, args=(proc.stdout, out_path), daemon=True),
                   threading.Thread(target=_copy_stream, args=(proc.stderr, err_path), daemon=True)]
        for t in copiers:
            t.start()

        deadline = inv.started + inv.execution_timeout
        killed = False
        while True:
            exited = proc.poll() is not None
            with self.lock:
                reason = inv.stop_reason
                cancel = inv.cancel_requested
            if reason is None:
                if exited and not any(t.is_alive() for t in copiers):
                    break
                if cancel or time.time() >= deadline:
                    reason = "cancel" if cancel else "timeout"
                    with self.lock:
                        inv.stop_reason = reason
                        if reason == "cancel":
                            inv.status = inv.details = "Cancelling"
                    _signal_group(proc.pid, signal.SIGKILL)
                    killed = True
                    log("stopping command=%s instance=%s pid=%d (%s): SIGKILL"
                        % (command.id, inv.instance_id, proc.pid, reason))
            else:
                group_alive = _group_alive(proc.pid)
                if exited and (killed or not group_alive):
                    break
                if not killed and (group_alive or not exited):
                    _signal_group(proc.pid, signal.SIGKILL)
                    killed = True
                    log("stopping command=%s instance=%s pid=%d: SIGKILL"
                        % (command.id, inv.instance_id, proc.pid))
            inv.wake.wait(0.05)
            inv.wake.clear()
        rc = proc.wait()
        for t in copiers:
            t.join(timeout=1.0)

        if reason == "timeout":
            self._finish(inv, "TimedOut", "ExecutionTimedOut", STOPPED_PREEMPTIVELY_EXIT_CODE)
        elif reason == "cancel":
            self._finish(inv, "Cancelled", "Cancelled", STOPPED_PREEMPTIVELY_EXIT_CODE)
        elif rc == 0:
            self._finish(inv, "Success", "Success", 0)
        else:
            self._finish(inv, "Failed", "Failed", rc if rc > 0 else NO_RESPONSE_CODE)

    def stop_all(self):
        """On shutdown: kill every script still running."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            pids = [inv.pid for c in self.commands.values() for inv in c.invocations.values()
                    if inv.status in ("InProgress", "Cancelling") and inv.pid]
        for pid in pids:
            _signal_group(pid, signal.SIGKILL)


def _copy_stream(pipe, path):
    try:
        with open(path, "ab", buffering=0) as out:
            while True:
                chunk = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
                if not chunk:
                    break
                out.write(chunk)
    except OSError:
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------

def _require(body, name, kind=str, error="ValidationException"):
    value = body.get(name)
    if value is None:
        raise ApiError(error, "1 validation error detected: Value null at '%s' failed to "
                              "satisfy constraint: Member must not be null" % _camel(name))
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ApiError("SerializationException", "%s has the wrong type" % name)
    return value


def _camel(name):
    return name[:1].lower() + name[1:]


def _int_in(body, name, lo, hi, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError("SerializationException", "%s must be an integer" % name)
    if not (lo <= value <= hi):
        raise ApiError("ValidationException",
                       "1 validation error detected: Value '%d' at '%s' failed to satisfy "
                       "constraint: Member must have value between %d and %d"
                       % (value, _camel(name), lo, hi))
    return value


def _check_parameters(params):
    if params is None:
        raise ApiError("InvalidParameters", "Parameter \"commands\" is required.")
    if not isinstance(params, dict):
        raise ApiError("SerializationException", "Parameters must be a map")
    for key, values in params.items():
        if key not in DOCUMENT_PARAMETERS:
            raise ApiError("InvalidParameters",
                           "Parameter \"%s\" is not defined in document %s."
                           % (key, DOCUMENT_NAME))
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ApiError("InvalidParameters",
                           "Parameter \"%s\" must be a list of strings." % key)
    commands = params.get("commands")
    if not commands:
        raise ApiError("InvalidParameters", "Parameter \"commands\" is required.")
    execution_timeout = DEFAULT_EXECUTION_TIMEOUT
    if "executionTimeout" in params:
        values = params["executionTimeout"]
        ok = len(values) == 1 and EXECUTION_TIMEOUT_RE.match(values[0]) \
            and 1 <= int(values[0]) <= MAX_EXECUTION_TIMEOUT
        if not ok:
            raise ApiError("InvalidParameters",
                           "Parameter \"executionTimeout\" must be a single value between "
                           "1 and %d seconds." % MAX_EXECUTION_TIMEOUT)
        execution_timeout = int(values[0])
    if "workingDirectory" in params and len(params["workingDirectory"]) > 1:
        raise ApiError("InvalidParameters",
                       "Parameter \"workingDirectory\" takes a single value.")
    return execution_timeout


def send_command(state, body, region):
    document = _require(body, "DocumentName")
    if document != DOCUMENT_NAME:
        raise ApiError("InvalidDocument", "Document with name %s does not exist." % document)
    version = body.get("DocumentVersion")
    if version is not None and version not in DOCUMENT_VERSIONS:
        raise ApiError("InvalidDocumentVersion",
                       "Document version %s is not valid for %s." % (version, document))
    if body.get("Targets"):
        raise ApiError("InvalidParameters",
                       "Targets are not supported by this emulator; use InstanceIds.")
    instance_ids = body.get("InstanceIds")
    if not instance_ids:
        raise ApiError("InvalidParameters",
                       "InstanceIds must name at least one instance (Targets are not "
                       "supported by this emulator).")
    if not isinstance(instance_ids, list) or not all(isinstance(i, str) for i in instance_ids):
        raise ApiError("SerializationException", "InstanceIds must be a list of strings")
    if len(instance_ids) > MAX_INSTANCE_IDS:
        raise ApiError("ValidationException",
                       "1 validation error detected: Value at 'instanceIds' failed to satisfy "
                       "constraint: Member must have length less than or equal to %d"
                       % MAX_INSTANCE_IDS)
    if len(set(instance_ids)) != len(instance_ids):
        raise ApiError("DuplicateInstanceId", "Instance IDs must be unique.")
    comment = body.get("Comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise ApiError("ValidationException",
                       "1 validation error detected: Value at 'comment' failed to satisfy "
                       "constraint: Member must have length less than or equal to %d"
                       % MAX_COMMENT)
    timeout_seconds = _int_in(body, "TimeoutSeconds", MIN_DELIVERY_TIMEOUT,
                              MAX_DELIVERY_TIMEOUT, DEFAULT_DELIVERY_TIMEOUT)
    parameters = body.get("Parameters")
    execution_timeout = _check_parameters(parameters)

    with state.lock:
        unknown = [i for i in instance_ids
                   if not INSTANCE_ID_RE.match(i) or i not in state.agents]
        if unknown:
            raise ApiError("InvalidInstanceId",
                           "Instances [%s] not in a valid state for account."
                           % ", ".join(unknown))
        now = time.time()
        command = Command(str(uuid.uuid4()), body, instance_ids, parameters,
                          execution_timeout, timeout_seconds, region, now)
        state.commands[command.id] = command
        state.send_commands.append({
            "command_id": command.id,
            "instance_ids": list(instance_ids),
            "document_name": document,
            "parameters": parameters,
            "timeout_seconds": timeout_seconds,
            "comment": command.comment,
            "requested": epoch(now),
        })
        result = command.to_api()
    state.kick()
    return {"Command": result}


def cancel_command(state, body):
    command_id = _require(body, "CommandId")
    only = body.get("InstanceIds")
    if only is not None and (not isinstance(only, list)
                             or not all(isinstance(i, str) for i in only)):
        raise ApiError("SerializationException", "InstanceIds must be a list of strings")
    cancelled = []
    with state.lock:
        command = state.commands.get(command_id)
        if command is None:
            raise ApiError("InvalidCommandId", "Command %s is not valid." % command_id)
        if only:
            if len(set(only)) != len(only):
                raise ApiError("DuplicateInstanceId", "Instance IDs must be unique.")
            missing = [i for i in only if i not in command.invocations]
            if missing:
                raise ApiError("InvalidInstanceId",
                               "Instances [%s] are not part of command %s."
                               % (", ".join(missing), command_id))
        now = time.time()
        for iid in (only or command.instance_ids):
            inv = command.invocations[iid]
            if inv.terminal:
                continue
            if inv.status == "Pending":
                state._finish_locked(inv, "Cancelled", "Cancelled", NO_RESPONSE_CODE, now)
            else:
                inv.cancel_requested = True
                inv.wake.set()
            cancelled.append(iid)
    return {}, cancelled


def get_command_invocation(state, body):
    command_id = _require(body, "CommandId")
    instance_id = _require(body, "InstanceId")
    plugin = body.get("PluginName")
    if plugin is not None and (not isinstance(plugin, str)
                               or plugin.lower() != PLUGIN_NAME.lower()):
        raise ApiError("InvalidPluginName", "The plugin name is not valid.")
    with state.lock:
        command = state.commands.get(command_id)
        inv = command.invocations.get(instance_id) if command else None
        if inv is None:
            raise ApiError("InvocationDoesNotExist",
                           "An invocation for command %s and instance %s does not exist."
                           % (command_id, instance_id))
        terminal = inv.terminal
        return {
            "CommandId": command.id,
            "InstanceId": inv.instance_id,
            "Comment": command.comment,
            "DocumentName": DOCUMENT_NAME,
            "DocumentVersion": "$DEFAULT",
            "PluginName": PLUGIN_NAME,
            "ResponseCode": inv.response_code,
            "ExecutionStartDateTime": iso(inv.started),
            "ExecutionElapsedTime": elapsed(inv.started, inv.ended),
            "ExecutionEndDateTime": iso(inv.ended),
            "Status": inv.status,
            "StatusDetails": inv.details,
            "StandardOutputContent": inv.stdout_content if terminal else "",
            "StandardOutputUrl": "",
            "StandardErrorContent": inv.stderr_content if terminal else "",
            "StandardErrorUrl": "",
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "",
                                       "CloudWatchOutputEnabled": False},
        }, inv.status


INFO_FILTER_KEYS = {
    # key -> function(agent, now) giving the values the filter compares with
    "InstanceIds": lambda a, now: [a.instance_id],
    "PingStatus": lambda a, now: [a.ping],
    "PlatformTypes": lambda a, now: ["Linux"],
    "ResourceType": lambda a, now: ["EC2Instance"],
    "AgentVersion": lambda a, now: [AGENT_VERSION],
}


def _filters(body):
    """[(key, values)] from Filters and InstanceInformationFilterList."""
    out = []
    for name, key_field, values_field in (("Filters", "Key", "Values"),
                                          ("InstanceInformationFilterList", "key", "valueSet")):
        items = body.get(name)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ApiError("SerializationException", "%s must be a list" % name)
        for item in items:
            if not isinstance(item, dict):
                raise ApiError("SerializationException", "%s entries must be objects" % name)
            key = item.get(key_field)
            values = item.get(values_field)
            if key not in INFO_FILTER_KEYS:
                raise ApiError("InvalidFilterKey",
                               "The filter key %s is not supported by this emulator." % key)
            if not values or not isinstance(values, list) \
                    or not all(isinstance(v, str) for v in values):
                raise ApiError("InvalidInstanceInformationFilterValue",
                               "The filter %s needs at least one value." % key)
            out.append((key, values))
    return out


def describe_instance_information(state, body):
    filters = _filters(body)
    max_results = _int_in(body, "MaxResults", 5, 50, 50)
    offset = 0
    token = body.get("NextToken")
    if token is not None:
        try:
            offset = int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
            if offset < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ApiError("InvalidNextToken", "The specified token is not valid.")
    with state.lock:
        now = time.time()
        agents = [state.agents[k] for k in sorted(state.agents)]
        chosen = [a for a in agents
                  if all(set(INFO_FILTER_KEYS[k](a, now)) & set(v) for k, v in filters)]
        page = chosen[offset:offset + max_results]
        result = {"InstanceInformationList": [{
            "InstanceId": a.instance_id,
            "PingStatus": a.ping,
            "LastPingDateTime": epoch(a.ping_time(now)),
            "AgentVersion": AGENT_VERSION,
            "IsLatestVersion": False,
            "PlatformType": "Linux",
            "PlatformName": "Ubuntu",
            "PlatformVersion": "24.04",
            "ResourceType": "EC2Instance",
            "IPAddress": "127.0.0.1",
            "ComputerName": "%s.local" % a.instance_id,
            "SourceId": a.instance_id,
            "SourceType": "AWS::EC2::Instance",
        } for a in page]}
    if offset + max_results < len(chosen):
        result["NextToken"] = base64.urlsafe_b64encode(
            json.dumps({"offset": offset + max_results}).encode()).decode()
    return result


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
              "proxy-connection", "te", "trailer", "upgrade", "expect"}


class Handler(AwsJsonHandler):
    server_version = "ssm-emulator"

    def _json_body(self, raw):
        body = json.loads(raw.decode() or "{}")
        if not isinstance(body, dict):
            raise ValueError
        return body

    # --- routes ---------------------------------------------------------

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        state = self.server.state
        if path == "/_emulator/health":
            with state.lock:
                agents = len(state.agents)
            self._send(200, {"service": SERVICE, "ok": True,
                             "moto_endpoint": state.moto_endpoint,
                             "state_dir": state.state_dir, "agents": agents},
                       "application/json")
        elif path == "/_emulator/calls":
            self._send(200, state.calls_snapshot(), "application/json")
        elif path == "/_emulator/agents":
            with state.lock:
                now = time.time()
                agents = [state.agents[k].to_json(now) for k in sorted(state.agents)]
            self._send(200, {"agents": agents}, "application/json")
        elif path == "/_emulator/commands":
            with state.lock:
                commands = [{"command_id": c.id, "status": c.status(),
                             "instance_ids": list(c.instance_ids),
                             "requested": epoch(c.requested)}
                            for c in state.commands.values()]
            self._send(200, {"commands": commands}, "application/json")
        elif path.startswith("/_emulator/commands/"):
            command_id = path[len("/_emulator/commands/"):]
            with state.lock:
                c = state.commands.get(command_id)
                payload = None if c is None else {
                    "command_id": c.id, "status": c.status(),
                    "requested": epoch(c.requested), "timeout_seconds": c.timeout_seconds,
                    "execution_timeout": c.execution_timeout, "region": c.region,
                    "invocations": {i: inv.to_debug() for i, inv in c.invocations.items()}}
            if payload is None:
                self._send(404, {"message": "no command %s" % command_id}, "application/json")
                log("GET %s 404" % path)
                return
            self._send(200, payload, "application/json")
        else:
            self._send(404, {"message": "not found"}, "application/json")
            log("GET %s 404" % path)
            return
        log("GET %s 200" % path)

    def do_DELETE(self):
        path = urllib.parse.urlsplit(self.path).path
        state = self.server.state
        if not path.startswith("/_emulator/agents/"):
            self._send(404, {"message": "not found"}, "application/json")
            log("DELETE %s 404" % path)
            return
        instance_id = urllib.parse.unquote(path[len("/_emulator/agents/"):])
        with state.lock:
            removed = state.agents.pop(instance_id, None)
        if removed is None:
            self._send(404, {"message": "no agent %s" % instance_id}, "application/json")
            log("DELETE %s 404" % path)
            return
        self._send(200, {"ok": True, "instance_id": instance_id}, "application/json")
        log("DELETE %s 200" % path)

    def _log(self, msg):
        log(msg)

    # --- control --------------------------------------------------------

    def _control(self, path, raw):
        state = self.server.state
        try:
            body = self._json_body(raw)
        except ValueError:
            self._send(400, {"message": "body must be a JSON object"}, "application/json")
            log("POST %s 400" % path)
            return
        try:
            if path == "/_emulator/agents":
                payload = self._control_agent(body)
            elif path == "/_emulator/throttle":
                payload = self._control_throttle(body)
            elif path == "/_emulator/reset":
                state.reset_counters()
                dropped = 0
                if body.get("agents") is True:
                    with state.lock:
                        dropped = len(state.agents)
                        state.agents.clear()
                payload = {"ok": True, "agents_removed": dropped}
            else:
                self._send(404, {"message": "not found"}, "application/json")
                log("POST %s 404" % path)
                return
        except ValueError as exc:
            self._send(400, {"message": str(exc)}, "application/json")
            log("POST %s 400 %s" % (path, exc))
            return
        self._send(200, payload, "application/json")
        log("POST %s 200 %s" % (path, json.dumps(payload, sort_keys=True)))

    def _control_agent(self, body):
        state = self.server.state
        instance_id = body.get("instance_id")
        if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
            raise ValueError("instance_id must look like i-xxxxxxxx or i-xxxxxxxxxxxxxxxxx")
        ping = body.get("ping")
        if ping is not None and ping not in PING_STATUSES:
            raise ValueError("ping must be one of %s" % ", ".join(PING_STATUSES))
        cap_given = "execution_timeout_cap" in body
        cap = body.get("execution_timeout_cap")
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool)
                                or cap <= 0):
            raise ValueError("execution_timeout_cap must be a positive number or null")
        delay = body.get("start_delay")
        if delay is not None and (not isinstance(delay, (int, float)) or isinstance(delay, bool)
                                  or delay < 0):
            raise ValueError("start_delay must be a non-negative number")
        with state.lock:
            now = time.time()
            agent = state.agents.get(instance_id)
            created = agent is None
            if created:
                agent = state.agents[instance_id] = Agent(instance_id, now)
            if ping is not None and ping != agent.ping:
                if agent.ping == "Online":
                    agent.last_ping = now
                agent.ping = ping
            if cap_given:
                agent.execution_timeout_cap = cap
            if delay is not None:
                agent.start_delay = float(delay)
            payload = dict(agent.to_json(now), created=created)
        state.kick()
        return payload

    def _control_throttle(self, body):
        state = self.server.state
        operation = body.get("operation")
        count = body.get("count")
        if not isinstance(operation, str) or not operation:
            raise ValueError("operation must name an SSM operation, e.g. GetCommandInvocation")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("count must be a non-negative integer")
        error = body.get("error", "ThrottlingException")
        status = body.get("status", 400)
        if not isinstance(error, str) or not isinstance(status, int):
            raise ValueError("error must be a string and status an integer")
        message = body.get("message", "Rate exceeded")
        with state.lock:
            state.throttles[operation] = {"count": count, "error": error,
                                          "status": status, "message": str(message)}
        return {"ok": True, "operation": operation, "count": count, "error": error}

    # --- AWS ------------------------------------------------------------

    def _aws(self, raw, started):
        state = self.server.state
        request_id = str(uuid.uuid4())
        target = self.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        match = REGION_RE.search(self.headers.get("Authorization", ""))
        region = match.group(1) if match else state.default_region

        if not operation:
            err = ApiError("UnknownOperationException",
                           "Operation %s is not supported" % (target or "<none>"))
            state.count_error(err.name)
            self._send_aws_error(err, request_id)
            log("POST / target=%s status=%d error=%s" % (target or "-", err.status, err.name))
            return

        injected = state.count_call(operation)
        if injected is not None:
            state.count_error(injected.name)
            self._send_aws_error(injected, request_id)
            log("%s status=%d error=%s (injected)" % (operation, injected.status, injected.name))
            return

        handlers = {
            "SendCommand": self._op_send_command,
            "CancelCommand": self._op_cancel_command,
            "GetCommandInvocation": self._op_get_command_invocation,
            "DescribeInstanceInformation": self._op_describe_instance_information,
        }
        handler = handlers.get(operation)
        if handler is None and operation not in NOT_EMULATED:
            self._forward(raw, operation, request_id, started)
            return
        desc = ""
        try:
            if handler is None:
                raise ApiError("UnsupportedOperationException",
                               "%s is not emulated (it would read moto's unrelated Run "
                               "Command state); use GetCommandInvocation" % operation)
            try:
                body = self._json_body(raw)
            except ValueError:
                raise ApiError("SerializationException", "Request body is not a JSON object")
            payload, desc = handler(body, region)
        except ApiError as err:
            state.count_error(err.name)
            self._send_aws_error(err, request_id)
            log("%s %sstatus=%d error=%s request=%s %.0fms"
                % (operation, getattr(err, "desc", desc), err.status, err.name, request_id,
                   (time.time() - started) * 1000))
            return
        except Exception as exc:  # keep serving; report like the service would
            err = ApiError("InternalServerError", "Internal error", 500)
            state.count_error(err.name)
            self._send_aws_error(err, request_id)
            log("%s status=500 error=%s (%s: %s) request=%s"
                % (operation, err.name, type(exc).__name__, exc, request_id))
            return
        self._send(200, payload, JSON_CT, {"x-amzn-RequestId": request_id})
        log("%s %sstatus=200 request=%s %.0fms"
            % (operation, desc, request_id, (time.time() - started) * 1000))

    def _op_send_command(self, body, region):
        ids = body.get("InstanceIds")
        try:
            result = send_command(self.server.state, body, region)
        except ApiError as err:
            raise _with_desc(err, "instances=%s " % _ids(ids))
        cmd = result["Command"]
        return result, "instances=%s command=%s " % (_ids(ids), cmd["CommandId"])

    def _op_cancel_command(self, body, region):
        desc = "command=%s " % body.get("CommandId")
        try:
            payload, cancelled = cancel_command(self.server.state, body)
        except ApiError as err:
            raise _with_desc(err, desc)
        return payload, desc + "cancelled=%s " % _ids(cancelled)

    def _op_get_command_invocation(self, body, region):
        desc = "command=%s instance=%s " % (body.get("CommandId"), body.get("InstanceId"))
        try:
            payload, status = get_command_invocation(self.server.state, body)
        except ApiError as err:
            raise _with_desc(err, desc)
        return payload, desc + "invocation=%s/%s " % (status, payload["StatusDetails"])

    def _op_describe_instance_information(self, body, region):
        payload = describe_instance_information(self.server.state, body)
        return payload, "found=%d " % len(payload["InstanceInformationList"])

    # --- relay to moto ----------------------------------------------------

    def _forward(self, raw, operation, request_id, started):
        state = self.server.state
        url = urllib.parse.urlsplit(state.moto_endpoint)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = url.netloc
        headers["Content-Length"] = str(len(raw))
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
        try:
            conn.request(self.command, self.path, body=raw, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            reply_headers = [(k, v) for k, v in resp.getheaders()
                             if k.lower() not in HOP_BY_HOP
                             and k.lower() not in ("server", "date")]
        except (OSError, http.client.HTTPException) as exc:
            err = ApiError("InternalServerError", "moto is unreachable", 500)
            state.count_error(err.name)
            self._send_aws_error(err, request_id)
            log("%s -> moto failed (%s) status=500" % (operation, type(exc).__name__))
            return
        finally:
            conn.close()
        self.send_response(status)
        for name, value in reply_headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if status >= 400:
            state.count_error(_error_name(data, reply_headers))
        log("%s -> moto status=%d %.0fms" % (operation, status, (time.time() - started) * 1000))


def _error_name(data, headers):
    for k, v in headers:
        if k.lower() == "x-amzn-errortype":
            return v.split(":", 1)[0]
    try:
        return str(json.loads(data).get("__type", "Unknown")).split("#")[-1]
    except (ValueError, AttributeError):
        return "Unknown"


def _ids(ids):
    if not isinstance(ids, list):
        return "-"
    return ",".join(str(i) for i in ids[:5]) + (",..." if len(ids) > 5 else "")


def _with_desc(err, desc):
    err.desc = desc
    return err


def main(argv=None):
    parser = argparse.ArgumentParser(description="Local SSM Run Command emulator")
    stack_server.add_listen_args(parser, 5002)
    parser.add_argument("--state-dir", required=True,
                        help="where delivered commands are written and run")
    parser.add_argument("--moto-endpoint", default="http://127.0.0.1:5000",
                        help="where every other SSM operation is relayed")
    parser.add_argument("--region", default=None,
                        help="region for unsigned requests (default: $AWS_REGION, "
                             "$AWS_DEFAULT_REGION or us-east-1)")
    args = parser.parse_args(argv)

    stack_server.check_loopback_host(parser, args.host)
    if not stack_server.is_loopback_url(args.moto_endpoint) \
            or urllib.parse.urlsplit(args.moto_endpoint).scheme != "http":
        parser.error("--moto-endpoint must be an http:// URL on a loopback address")
    region = (args.region or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")

    state_dir = os.path.abspath(args.state_dir)
    _mkdir_private(state_dir)

    state = State(state_dir, args.moto_endpoint.rstrip("/"), region)
    server = stack_server.Server((args.host, args.port), Handler)
    server.state = state
    threading.Thread(target=state.scheduler, daemon=True, name="scheduler").start()

    stack_server.exit_on(signal.SIGTERM)
    banner = ("listening on http://%s:%d state_dir=%s moto_endpoint=%s region=%s"
              % (args.host, args.port, state_dir, state.moto_endpoint, region))
    try:
        stack_server.serve(server, banner, log, on_stop=state.stop_all)
    finally:
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
