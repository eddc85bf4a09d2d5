#!/usr/bin/env bash
# One emulated EC2 workspace host: a real OpenSSH sshd on its own loopback
# address that accepts only keys pushed through the EC2 Instance Connect
# emulator (eic_emulator.py) within their 60-second window.
#
#   sshd-host.sh start <state-dir> <ip> <port> <instance-id> <keys-dir>
#       Prints the host's public key line (ssh-ed25519 ...) on stdout once the
#       port accepts TCP connections. Idempotent: a host already running with
#       the same settings is left alone; changed settings restart it.
#   sshd-host.sh stop <state-dir>
#       Stops the sshd started for <state-dir> (and its open sessions).
#   sshd-host.sh status <state-dir>
#       Exit 0 if it is running.
#
# <ip> must be a 127.x.y.z address (the whole loopback /8 works on Linux
# without setup). Must run as root: sshd needs it, and so does installing the
# AuthorizedKeysCommand under /usr/local/libexec/plugin-delivery-stack/.
#
# Files in <state-dir>: ssh_host_ed25519_key{,.pub}, sshd_config, sshd.pid,
# sshd.log (sshd -E), host.env (the settings, shell-sourceable).
set -euo pipefail

readonly LIBEXEC_DIR=/usr/local/libexec/plugin-delivery-stack
readonly AKC=$LIBEXEC_DIR/eic-authorized-keys
readonly SSHD=${PLUGIN_STACK_SSHD:-/usr/sbin/sshd}
readonly START_TIMEOUT=${PLUGIN_STACK_SSHD_START_TIMEOUT:-20}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

die() {
    echo "sshd-host.sh: $*" >&2
    exit 1
}

usage() {
    cat >&2 <<'EOF'
usage: sshd-host.sh start <state-dir> <ip> <port> <instance-id> <keys-dir>
       sshd-host.sh stop <state-dir>
       sshd-host.sh status <state-dir>
EOF
    exit 2
}

abs_path() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

