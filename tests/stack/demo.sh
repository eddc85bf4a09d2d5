#!/usr/bin/env bash
# The whole path on one machine: local stack up, the functions served by
# `cargo lambda watch`, then install -> list -> uninstall over HTTP on two
# seeded workspaces: one on a real sshd host (EC2 Instance Connect + SSH), one
# on a hardened host without sshd (SSM Run Command through the emulated
# agent), printing every request and response.
#
#   tests/stack/demo.sh           walk through, then stop everything
#   tests/stack/demo.sh --keep    leave the stack and the functions running
#   tests/stack/demo.sh --check   also invoke every events/*.json with
#                                 `cargo lambda invoke`; exit 1 on any
#                                 unexpected status (CI runs this)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stack_sh="$repo/tests/stack/stack.sh"
state="${PLUGIN_STACK_STATE_DIR:-$repo/.stack}"
demo="$state/demo"
port="${PLUGIN_DEMO_PORT:-9000}"
bucket=plugin-delivery-demo
workspace=ws-demo
# Both demo workspaces belong to this org (their instances' molecule:org-id).
org=acme
hardened=ws-demo-hardened
host_ip=127.0.0.5
host_port=2222

keep=0
check=0
for arg in "$@"; do
    case $arg in
        --keep) keep=1 ;;
        --check) check=1 ;;
        *) echo "usage: demo.sh [--keep] [--check]" >&2; exit 64 ;;
    esac
done

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo.sh: $*" >&2; exit 1; }
failures=0

watch_pid=''
stop_all() {
    if [ -n "$watch_pid" ]; then
        # cargo lambda watch runs the functions as children; end the group.
        kill -- "-$watch_pid" 2>/dev/null || kill "$watch_pid" 2>/dev/null || true
        wait "$watch_pid" 2>/dev/null || true
    fi
    "$stack_sh" down "$state" >/dev/null 2>&1 || true
}

bold "Installing what is missing (apt: openssh-server; .venv: moto, cargo-lambda, awscli)"
"$stack_sh" install
bold "Bringing up the local stack (moto for S3/EC2, the EC2 Instance Connect and SSM emulators)"
"$stack_sh" up "$state" >/dev/null
# shellcheck disable=SC1091
. "$state/env"
[ "$keep" = 1 ] || trap stop_all EXIT
aws() { "$PLUGIN_STACK_VENV/bin/aws" "$@"; }

bold "Seeding: bucket $bucket, registry from tests/fixtures/plugins/"
aws s3 mb "s3://$bucket" >/dev/null 2>&1 || true
aws s3 sync --only-show-errors --delete "$repo/tests/fixtures/plugins/" "s3://$bucket/registry/"

bold "Seeding: workspace $workspace on a real sshd host at $host_ip:$host_port"
instance=$(aws ec2 describe-instances \
    --filters "Name=tag:molecule:workspace-id,Values=$workspace" "Name=instance-state-name,Values=running" \
    --query 'Reservations[0].Instances[0].InstanceId' --output text)
if [ -z "$instance" ] || [ "$instance" = None ]; then
    instance=$(aws ec2 run-instances --image-id ami-12345678 --count 1 \
        --tag-specifications "ResourceType=instance,Tags=[{Key=molecule:workspace-id,Value=$workspace},{Key=molecule:runtime,Value=claude-code},{Key=molecule:local-address,Value=$host_ip:$host_port}]" \
        --query 'Instances[0].InstanceId' --output text)
fi
host_key=$("$PLUGIN_STACK_SSHD_HOST" start "$PLUGIN_STACK_HOSTS_DIR/demo" "$host_ip" "$host_port" "$instance" "$PLUGIN_STACK_KEYS_DIR")
aws ec2 create-tags --resources "$instance" --tags "Key=molecule:ssh-host-key,Value=$host_key" "Key=molecule:org-id,Value=$org"
echo "instance $instance, host key ${host_key%% *} ..."

