#!/usr/bin/env bash
# The one entry point for the Plugin Delivery local stack: moto (EC2, S3, ...,
# through moto_server.py, which enforces presigned-URL expiry), the EC2
# Instance Connect emulator and the SSM Run Command emulator, plus the sshd
# hosts tests start with sshd-host.sh under <state-dir>/hosts/<name>/.
#
#   stack.sh install             apt packages (APT_PACKAGES) and <repo>/.venv
#                                (PIP_PACKAGES, pinned by requirements.lock);
#                                a no-op if all present and the lock unchanged
#   stack.sh up [state-dir]      start moto + emulators (default <repo>/.stack),
#                                write <state-dir>/env, print its path
#   stack.sh down [state-dir]    stop the sshd hosts, emulators and moto it
#                                started for <state-dir>
#   stack.sh status [state-dir]  show what is running
#
# Everything listens on loopback only. Ports: PLUGIN_STACK_MOTO_PORT (5000),
# PLUGIN_STACK_EIC_PORT (5001), PLUGIN_STACK_SSM_PORT (5002). A port already
# served by a healthy instance of the same service is reused (and then not
# stopped by `down`).
# Other knobs: PLUGIN_STACK_REGION (us-east-1), PLUGIN_STACK_KEYS_DIR
# (<state-dir>/keys), PLUGIN_STACK_VENV (<repo>/.venv).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
readonly SCRIPT_DIR REPO_ROOT
readonly LOOPBACK=127.0.0.1
readonly MOTO_PORT=${PLUGIN_STACK_MOTO_PORT:-5000}
readonly EIC_PORT=${PLUGIN_STACK_EIC_PORT:-5001}
readonly SSM_PORT=${PLUGIN_STACK_SSM_PORT:-5002}
readonly REGION=${PLUGIN_STACK_REGION:-us-east-1}
readonly VENV=${PLUGIN_STACK_VENV:-$REPO_ROOT/.venv}
# util-linux brings setpriv (the host script's privilege drop) and flock;
# busybox and wget are downloaders the host-script tests use.
readonly APT_PACKAGES=(openssh-server openssh-client sudo shellcheck openssl curl jq python3 python3-venv busybox util-linux wget iproute2)
readonly PIP_PACKAGES=('moto[server]' cargo-lambda awscli boto3 cfn-lint aws-sam-cli)
# pip constraints pinning PIP_PACKAGES and all they pull in; its sha256 is kept
# in the venv so a changed lock means a reinstall.
readonly PIP_LOCK=$SCRIPT_DIR/requirements.lock
readonly VENV_LOCK_STAMP=$VENV/.plugin-delivery-lock.sha256
readonly START_TIMEOUT=${PLUGIN_STACK_START_TIMEOUT:-60}
# Nothing the stack talks to may go through a proxy.
readonly NO_PROXY_LIST=127.0.0.1,localhost,::1