# Paths end up unquoted in sshd_config and in the AuthorizedKeysCommand
# argument list, where whitespace, quotes and % tokens would be mangled.
check_config_path() {
    case "$2" in
        *[[:space:]\"\'%\\]*) die "$1 must not contain whitespace, quotes, backslashes or %: $2" ;;
    esac
}

is_loopback_ip() {
    local a b c d
    [[ $1 =~ ^127\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
    a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]} c=${BASH_REMATCH[3]}
    for d in "$a" "$b" "$c"; do
        ((10#$d <= 255)) || return 1
    done
}

port_open() {
    # bash's /dev/tcp; a closed loopback port refuses at once.
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# The pid in <state-dir>/sshd.pid, if that process is the sshd we started.
running_pid() {
    local state_dir=$1 pid
    [[ -f $state_dir/sshd.pid ]] || return 1
    pid=$(head -n1 "$state_dir/sshd.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-f $state_dir/sshd_config" || return 1
    printf '%s\n' "$pid"
}

install_authorized_keys_command() {
    local src=$SCRIPT_DIR/eic-authorized-keys tmp dir mode
    [[ -f $src ]] || die "missing $src"
    if [[ -f $AKC ]] && cmp -s "$src" "$AKC" &&
        [[ $(stat -c '%u:%g %a' "$AKC") == "0:0 755" ]]; then
        :
    else
        install -d -o root -g root -m 0755 "$LIBEXEC_DIR"
        tmp=$(mktemp "$LIBEXEC_DIR/.eic-authorized-keys.XXXXXX")
        cat "$src" >"$tmp"
        chown root:root "$tmp"
        chmod 0755 "$tmp"
        mv -f "$tmp" "$AKC"
    fi
    # sshd refuses the command unless it and every directory above it are
    # root-owned and not writable by group or others.
    dir=$AKC
    while :; do
        [[ $(stat -c '%u' "$dir") == 0 ]] || die "$dir must be owned by root for sshd"
        mode=$(stat -c '%a' "$dir")
        if ((8#$mode & 8#022)); then
            die "$dir must not be group/world-writable for sshd"
        fi
        [[ $dir == / ]] && break
        dir=$(dirname "$dir")
    done
}

write_config() {
    local cfg=$1 state_dir=$2 ip=$3 port=$4 instance_id=$5 keys_dir=$6
    cat >"$cfg" <<EOF
# Written by tests/stack/sshd-host.sh for emulated instance $instance_id.
ListenAddress $ip:$port
HostKey $state_dir/ssh_host_ed25519_key
PidFile $state_dir/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile none
AuthorizedKeysCommand $AKC $keys_dir $instance_id %u
AuthorizedKeysCommandUser nobody
PermitRootLogin prohibit-password
UsePAM no
MaxStartups 200
MaxSessions 50
StrictModes no
LogLevel VERBOSE
PrintMotd no
PrintLastLog no
X11Forwarding no
Subsystem sftp internal-sftp
EOF
    # Newer OpenSSH (9.8+) throttles sources that fail to authenticate; tests
    # fail logins on purpose, so switch that off where the option exists.
    if "$SSHD" -t -f "$cfg" -o PerSourcePenalties=no >/dev/null 2>&1; then
        echo "PerSourcePenalties no" >>"$cfg"
    fi
}

stop_host() {
    local state_dir=$1 pid child i
    if ! pid=$(running_pid "$state_dir"); then
        rm -f "$state_dir/sshd.pid"
        return 0
    fi
    # Open sessions are children of the listener; end them too.
    for child in $(pgrep -P "$pid" || true); do
        kill -TERM "$child" 2>/dev/null || true
    done
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$state_dir/sshd.pid"
}

cmd_start() {
    (($# == 5)) || usage
    local state_dir ip=$2 port=$3 instance_id=$4 keys_dir cfg new_cfg pid i
    state_dir=$(abs_path "$1")
    keys_dir=$(abs_path "$5")
    ((EUID == 0)) || die "must run as root"
    [[ -x $SSHD ]] || die "$SSHD not found (run tests/stack/stack.sh install)"
    is_loopback_ip "$ip" || die "ip must be a 127.x.y.z loopback address: $ip"
    if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
        die "bad port: $port"
    fi
    [[ $instance_id =~ ^i-[a-f0-9]+$ ]] || die "bad instance id: $instance_id"
    check_config_path state-dir "$state_dir"
    check_config_path keys-dir "$keys_dir"

    install_authorized_keys_command
    install -d -m 0755 /run/sshd
    mkdir -p "$state_dir"
    if [[ ! -d $keys_dir ]]; then
        mkdir -p "$keys_dir"
        chmod 0755 "$keys_dir"
    fi
    # The command runs as nobody, which must be able to reach the key files.
    runuser -u nobody -- test -x "$keys_dir" ||
        die "user nobody cannot traverse $keys_dir; put the keys dir under a world-searchable path"

    if [[ ! -f $state_dir/ssh_host_ed25519_key ]]; then
        rm -f "$state_dir/ssh_host_ed25519_key.pub"
        ssh-keygen -q -t ed25519 -N '' -C "plugin-delivery-stack-$instance_id" \
            -f "$state_dir/ssh_host_ed25519_key"
    fi
    chmod 0600 "$state_dir/ssh_host_ed25519_key"

    cfg=$state_dir/sshd_config
    new_cfg=$(mktemp "$state_dir/.sshd_config.XXXXXX")
    write_config "$new_cfg" "$state_dir" "$ip" "$port" "$instance_id" "$keys_dir"

    if pid=$(running_pid "$state_dir"); then
        if cmp -s "$new_cfg" "$cfg" && port_open "$ip" "$port"; then
            rm -f "$new_cfg"
            cat "$state_dir/ssh_host_ed25519_key.pub"
            return 0
        fi
        stop_host "$state_dir"
    fi
    rm -f "$state_dir/sshd.pid"
    if port_open "$ip" "$port"; then
        rm -f "$new_cfg"
        die "$ip:$port is already in use by another process"
    fi
    mv -f "$new_cfg" "$cfg"
    chmod 0644 "$cfg"

    local test_out
    if ! test_out=$("$SSHD" -t -f "$cfg" 2>&1); then
        die "sshd rejected $cfg: $test_out"
    fi
    cat >"$state_dir/host.env" <<EOF
PLUGIN_STACK_HOST_IP=$ip
PLUGIN_STACK_HOST_PORT=$port
PLUGIN_STACK_HOST_INSTANCE_ID=$instance_id
PLUGIN_STACK_HOST_KEYS_DIR=$keys_dir
EOF
    # Daemonises; binding errors land in the log.
    "$SSHD" -f "$cfg" -E "$state_dir/sshd.log" </dev/null >/dev/null 2>&1 ||
        die "sshd failed to start; see $state_dir/sshd.log"

    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        if port_open "$ip" "$port"; then
            if running_pid "$state_dir" >/dev/null; then
                cat "$state_dir/ssh_host_ed25519_key.pub"
                return 0
            fi
        fi
        sleep 0.1
    done
    echo "sshd-host.sh: sshd on $ip:$port did not come up; last log lines:" >&2
    tail -n 20 "$state_dir/sshd.log" >&2 || true
    stop_host "$state_dir"
    exit 1
}

cmd_stop() {
    (($# == 1)) || usage
    local state_dir
    state_dir=$(abs_path "$1")
    stop_host "$state_dir"
}

cmd_status() {
    (($# == 1)) || usage
    local state_dir
    state_dir=$(abs_path "$1")
    running_pid "$state_dir" >/dev/null
}

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    case "$cmd" in
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        *) usage ;;
    esac
}

main "$@"