bold "Seeding: workspace $hardened on a hardened host (no sshd; molecule:access=ssm, runtime hermes)"
hardened_instance=$(aws ec2 describe-instances \
    --filters "Name=tag:molecule:workspace-id,Values=$hardened" "Name=instance-state-name,Values=running" \
    --query 'Reservations[0].Instances[0].InstanceId' --output text)
if [ -z "$hardened_instance" ] || [ "$hardened_instance" = None ]; then
    hardened_instance=$(aws ec2 run-instances --image-id ami-12345678 --count 1 \
        --tag-specifications "ResourceType=instance,Tags=[{Key=molecule:workspace-id,Value=$hardened},{Key=molecule:runtime,Value=hermes},{Key=molecule:access,Value=ssm}]" \
        --query 'Instances[0].InstanceId' --output text)
fi
# Its SSM agent comes online (the emulator runs its commands on this machine).
curl -sS -o /dev/null -X POST -H 'content-type: application/json' \
    --data "{\"instance_id\": \"$hardened_instance\", \"ping\": \"Online\"}" \
    "$PLUGIN_STACK_SSM_URL/_emulator/agents"
aws ec2 create-tags --resources "$hardened_instance" --tags "Key=molecule:org-id,Value=$org"
echo "instance $hardened_instance, SSM agent online"

# Each runtime's config dir on its "host", and the runtime restart: the
# emulated runtime re-wires plugins from <config>/plugins/ as the real one does.
configs="$demo/configs"
hermes="$demo/hermes"
mkdir -p "$configs" "$hermes"
chmod 0755 "$demo" "$configs" "$hermes"
# The config dirs belong to the agent user, as on a real host.
chown 1000:1000 "$configs" "$hermes"
profiles=$(jq -cn --arg dir "$configs" --arg restart "python3 $repo/tests/stack/fake-runtime.py $configs" \
    --arg hdir "$hermes" --arg hrestart "python3 $repo/tests/stack/fake-runtime.py $hermes" \
    '{"claude-code": {config_dir: $dir, restart: $restart}, "hermes": {config_dir: $hdir, restart: $hrestart}}')

envfile="$demo/functions.env"
{
    for v in AWS_ENDPOINT_URL AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT AWS_ENDPOINT_URL_SSM AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION AWS_EC2_METADATA_DISABLED; do
        printf "%s='%s'\n" "$v" "${!v}"
    done
    # Single quotes: dotenv takes the value literally (the JSON below).
    printf "PLUGIN_BUCKET='%s'\n" "$bucket"
    # The login user stack.sh install created; the script runs via sudo -n.
    printf "PLUGIN_SSH_USER='pd-login'\n"
    printf "PLUGIN_SSH_ADDRESS_TAG='molecule:local-address'\n"
    printf "PLUGIN_RUNTIME_PROFILES='%s'\n" "$profiles"
    # Caller tokens: the local test issuer, its keys given inline.
    printf "PLUGIN_JWT_ISSUER='https://platform.test/'\n"
    printf "PLUGIN_JWT_AUDIENCE='plugin-delivery'\n"
    printf "PLUGIN_JWKS='%s'\n" "$(jq -c . "$repo/tests/fixtures/jwt/jwks.json")"
    printf "RUST_LOG='info'\n"
} >"$envfile"

# Tokens: an admin of acme (the demo's org), and one of another org.
mint() { "$PLUGIN_STACK_VENV/bin/python" "$repo/tests/stack/mint-token.py" "$@"; }
acme_token=$(mint --org "$org")
globex_token=$(mint --org globex)
token=$acme_token

bold "Serving the functions with cargo lambda watch on 127.0.0.1:$port (log: $demo/watch.log)"
cd "$repo"
setsid "$PLUGIN_STACK_VENV/bin/cargo-lambda" lambda watch -A 127.0.0.1 -P "$port" \
    --ignore-changes --env-file "$envfile" >"$demo/watch.log" 2>&1 &
watch_pid=$!
for _ in $(seq 1 600); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    kill -0 "$watch_pid" 2>/dev/null || die "cargo lambda watch exited; see $demo/watch.log"
    sleep 0.5
done

