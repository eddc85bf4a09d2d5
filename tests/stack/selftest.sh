#!/usr/bin/env bash
# End-to-end check of the local stack itself: moto (through moto_server.py)
# + EIC emulator + SSM emulator + one sshd host, driven with the AWS CLI,
# boto3 and a real OpenSSH client.
#
#   selftest.sh [--full]
#
# Uses its own ports (PLUGIN_STACK_MOTO_PORT/PLUGIN_STACK_EIC_PORT/
# PLUGIN_STACK_SSM_PORT, default 5300/5301/5302), host 127.0.0.77:2277 and a
# temporary state dir, so it can run next to a stack that is already up;
# brings everything down at the end.
# --full also waits out a pushed key's real 60-second window (about a minute).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
export PLUGIN_STACK_MOTO_PORT=${PLUGIN_STACK_MOTO_PORT:-5300}
export PLUGIN_STACK_EIC_PORT=${PLUGIN_STACK_EIC_PORT:-5301}
export PLUGIN_STACK_SSM_PORT=${PLUGIN_STACK_SSM_PORT:-5302}
readonly HOST_IP=${SELFTEST_HOST_IP:-127.0.0.77}
readonly HOST_PORT=${SELFTEST_HOST_PORT:-2277}
FULL=0
if [[ ${1:-} == --full ]]; then
    FULL=1