log() { echo "stack.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

abs_path() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

check_port() {
    [[ $2 =~ ^[0-9]{1,5}$ ]] && ((10#$2 >= 1 && 10#$2 <= 65535)) && return 0
    die "$1 must be a TCP port number, got '$2'"
}

# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------

apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

cmd_install() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        ((EUID == 0)) || die "apt packages missing (${missing[*]}); run as root"
        log "installing ${missing[*]}"
        if ! apt_lists_present; then
            apt-get update
        fi
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
            apt-get update
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
        fi
    fi

    [[ -f $PIP_LOCK ]] || die "$PIP_LOCK is missing"
    local lock_sum
    lock_sum=$(sha256sum "$PIP_LOCK" | cut -d' ' -f1)
    if [[ ! -x $VENV/bin/python ]]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    if [[ -f $VENV_LOCK_STAMP && $(<"$VENV_LOCK_STAMP") == "$lock_sum" &&
        -x $VENV/bin/moto_server && -x $VENV/bin/cargo-lambda && -x $VENV/bin/aws &&
        -x $VENV/bin/cfn-lint && -x $VENV/bin/sam ]] &&
        "$VENV/bin/python" -c 'import boto3, moto, flask' 2>/dev/null; then
        :
    else
        log "installing ${PIP_PACKAGES[*]} into $VENV (pinned by $PIP_LOCK)"
        rm -f "$VENV_LOCK_STAMP"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
            -c "$PIP_LOCK" "${PIP_PACKAGES[@]}"
        printf '%s\n' "$lock_sum" >"$VENV_LOCK_STAMP"
    fi
    ensure_login_user
    log "install: done"
}

# The workspace hosts' login user, as on a real instance: a normal account
# that runs the host script through passwordless `sudo -n`.
readonly LOGIN_USER=pd-login
ensure_login_user() {
    ((EUID == 0)) || return 0
    if ! id "$LOGIN_USER" >/dev/null 2>&1; then
        log "creating login user $LOGIN_USER"
        useradd --create-home --shell /bin/sh "$LOGIN_USER"
    fi
    # With UsePAM no, sshd treats a '!' password as a locked account.
    usermod -p '*' "$LOGIN_USER"
    local rule="/etc/sudoers.d/plugin-delivery-stack"
    if [[ ! -f $rule ]]; then
        printf '%s ALL=(root) NOPASSWD: ALL\n' "$LOGIN_USER" >"$rule.tmp"
        chmod 0440 "$rule.tmp"
        visudo -cf "$rule.tmp" >/dev/null
        mv "$rule.tmp" "$rule"
    fi
}

# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------

# curl to loopback, never through a proxy; prints the body.
http_get() {
    curl --noproxy '*' -sf --max-time 3 "$1"
}

moto_healthy() {
    local body
    body=$(http_get "http://$LOOPBACK:$1/moto-api/config") || return 1
    [[ $body == '{'* ]]
}

# True if the moto on the port is today's moto_server.py (presigned-URL expiry
# enforced, fault injection available).
moto_wrapped() {
    local body
    body=$(http_get "http://$LOOPBACK:$1/_stack/moto-wrapper") || return 1
    [[ $body == *'"service": "moto-wrapper"'* && $body == *'"fault_injection": true'* ]]
}

# Prints the emulator's health JSON if an emulator answers on the port.
eic_health() {
    local body
    body=$(http_get "http://$LOOPBACK:$1/_emulator/health") || return 1
    [[ $body == *'"service": "eic-emulator"'* ]] || return 1
    printf '%s\n' "$body"
}

# Prints the SSM emulator's health JSON if one answers on the port.
ssm_health() {
    local body
    body=$(http_get "http://$LOOPBACK:$1/_emulator/health") || return 1
    [[ $body == *'"service": "ssm-emulator"'* ]] || return 1
    printf '%s\n' "$body"
}

json_field() {
    "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$LOOPBACK" "$1" 2>/dev/null
}

# pid from <pidfile> if that process is alive and its command line has <marker>.
live_pid() {
    local pidfile=$1 marker=$2 pid
    [[ -f $pidfile ]] || return 1
    pid=$(head -n1 "$pidfile" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker" || return 1
    printf '%s\n' "$pid"
}

stop_pidfile() {
    local name=$1 pidfile=$2 marker=$3 pid i
    if pid=$(live_pid "$pidfile" "$marker"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# start_bg <name> <pidfile> <logfile> <cmd...>: detached, all fds redirected
# (so callers capturing our output never wait on it), lock fd closed.
start_bg() {
    local name=$1 pidfile=$2 logfile=$3
    shift 3
    log "starting $name: $*"
    NO_PROXY=$NO_PROXY_LIST no_proxy=$NO_PROXY_LIST AWS_EC2_METADATA_DISABLED=true \
        AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=$REGION \
        AWS_DEFAULT_REGION=$REGION \
        setsid "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    echo "$!" >"$pidfile"
}

# wait_healthy <name> <pidfile> <marker> <logfile> <check-cmd...>
wait_healthy() {
    local name=$1 pidfile=$2 marker=$3 logfile=$4 i
    shift 4
    for ((i = 0; i < START_TIMEOUT * 5; i++)); do
        if "$@" >/dev/null; then
            return 0
        fi
        if ! live_pid "$pidfile" "$marker" >/dev/null; then
            log "$name exited during start-up; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
    log "$name did not answer within ${START_TIMEOUT}s; last lines of $logfile:"
    tail -n 20 "$logfile" >&2 || true
    stop_pidfile "$name" "$pidfile" "$marker"
    exit 1
}

# The keys dir must be reachable by `nobody` (sshd's AuthorizedKeysCommandUser).
nobody_can_reach() {
    ((EUID == 0)) || return 0
    runuser -u nobody -- test -x "$1" 2>/dev/null
}

pick_keys_dir() {
    local state_dir=$1 dir
    if [[ -n ${PLUGIN_STACK_KEYS_DIR:-} ]]; then
        dir=$(abs_path "$PLUGIN_STACK_KEYS_DIR")
    else
        dir=$state_dir/keys
    fi
    mkdir -p "$dir"
    chmod 0755 "$dir"
    if ! nobody_can_reach "$dir"; then
        if [[ -n ${PLUGIN_STACK_KEYS_DIR:-} ]]; then
            die "user nobody cannot reach PLUGIN_STACK_KEYS_DIR=$dir"
        fi
        # e.g. a checkout under a 0700 home directory: keep keys under /run.
        dir=/run/plugin-delivery-stack/keys-$(printf '%s' "$state_dir" | cksum | cut -d' ' -f1)
        install -d -m 0755 /run/plugin-delivery-stack
        install -d -m 0755 "$dir"
        log "$state_dir is not reachable by user nobody; keys go to $dir"
    fi
    printf '%s\n' "$dir"
}

# export NAME=value, single-quoted only when the value needs it, so the file
# is easy to parse as KEY=VALUE lines as well as to source.
env_line() {
    if [[ $2 =~ ^[A-Za-z0-9_./:,@+=-]*$ ]]; then
        printf 'export %s=%s\n' "$1" "$2"
    else
        printf "export %s='%s'\n" "$1" "${2//\'/\'\\\'\'}"
    fi
}

write_env() {
    local state_dir=$1 keys_dir=$2 ssm_dir=$3 tmp
    tmp=$(mktemp "$state_dir/.env.XXXXXX")
    {
        echo "# Written by tests/stack/stack.sh up; source it: . $state_dir/env"
        env_line AWS_ENDPOINT_URL "http://$LOOPBACK:$MOTO_PORT"
        env_line AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT "http://$LOOPBACK:$EIC_PORT"
        env_line AWS_ENDPOINT_URL_SSM "http://$LOOPBACK:$SSM_PORT"
        env_line AWS_ACCESS_KEY_ID test
        env_line AWS_SECRET_ACCESS_KEY test
        env_line AWS_REGION "$REGION"
        env_line AWS_DEFAULT_REGION "$REGION"
        env_line AWS_EC2_METADATA_DISABLED true
        env_line NO_PROXY "$NO_PROXY_LIST"
        env_line no_proxy "$NO_PROXY_LIST"
        env_line PLUGIN_STACK_STATE_DIR "$state_dir"
        env_line PLUGIN_STACK_KEYS_DIR "$keys_dir"
        env_line PLUGIN_STACK_HOSTS_DIR "$state_dir/hosts"
        env_line PLUGIN_STACK_MOTO_PORT "$MOTO_PORT"
        env_line PLUGIN_STACK_EIC_PORT "$EIC_PORT"
        env_line PLUGIN_STACK_SSM_PORT "$SSM_PORT"
        env_line PLUGIN_STACK_MOTO_URL "http://$LOOPBACK:$MOTO_PORT"
        env_line PLUGIN_STACK_EIC_URL "http://$LOOPBACK:$EIC_PORT"
        env_line PLUGIN_STACK_SSM_URL "http://$LOOPBACK:$SSM_PORT"
        env_line PLUGIN_STACK_SSM_STATE_DIR "$ssm_dir"
        env_line PLUGIN_STACK_SSHD_HOST "$SCRIPT_DIR/sshd-host.sh"
        env_line PLUGIN_STACK_VENV "$VENV"
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$state_dir/env"
}

lock_state_dir() {
    exec 9>"$1/.lock"
    flock 9
}

# ---------------------------------------------------------------------------
# up / down / status
# ---------------------------------------------------------------------------

cmd_up() {
    (($# <= 1)) || usage
    local state_dir keys_dir ssm_dir health reported
    state_dir=$(abs_path "${1:-$REPO_ROOT/.stack}")
    check_port PLUGIN_STACK_MOTO_PORT "$MOTO_PORT"
    check_port PLUGIN_STACK_EIC_PORT "$EIC_PORT"
    check_port PLUGIN_STACK_SSM_PORT "$SSM_PORT"
    [[ $MOTO_PORT != "$EIC_PORT" && $MOTO_PORT != "$SSM_PORT" && $EIC_PORT != "$SSM_PORT" ]] ||
        die "moto, the EIC emulator and the SSM emulator need different ports"
    [[ -x $VENV/bin/moto_server && -x $VENV/bin/python ]] ||
        die "$VENV is not set up; run: $SCRIPT_DIR/stack.sh install"
    mkdir -p "$state_dir" "$state_dir/hosts"
    chmod 0755 "$state_dir" "$state_dir/hosts"
    lock_state_dir "$state_dir"

    # moto
    if moto_healthy "$MOTO_PORT"; then
        log "moto already serving $LOOPBACK:$MOTO_PORT; reusing it"
        # Restarting it would drop the state of whoever is using it.
        moto_wrapped "$MOTO_PORT" ||
            log "warning: that moto is not moto_server.py, so presigned URLs never expire;" \
                "run: $SCRIPT_DIR/stack.sh down && $SCRIPT_DIR/stack.sh up"
    else
        rm -f "$state_dir/moto.pid"
        port_open "$MOTO_PORT" && die "port $MOTO_PORT is taken by something that is not moto"
        start_bg moto "$state_dir/moto.pid" "$state_dir/moto.log" \
            "$VENV/bin/python" "$SCRIPT_DIR/moto_server.py" -H "$LOOPBACK" -p "$MOTO_PORT"
        wait_healthy moto "$state_dir/moto.pid" moto_server "$state_dir/moto.log" \
            moto_healthy "$MOTO_PORT"
    fi

    # EC2 Instance Connect emulator
    if health=$(eic_health "$EIC_PORT"); then
        reported=$(json_field ec2_endpoint <<<"$health")
        [[ $reported == "http://$LOOPBACK:$MOTO_PORT" ]] ||
            die "the emulator on port $EIC_PORT talks to $reported, not moto on port $MOTO_PORT"
        keys_dir=$(json_field keys_dir <<<"$health")
        log "EIC emulator already serving $LOOPBACK:$EIC_PORT (keys in $keys_dir); reusing it"
    else
        rm -f "$state_dir/eic.pid"
        port_open "$EIC_PORT" && die "port $EIC_PORT is taken by something that is not the EIC emulator"
        keys_dir=$(pick_keys_dir "$state_dir")
        start_bg "EIC emulator" "$state_dir/eic.pid" "$state_dir/eic.log" \
            "$VENV/bin/python" "$SCRIPT_DIR/eic_emulator.py" --host "$LOOPBACK" \
            --port "$EIC_PORT" --keys-dir "$keys_dir" \
            --ec2-endpoint "http://$LOOPBACK:$MOTO_PORT" --region "$REGION"
        wait_healthy "EIC emulator" "$state_dir/eic.pid" eic_emulator.py "$state_dir/eic.log" \
            eic_health "$EIC_PORT"
    fi

    # SSM Run Command emulator (relays every other SSM operation to moto)
    if health=$(ssm_health "$SSM_PORT"); then
        reported=$(json_field moto_endpoint <<<"$health")
        [[ $reported == "http://$LOOPBACK:$MOTO_PORT" ]] ||
            die "the SSM emulator on port $SSM_PORT talks to $reported, not moto on port $MOTO_PORT"
        ssm_dir=$(json_field state_dir <<<"$health")
        log "SSM emulator already serving $LOOPBACK:$SSM_PORT (state in $ssm_dir); reusing it"
    else
        rm -f "$state_dir/ssm.pid"
        port_open "$SSM_PORT" && die "port $SSM_PORT is taken by something that is not the SSM emulator"
        ssm_dir=$state_dir/ssm
        start_bg "SSM emulator" "$state_dir/ssm.pid" "$state_dir/ssm.log" \
            "$VENV/bin/python" "$SCRIPT_DIR/ssm_emulator.py" --host "$LOOPBACK" \
            --port "$SSM_PORT" --state-dir "$ssm_dir" \
            --moto-endpoint "http://$LOOPBACK:$MOTO_PORT" --region "$REGION"
        wait_healthy "SSM emulator" "$state_dir/ssm.pid" ssm_emulator.py "$state_dir/ssm.log" \
            ssm_health "$SSM_PORT"
    fi

    write_env "$state_dir" "$keys_dir" "$ssm_dir"
    log "up: moto http://$LOOPBACK:$MOTO_PORT, EIC http://$LOOPBACK:$EIC_PORT," \
        "SSM http://$LOOPBACK:$SSM_PORT, env in $state_dir/env"
    printf '%s\n' "$state_dir/env"
}

cmd_down() {
    (($# <= 1)) || usage
    local state_dir host
    state_dir=$(abs_path "${1:-$REPO_ROOT/.stack}")
    [[ -d $state_dir ]] || return 0
    lock_state_dir "$state_dir"
    for host in "$state_dir"/hosts/*/; do
        [[ -f $host/sshd.pid ]] || continue
        log "stopping sshd host ${host%/}"
        "$SCRIPT_DIR/sshd-host.sh" stop "${host%/}" || true
    done
    stop_pidfile "SSM emulator" "$state_dir/ssm.pid" ssm_emulator.py
    stop_pidfile "EIC emulator" "$state_dir/eic.pid" eic_emulator.py
    stop_pidfile moto "$state_dir/moto.pid" moto_server
    rm -f "$state_dir/env"
    log "down: $state_dir"
}

cmd_status() {
    (($# <= 1)) || usage
    local state_dir host pid rc=0
    state_dir=$(abs_path "${1:-$REPO_ROOT/.stack}")
    local how="moto_server.py, presigned URLs expire"
    moto_wrapped "$MOTO_PORT" || how="plain moto, presigned URLs never expire"
    if pid=$(live_pid "$state_dir/moto.pid" moto_server); then
        echo "moto: running (pid $pid) on $LOOPBACK:$MOTO_PORT ($how)"
    elif moto_healthy "$MOTO_PORT"; then
        echo "moto: served on $LOOPBACK:$MOTO_PORT by a process this state dir did not start ($how)"
    else
        echo "moto: down"
        rc=1
    fi
    if pid=$(live_pid "$state_dir/eic.pid" eic_emulator.py); then
        echo "eic-emulator: running (pid $pid) on $LOOPBACK:$EIC_PORT"
    elif eic_health "$EIC_PORT" >/dev/null; then
        echo "eic-emulator: served on $LOOPBACK:$EIC_PORT by a process this state dir did not start"
    else
        echo "eic-emulator: down"
        rc=1
    fi
    if pid=$(live_pid "$state_dir/ssm.pid" ssm_emulator.py); then
        echo "ssm-emulator: running (pid $pid) on $LOOPBACK:$SSM_PORT"
    elif ssm_health "$SSM_PORT" >/dev/null; then
        echo "ssm-emulator: served on $LOOPBACK:$SSM_PORT by a process this state dir did not start"
    else
        echo "ssm-emulator: down"
        rc=1
    fi
    for host in "$state_dir"/hosts/*/; do
        [[ -d $host ]] || continue
        if "$SCRIPT_DIR/sshd-host.sh" status "${host%/}"; then
            echo "sshd host ${host%/}: running"
        else
            echo "sshd host ${host%/}: stopped"
        fi
    done
    return "$rc"
}

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    case "$cmd" in
        install) cmd_install "$@" ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