base="http://127.0.0.1:$port/lambda-url"
# request METHOD FUNCTION PATH [BODY] EXPECTED_STATUS
request() {
    local method=$1 fn=$2 path=$3 body=$4 want=$5 out code
    printf '\n\033[36m> %s %s\033[0m  (function: %s)\n' "$method" "$path" "$fn"
    [ -n "$body" ] && printf '\033[36m> %s\033[0m\n' "$body"
    out=$(curl -sS -X "$method" -H 'content-type: application/json' \
        ${token:+-H "authorization: Bearer $token"} \
        ${body:+--data "$body"} -w '\n%{http_code}' "$base/$fn$path")
    code=${out##*$'\n'}
    printf '< %s\n< %s\n' "$code" "$(printf '%s' "${out%$'\n'*}" | jq -c . 2>/dev/null || printf '%s' "${out%$'\n'*}")"
    if [ "$code" != "$want" ]; then
        echo "!! expected $want" >&2
        failures=$((failures + 1))
    fi
}

bold "What the registry offers this workspace's runtime"
request GET catalog "/workspaces/$workspace/plugins/available" '' 200
bold "Install"
request POST install "/workspaces/$workspace/plugins" '{"source": "local://hello-world"}' 200
bold "On the host: $configs/plugins/hello-world/"
(cd "$configs/plugins/hello-world/" && find . -type f -exec stat -c '%U:%G %a %n' {} + | sort)
echo "wired by the runtime: $(ls "$configs/skills") skill, $(grep -c '^# Plugin: hello-world' "$configs/CLAUDE.md") CLAUDE.md block(s), hooks: $(ls "$configs/.claude/hooks")"
bold "List (from the desired state in S3)"
request GET list "/workspaces/$workspace/plugins" '' 200
bold "Install again: unchanged, no restart"
request POST install "/workspaces/$workspace/plugins" '{"source": "hello-world"}' 200
bold "Errors are JSON with a request id"
request POST install "/workspaces/$workspace/plugins" '{"source": "local://../etc"}' 400
request POST install "/workspaces/ws-unknown/plugins" '{"source": "hello-world"}' 404
bold "Another org's admin: the same calls are refused, as if the workspace did not exist"
token=$globex_token
request POST install "/workspaces/$workspace/plugins" '{"source": "hello-world"}' 404
request GET list "/workspaces/$workspace/plugins" '' 404
request PUT allowlist "/orgs/$org/plugins/allowlist" '{"plugins": []}' 404
token=''
request GET list "/workspaces/$workspace/plugins" '' 401
token=$acme_token
bold "Uninstall"
request DELETE uninstall "/workspaces/$workspace/plugins/hello-world" '' 200
echo "left on the host: plugins=[$(ls "$configs/plugins")] skills=[$(ls "$configs/skills")] hooks=[$(ls "$configs/.claude/hooks")]"
request GET list "/workspaces/$workspace/plugins" '' 200
echo "runtime restarts: $(wc -l <"$configs.restarts")"
bold "Operation records (newest first)"
request GET operations "/workspaces/$workspace/plugins/operations?limit=2" '' 200

bold "The hardened host: the same API, delivered through SSM Run Command"
request POST install "/workspaces/$hardened/plugins" '{"source": "local://hello-world"}' 200
bold "On the hardened host: $hermes/plugins/hello-world/ (downloaded by the host from a presigned S3 URL)"
(cd "$hermes/plugins/hello-world/" && find . -type f -exec stat -c '%U:%G %a %n' {} + | sort)
request GET list "/workspaces/$hardened/plugins" '' 200
request POST install "/workspaces/$hardened/plugins" '{"source": "hello-world"}' 200
request DELETE uninstall "/workspaces/$hardened/plugins/hello-world" '' 200
echo "left on the host: plugins=[$(ls "$hermes/plugins")] skills=[$(ls "$hermes/skills")]; runtime restarts: $(wc -l <"$hermes.restarts")"
echo "SSM commands sent to $hardened_instance so far: $(curl -sS "$PLUGIN_STACK_SSM_URL/_emulator/calls" |
    jq --arg i "$hardened_instance" '[.send_command[] | select(.instance_ids | index($i))] | length')"