elif (($#)); then
    echo "usage: selftest.sh [--full]" >&2
    exit 2
fi

WORK=$(mktemp -d /tmp/plugin-stack-selftest.XXXXXX)
chmod 0755 "$WORK"
STATE=$WORK/state
FAILED=0
N=0

cleanup() {
    "$SCRIPT_DIR/stack.sh" down "$STATE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ok() {
    N=$((N + 1))
    echo "ok $N - $*"
}
not_ok() {
    N=$((N + 1))
    FAILED=$((FAILED + 1))
    echo "not ok $N - $*"
}
check() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else not_ok "$what"; fi
}

"$SCRIPT_DIR/stack.sh" up "$STATE" >/dev/null
# shellcheck source=/dev/null
. "$STATE/env"
export AWS_MAX_ATTEMPTS=1 # see each error as it is, without CLI retries
AWS=$PLUGIN_STACK_VENV/bin/aws

# --- moto instances ------------------------------------------------------
IID=$("$AWS" ec2 run-instances --image-id ami-12345678 --count 1 \
    --instance-type t3.micro --query 'Instances[0].InstanceId' --output text)
STOPPED=$("$AWS" ec2 run-instances --image-id ami-12345678 --count 1 \
    --instance-type t3.micro --query 'Instances[0].InstanceId' --output text)
"$AWS" ec2 stop-instances --instance-ids "$STOPPED" >/dev/null
AZ=$("$AWS" ec2 describe-instances --instance-ids "$IID" \
    --query 'Reservations[0].Instances[0].Placement.AvailabilityZone' --output text)
echo "# instance $IID in $AZ, stopped instance $STOPPED"

# --- sshd host -----------------------------------------------------------
HOST_DIR=$PLUGIN_STACK_HOSTS_DIR/h1
HOST_KEY=$("$SCRIPT_DIR/sshd-host.sh" start "$HOST_DIR" "$HOST_IP" "$HOST_PORT" "$IID" "$PLUGIN_STACK_KEYS_DIR")
check "sshd-host start prints the host key" [ "$HOST_KEY" = "$(cat "$HOST_DIR/ssh_host_ed25519_key.pub")" ]
echo "[$HOST_IP]:$HOST_PORT ${HOST_KEY% *}" >"$WORK/known_hosts"
HOST_KEY_AGAIN=$("$SCRIPT_DIR/sshd-host.sh" start "$HOST_DIR" "$HOST_IP" "$HOST_PORT" "$IID" "$PLUGIN_STACK_KEYS_DIR")
check "sshd-host start is idempotent" [ "$HOST_KEY" = "$HOST_KEY_AGAIN" ]

for k in k1 k2 k3 k4; do
    ssh-keygen -q -t ed25519 -N '' -C "selftest-$k" -f "$WORK/$k"
done
ssh-keygen -q -t rsa -b 1024 -N '' -f "$WORK/rsa1024"

login() { # login <key> [user]
    ssh -i "$WORK/$1" -o IdentitiesOnly=yes -o BatchMode=yes \
        -o UserKnownHostsFile="$WORK/known_hosts" -o StrictHostKeyChecking=yes \
        -o ConnectTimeout=5 -o LogLevel=ERROR -p "$HOST_PORT" "${2:-root}@$HOST_IP" true 2>/dev/null
}
refused() { ! login "$@"; }
push() { # push <key> [user] -> RequestId/Success, or the CLI's error text
    "$AWS" ec2-instance-connect send-ssh-public-key --instance-id "${3:-$IID}" \
        --instance-os-user "${2:-root}" --ssh-public-key "file://$WORK/$1.pub" \
        --output text 2>&1
}
push_fails_with() { # push_fails_with <error-name> <push args...>
    local want=$1 out
    shift
    if out=$(push "$@"); then
        echo "# unexpected success: $out"
        return 1
    fi
    [[ $out == *"($want)"* ]] || {
        echo "# got: $out"
        return 1
    }
}

# --- the 60-second window ------------------------------------------------
check "a key never pushed is refused" refused k1
out=$(push k1)
PUSHED_AT=$(date +%s)
check "SendSSHPublicKey succeeds for a running instance" [ "${out##*$'\t'}" = "True" ]
check "the pushed key logs in" login k1
check "the pushed key is only for the pushed user" refused k1 nobody
check "another key is still refused" refused k2
out=$("$AWS" ec2-instance-connect send-ssh-public-key --instance-id "$IID" \
    --instance-os-user root --ssh-public-key "file://$WORK/k4.pub" \
    --availability-zone "$AZ" --output text 2>&1)
check "SendSSHPublicKey accepts the instance's own AvailabilityZone" [ "${out##*$'\t'}" = "True" ]

KEY_FILE=$(grep -lF "$(cut -d' ' -f2 "$WORK/k1.pub")" "$PLUGIN_STACK_KEYS_DIR/$IID/root/"*.pub | head -n1)
name=${KEY_FILE##*/}
expiry=${name%%-*}
between() { (($2 <= $1 && $1 <= $3)); }
check "key file expiry is push time + 60 s" between "$expiry" $((PUSHED_AT - 1 + 60)) $((PUSHED_AT + 60))
check "key file is world-readable" [ "$(stat -c '%a' "$KEY_FILE")" = 644 ]

# A key file whose window closes in 3 seconds (written by hand).
near=$(($(date +%s) + 3))
cut -d' ' -f1,2 "$WORK/k3.pub" >"$PLUGIN_STACK_KEYS_DIR/$IID/root/$near-selftest.pub"
chmod 0644 "$PLUGIN_STACK_KEYS_DIR/$IID/root/$near-selftest.pub"
check "a key inside its window logs in" login k3
while (($(date +%s) < near)); do sleep 0.2; done
check "the same key is refused once its window closed" refused k3

akc_out=$(runuser -u nobody -- /usr/local/libexec/plugin-delivery-stack/eic-authorized-keys \
    "$PLUGIN_STACK_KEYS_DIR" "$IID" root)
check "authorized-keys command (as nobody) prints the live key" grep -qF "$(cut -d' ' -f2 "$WORK/k1.pub")" <<<"$akc_out"
lacks() { ! grep -qF -- "$1" <<<"$2"; }
only_key_lines() { ! grep -qvE '^(ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9]+) [A-Za-z0-9+/=]+$' <<<"$1"; }
check "authorized-keys command drops the expired key" lacks "$(cut -d' ' -f2 "$WORK/k3.pub")" "$akc_out"
check "authorized-keys command prints only key lines" only_key_lines "$akc_out"

# --- errors as the service names them -------------------------------------
check "unknown instance -> EC2InstanceNotFoundException" push_fails_with EC2InstanceNotFoundException k2 root i-0123456789abcdef0
check "stopped instance -> EC2InstanceStateInvalidException" push_fails_with EC2InstanceStateInvalidException k2 root "$STOPPED"
check "1024-bit RSA key -> InvalidArgsException" push_fails_with InvalidArgsException rsa1024
check "bad OS user -> InvalidArgsException" push_fails_with InvalidArgsException k2 'no/slash'
printf 'ssh-ed25519 %s\n' "$(head -c 60 /dev/zero | base64 -w0)" >"$WORK/bogus.pub"
check "malformed key -> InvalidArgsException" push_fails_with InvalidArgsException bogus

curl --noproxy '*' -sf -X POST -d '{"count": 1}' "$PLUGIN_STACK_EIC_URL/_emulator/throttle" >/dev/null
check "throttle control -> ThrottlingException" push_fails_with ThrottlingException k2
check "a throttled call pushes no key" refused k2
out=$(push k2)
check "a call after the throttle succeeds" [ "${out##*$'\t'}" = "True" ]
check "... and its key logs in" login k2

calls=$(curl --noproxy '*' -sf "$PLUGIN_STACK_EIC_URL/_emulator/calls")
count=$("$PLUGIN_STACK_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["send_ssh_public_key"])' <<<"$calls")
check "/_emulator/calls counts every SendSSHPublicKey call (9)" [ "$count" = 9 ]
curl --noproxy '*' -sf -X POST -d '{}' "$PLUGIN_STACK_EIC_URL/_emulator/reset" >/dev/null
calls=$(curl --noproxy '*' -sf "$PLUGIN_STACK_EIC_URL/_emulator/calls")
check "/_emulator/reset zeroes the counters" grep -q '"send_ssh_public_key": 0' <<<"$calls"
check "emulator log never contains key material" lacks "$(cut -d' ' -f2 "$WORK/k1.pub")" "$(cat "$STATE/eic.log")"

# --- SSM Run Command emulator ---------------------------------------------
# ssm.py: boto3 against the emulator; every answer is a JSON document.
cat >"$WORK/ssm.py" <<'PY'
import json, os, sys, time
import boto3, botocore.config, botocore.exceptions

URL = os.environ["PLUGIN_STACK_SSM_URL"]
DOC = "AWS-RunShellScript"


def client(attempts=1):
    return boto3.client("ssm", endpoint_url=URL, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=botocore.config.Config(
                            retries={"total_max_attempts": attempts, "mode": "standard"}))


def show(doc):
    doc.pop("ResponseMetadata", None)
    print(json.dumps(doc, default=str))


def main(op, *args):
    c = client()
    try:
        if op == "send":  # send <instance> <delivery-timeout> <command>...
            show(c.send_command(InstanceIds=[args[0]], DocumentName=DOC,
                                TimeoutSeconds=int(args[1]),
                                Parameters={"commands": list(args[2:])})["Command"])
        elif op == "send-doc":  # send-doc <instance> <document>
            show(c.send_command(InstanceIds=[args[0]], DocumentName=args[1],
                                Parameters={"commands": ["true"]})["Command"])
        elif op == "get":  # get <command-id> <instance> [attempts]
            attempts = int(args[2]) if len(args) > 2 else 1
            show(client(attempts).get_command_invocation(CommandId=args[0],
                                                         InstanceId=args[1]))
        elif op == "wait":  # wait <command-id> <instance> <max-seconds>
            start = time.time()
            while True:
                inv = c.get_command_invocation(CommandId=args[0], InstanceId=args[1])
                if inv["Status"] not in ("Pending", "InProgress", "Delayed", "Cancelling") \
                        or time.time() - start > float(args[2]):
                    break
                time.sleep(0.1)
            inv["waited"] = round(time.time() - start, 2)
            show(inv)
        elif op == "cancel":
            show(c.cancel_command(CommandId=args[0]))
        elif op == "describe":
            show(c.describe_instance_information(
                Filters=[{"Key": "InstanceIds", "Values": list(args)}]))
        elif op == "put-param":
            show(c.put_parameter(Name=args[0], Value=args[1], Type="String", Overwrite=True))
        elif op == "get-param":
            show(c.get_parameter(Name=args[0])["Parameter"])
        elif op == "get-param-moto":  # straight to moto, not through the emulator
            show(boto3.client("ssm", endpoint_url=os.environ["PLUGIN_STACK_MOTO_URL"],
                              region_name="us-east-1").get_parameter(Name=args[0])["Parameter"])
        elif op == "presign":  # presign <bucket> <key> <expires-in>
            s3 = boto3.client("s3", endpoint_url=os.environ["PLUGIN_STACK_MOTO_URL"],
                              region_name="us-east-1",
                              config=botocore.config.Config(signature_version="s3v4"))
            try:
                s3.create_bucket(Bucket=args[0])
            except botocore.exceptions.ClientError:
                pass
            s3.put_object(Bucket=args[0], Key=args[1], Body=b"presigned body")
            print(s3.generate_presigned_url("get_object", ExpiresIn=int(args[2]),
                                            Params={"Bucket": args[0], "Key": args[1]}))
        else:
            raise SystemExit("unknown op " + op)
    except botocore.exceptions.ClientError as exc:
        print(json.dumps({"Error": exc.response["Error"]["Code"]}))


main(*sys.argv[1:])
PY
ssm() { "$PLUGIN_STACK_VENV/bin/python" "$WORK/ssm.py" "$@"; }
# jtrue <json> <python expression over d>: e.g. jtrue "$out" 'd["Status"] == "Failed"'
jtrue() {
    "$PLUGIN_STACK_VENV/bin/python" -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if eval(sys.argv[2]) else 1)' "$1" "$2" || {
        echo "# got: ${1:0:400}"
        return 1
    }
}
jget() { "$PLUGIN_STACK_VENV/bin/python" -c 'import json,sys; print(eval(sys.argv[2], {"d": json.loads(sys.argv[1])}))' "$1" "$2"; }
ctl() { # ctl <method> <path> [json-body]
    curl --noproxy '*' -sf -X "$1" ${3:+-d "$3"} "$PLUGIN_STACK_SSM_URL/_emulator/$2"
}

SSM_IID=i-5e1f7e57
LOST_IID=i-0ssm1ost
health=$(ctl GET health)
check "SSM emulator health names moto and its state dir" jtrue "$health" \
    'd["service"] == "ssm-emulator" and d["moto_endpoint"] == "'"$PLUGIN_STACK_MOTO_URL"'" and d["state_dir"] == "'"$PLUGIN_STACK_SSM_STATE_DIR"'"'
check "register an agent" jtrue "$(ctl POST agents "{\"instance_id\": \"$SSM_IID\"}")" 'd["ping"] == "Online" and d["created"]'
out=$(ssm describe "$SSM_IID" i-00000000)
check "DescribeInstanceInformation lists the agent Online (unknown ids absent)" jtrue "$out" \
    '[(i["InstanceId"], i["PingStatus"], i["PlatformType"]) for i in d["InstanceInformationList"]] == [("'"$SSM_IID"'", "Online", "Linux")]'

sent=$(ssm send "$SSM_IID" 60 'echo hi; echo err >&2' 'echo selftest-marker-7f3a >/dev/null; exit 3')
check "SendCommand answers Pending with a command id" jtrue "$sent" 'd["Status"] == "Pending" and len(d["CommandId"]) == 36'
CID=$(jget "$sent" 'd["CommandId"]')
out=$(ssm wait "$CID" "$SSM_IID" 10)
check "exit 3 -> Failed, ResponseCode 3" jtrue "$out" 'd["Status"] == "Failed" and d["StatusDetails"] == "Failed" and d["ResponseCode"] == 3'
check "stdout / stderr contents" jtrue "$out" 'd["StandardOutputContent"] == "hi\n" and d["StandardErrorContent"] == "err\n"'
check "timestamps and plugin name" jtrue "$out" \
    'd["ExecutionStartDateTime"].endswith("Z") and d["ExecutionElapsedTime"].startswith("PT") and d["PluginName"] == "aws:runShellScript"'
STEP=$PLUGIN_STACK_SSM_STATE_DIR/$SSM_IID/orchestration/$CID/awsrunShellScript/0.awsrunShellScript
check "the script lands in the orchestration dir, mode 700" [ "$(stat -c %a "$STEP/_script.sh")" = 700 ]
check "full stdout is kept next to it" [ "$(cat "$STEP/stdout")" = hi ]

sent=$(ssm send "$SSM_IID" 60 'env; pwd; id -u')
out=$(ssm wait "$(jget "$sent" 'd["CommandId"]')" "$SSM_IID" 10)
check "clean environment, root, cwd = orchestration dir" jtrue "$out" \
    'sorted(l.split("=")[0] for l in d["StandardOutputContent"].splitlines()[:-2]) == ["AWS_SSM_INSTANCE_ID", "AWS_SSM_REGION_NAME", "HOME", "LANG", "PATH", "PWD"] and d["StandardOutputContent"].splitlines()[-1] == "0" and d["StandardOutputContent"].splitlines()[-2].endswith("/0.awsrunShellScript")'

sent=$(ssm send "$SSM_IID" 60 "python3 -c 'import sys; sys.stdout.write(\"o\" * 30000); sys.stderr.write(\"e\" * 9000)'")
CID=$(jget "$sent" 'd["CommandId"]')
out=$(ssm wait "$CID" "$SSM_IID" 10)
check "30,000 / 9,000 chars of output -> 24,000 / 8,000 in GetCommandInvocation" jtrue "$out" \
    'd["Status"] == "Success" and len(d["StandardOutputContent"]) == 24000 and len(d["StandardErrorContent"]) == 8000'
check "... and the stdout file has all 30,000" [ "$(stat -c %s "$PLUGIN_STACK_SSM_STATE_DIR/$SSM_IID/orchestration/$CID/awsrunShellScript/0.awsrunShellScript/stdout")" = 30000 ]

ctl POST agents "{\"instance_id\": \"$SSM_IID\", \"execution_timeout_cap\": 1}" >/dev/null
sent=$(ssm send "$SSM_IID" 60 'echo started' 'sleep 30')
CID=$(jget "$sent" 'd["CommandId"]')
out=$(ssm wait "$CID" "$SSM_IID" 8)
check "execution_timeout_cap 1 + sleep 30 -> TimedOut/ExecutionTimedOut, ResponseCode 137" jtrue "$out" \
    'd["Status"] == "TimedOut" and d["StatusDetails"] == "ExecutionTimedOut" and d["ResponseCode"] == 137'
check "... within a few seconds, output so far kept" jtrue "$out" 'd["waited"] < 5 and d["StandardOutputContent"] == "started\n"'
PGID=$(jget "$(ctl GET "commands/$CID")" 'd["invocations"]["'"$SSM_IID"'"]["pgid"]')
group_gone() { # no live (non-zombie) process left in process group $1
    ! ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}
check "... and the sleep is gone (process group $PGID empty)" group_gone "$PGID"
ctl POST agents "{\"instance_id\": \"$SSM_IID\", \"execution_timeout_cap\": null}" >/dev/null

sent=$(ssm send "$SSM_IID" 60 'sleep 30')
CID=$(jget "$sent" 'd["CommandId"]')
sleep 0.5
check "a running command is InProgress" jtrue "$(ssm get "$CID" "$SSM_IID")" 'd["Status"] == "InProgress" and d["ResponseCode"] == -1'
check "CancelCommand on it answers {}" jtrue "$(ssm cancel "$CID")" 'd == {}'
out=$(ssm wait "$CID" "$SSM_IID" 5)
check "... -> Cancelled/Cancelled" jtrue "$out" 'd["Status"] == "Cancelled" and d["StatusDetails"] == "Cancelled"'
PGID=$(jget "$(ctl GET "commands/$CID")" 'd["invocations"]["'"$SSM_IID"'"]["pgid"]')
check "... and its process group is gone" group_gone "$PGID"

ctl POST agents "{\"instance_id\": \"$LOST_IID\", \"ping\": \"ConnectionLost\"}" >/dev/null
check "DescribeInstanceInformation shows ConnectionLost" jtrue "$(ssm describe "$LOST_IID")" \
    '[i["PingStatus"] for i in d["InstanceInformationList"]] == ["ConnectionLost"]'
sent=$(ssm send "$LOST_IID" 30 'echo never')
CID=$(jget "$sent" 'd["CommandId"]')
sleep 1.5
check "SendCommand to a ConnectionLost agent stays Pending" jtrue "$(ssm get "$CID" "$LOST_IID")" \
    'd["Status"] == "Pending" and d["ResponseCode"] == -1 and d["ExecutionStartDateTime"] == ""'
ssm cancel "$CID" >/dev/null
check "... CancelCommand -> Cancelled at once" jtrue "$(ssm get "$CID" "$LOST_IID")" 'd["Status"] == "Cancelled" and d["StatusDetails"] == "Cancelled"'
check "... and nothing ran" [ ! -e "$PLUGIN_STACK_SSM_STATE_DIR/$LOST_IID/orchestration/$CID" ]
sent=$(ssm send "$LOST_IID" 30 'echo delivered late')
CID=$(jget "$sent" 'd["CommandId"]')
ctl POST agents "{\"instance_id\": \"$LOST_IID\", \"ping\": \"Online\"}" >/dev/null
check "a pending command runs once its agent is back Online" jtrue "$(ssm wait "$CID" "$LOST_IID" 10)" \
    'd["Status"] == "Success" and d["StandardOutputContent"] == "delivered late\n"'

check "unregistered instance -> InvalidInstanceId" jtrue "$(ssm send i-0abcdef9 60 true)" 'd == {"Error": "InvalidInstanceId"}'
check "other document -> InvalidDocument" jtrue "$(ssm send-doc "$SSM_IID" AWS-RunPowerShellScript)" 'd == {"Error": "InvalidDocument"}'
check "unknown invocation -> InvocationDoesNotExist" jtrue "$(ssm get "$CID" "$SSM_IID")" 'd == {"Error": "InvocationDoesNotExist"}'
check "unknown command -> InvalidCommandId" jtrue "$(ssm cancel 00000000-0000-4000-8000-000000000000)" 'd == {"Error": "InvalidCommandId"}'
ctl POST throttle '{"operation": "GetCommandInvocation", "count": 1}' >/dev/null
check "throttle control -> ThrottlingException" jtrue "$(ssm get "$CID" "$LOST_IID")" 'd == {"Error": "ThrottlingException"}'
ctl POST throttle '{"operation": "GetCommandInvocation", "count": 2}' >/dev/null
check "... which the SDK retries through" jtrue "$(ssm get "$CID" "$LOST_IID" 3)" 'd["Status"] == "Success"'

calls=$(ctl GET calls)
check "/_emulator/calls has the SendCommand parameters as sent" jtrue "$calls" \
    'd["send_command"][0]["parameters"]["commands"][0] == "echo hi; echo err >&2" and d["send_command"][0]["instance_ids"] == ["'"$SSM_IID"'"] and d["errors"]["ThrottlingException"] == 3'
check "SSM emulator log never contains command text" lacks selftest-marker-7f3a "$(cat "$STATE/ssm.log")"

ssm put-param /selftest/through-emulator v1 >/dev/null
check "PutParameter through the emulator lands in moto" jtrue "$(ssm get-param-moto /selftest/through-emulator)" 'd["Value"] == "v1"'
check "GetParameter through the emulator" jtrue "$(ssm get-param /selftest/through-emulator)" 'd["Value"] == "v1" and d["Version"] == 1'
check "moto's errors come back as they are (ParameterNotFound)" jtrue "$(ssm get-param /selftest/missing)" 'd == {"Error": "ParameterNotFound"}'

# --- presigned URL expiry (moto_server.py) --------------------------------
check "moto is served by moto_server.py" grep -q '"service": "moto-wrapper"' <<<"$(curl --noproxy '*' -sf "$PLUGIN_STACK_MOTO_URL/_stack/moto-wrapper")"
fetch() { curl --noproxy '*' -s -o "$WORK/fetched" -w '%{http_code}' "$1"; }
URL=$(ssm presign selftest-presign obj 1)
check "a presigned GET (ExpiresIn=1) works at once" [ "$(fetch "$URL")" = 200 ]
check "... with the object's body" grep -qx 'presigned body' "$WORK/fetched"
sleep 2
check "... and is refused 2 s later: 403" [ "$(fetch "$URL")" = 403 ]
check "... AccessDenied, Request has expired" grep -q '<Code>AccessDenied</Code><Message>Request has expired</Message>' "$WORK/fetched"
URL=$(ssm presign selftest-presign obj 604801)
check "X-Amz-Expires over a week -> 400 AuthorizationQueryParametersError" [ "$(fetch "$URL")" = 400 ]
check "... with S3's error code" grep -q '<Code>AuthorizationQueryParametersError</Code>' "$WORK/fetched"

# --- the real 60 s window ----------------------------------------------------
if ((FULL)); then
    while (($(date +%s) < PUSHED_AT + 55)); do sleep 1; done
    check "a pushed key still logs in 55 s after the push" login k1
    while (($(date +%s) < PUSHED_AT + 61)); do sleep 0.5; done
    check "a pushed key is refused 61 s after the push" refused k1
else
    echo "# skipped the 60 s wait (run with --full)"
fi

# --- down ------------------------------------------------------------------
SSHD_PID=$(cat "$HOST_DIR/sshd.pid")
MOTO_PID=$(cat "$STATE/moto.pid")
EIC_PID=$(cat "$STATE/eic.pid")
SSM_PID=$(cat "$STATE/ssm.pid")
"$SCRIPT_DIR/stack.sh" down "$STATE" >/dev/null 2>&1
sleep 0.5
dead() { ! kill -0 "$1" 2>/dev/null; }
for p in "$SSHD_PID" "$MOTO_PID" "$EIC_PID" "$SSM_PID"; do
    check "stack.sh down stopped pid $p" dead "$p"
done

echo "1..$N"
if ((FAILED)); then
    echo "# $FAILED of $N checks failed"
    exit 1
fi
echo "# all $N checks passed"
