#!/usr/bin/env bash
# End-to-end check of the local stack itself: moto + EIC emulator + one sshd
# host, driven with the AWS CLI and a real OpenSSH client.
#
#   selftest.sh [--full]
#
# Uses its own ports (PLUGIN_STACK_MOTO_PORT/PLUGIN_STACK_EIC_PORT, default
# 5300/5301), host 127.0.0.77:2277 and a temporary state dir, so it can run
# next to a stack that is already up; brings everything down at the end.
# --full also waits out a pushed key's real 60-second window (about a minute).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
export PLUGIN_STACK_MOTO_PORT=${PLUGIN_STACK_MOTO_PORT:-5300}
export PLUGIN_STACK_EIC_PORT=${PLUGIN_STACK_EIC_PORT:-5301}
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
"$SCRIPT_DIR/stack.sh" down "$STATE" >/dev/null 2>&1
sleep 0.5
dead() { ! kill -0 "$1" 2>/dev/null; }
for p in "$SSHD_PID" "$MOTO_PID" "$EIC_PID"; do
    check "stack.sh down stopped pid $p" dead "$p"
done

echo "1..$N"
if ((FAILED)); then
    echo "# $FAILED of $N checks failed"
    exit 1
fi
echo "# all $N checks passed"