if [ "$check" = 1 ]; then
    bold "events/*.json through cargo lambda invoke"
    # The API events carry a placeholder token: sent as they are, refused;
    # the checks below send them with a fresh token of the demo's org.
    invoke_as_is() {
        local fn=$1 file=$2 want=$3 got
        got=$("$PLUGIN_STACK_VENV/bin/cargo-lambda" lambda invoke -A 127.0.0.1 -P "$port" "$fn" --data-file "$file" | jq -r .statusCode)
        printf '%-28s %-10s -> %s (placeholder token)\n' "$file" "$fn" "$got"
        if [ "$got" != "$want" ]; then
            echo "!! expected $want" >&2
            failures=$((failures + 1))
        fi
    }
    invoke_as_is list events/list.json 401
    invoke() {
        local fn=$1 file=$2 want=$3 got
        jq --arg t "Bearer $acme_token" '.headers.authorization = $t' "$file" >"$demo/event.json"
        got=$("$PLUGIN_STACK_VENV/bin/cargo-lambda" lambda invoke -A 127.0.0.1 -P "$port" "$fn" --data-file "$demo/event.json" | jq -r .statusCode)
        printf '%-28s %-10s -> %s\n' "$file" "$fn" "$got"
        if [ "$got" != "$want" ]; then
            echo "!! expected $want" >&2
            failures=$((failures + 1))
        fi
    }
    invoke install events/install.json 200
    invoke list events/list.json 200
    invoke install events/install-bad-name.json 400
    invoke uninstall events/uninstall.json 200
    invoke install events/install-hardened.json 200
    invoke catalog events/registry.json 200
    invoke catalog events/sources.json 200
    invoke catalog events/available.json 200
    invoke catalog events/compatibility.json 200
    invoke download events/download.json 302
    invoke allowlist events/allowlist-put.json 200
    invoke allowlist events/allowlist-get.json 200
    invoke operations events/operations.json 200

    # The reinstall function takes EventBridge events: success is an
    # invocation without a function error.
    invoke_event() {
        local file=$1 want=$2 out got
        if out=$("$PLUGIN_STACK_VENV/bin/cargo-lambda" lambda invoke -A 127.0.0.1 -P "$port" reinstall --data-file "$file" 2>&1); then
            got=$(printf '%s' "$out" | jq -c "$want" 2>/dev/null || true)
        else
            got="error: $out"
        fi
        printf '%-28s %-10s -> %s\n' "$file" reinstall "$got"
        if [ "$got" != true ]; then
            echo "!! expected $want to hold" >&2
            failures=$((failures + 1))
        fi
    }
    # An instance id that no workspace runs on: ignored, with a log line.
    invoke_event events/instance-running.json '.ignored == "no workspace tag"'
    invoke_event events/reinstall-workspace.json '.status == "succeeded" and .trigger == "request"'
    invoke_event events/rollout.json '.status == "succeeded" and .kind == "rollout"'
    invoke_event events/scheduled.json '.checked >= 0'
fi

if [ "$keep" = 1 ]; then
    bold "Left running"
    cat <<EOF
functions: $base/{install,uninstall,list,catalog,download,allowlist}/... (e.g. $base/catalog/plugins)
every request needs a token of the test issuer (tests/stack/mint-token.py --org $org [--scope ...]):
  token=\$(.venv/bin/python tests/stack/mint-token.py --org $org)
  curl -sS -H "authorization: Bearer \$token" -X POST -d '{"source":"hello-world"}' $base/install/workspaces/$workspace/plugins
  jq --arg t "Bearer \$token" '.headers.authorization = \$t' events/install.json > /tmp/ev.json
  cargo lambda invoke -A 127.0.0.1 -P $port install --data-file /tmp/ev.json
host config dir: $configs    stack env: . $state/env
stop: kill -- -$watch_pid; tests/stack/stack.sh down
EOF
fi
[ "$failures" = 0 ] || die "$failures unexpected response(s)"
bold "Done"
