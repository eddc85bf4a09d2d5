#!/bin/sh
# plugin-host: the host side of every Plugin Delivery operation.
#
# Run remotely as
#   <prefix> sh -c 'eval "$1"' plugin-host '<this text>' <op> <args...>
# The text travels as $1 so the script can start itself again as the config
# dir's owner (see "Privilege separation"). Operations:
#   install   CONFIG_DIR NAME SHA256 OWNER LOCK_WAIT RESTART_CMD [BYTES]
#             (tar.gz on stdin, or downloaded from $PLUGIN_ARCHIVE_URL when
#             that is set; BYTES, the archive's size, only picks the hash
#             and inflate tools that are quicker for it)
#   install   CONFIG_DIR - - OWNER LOCK_WAIT RESTART_CMD
#             (over SSH: stdin's first line names the plugin,
#             "NAME SHA256 [BYTES]\n", and the archive follows it. The
#             caller starts the command while it is still resolving the
#             plugin, so the session, sudo and the script's start are done
#             by the time it has it. Nothing on the host is looked at,
#             locked or written before the line. Stdin closed before a whole
#             line, or no line within the step time limit: a usage error,
#             nothing changed. Or the line is "NAME + [BYTES]\n" (BYTES:
#             about the archive's size, a hint as above) and the archive
#             follows in frames while the caller is still building it:
#             "N\n" and N bytes (N from 1 to 16777216), as many as it
#             takes, then "end SHA256\n". The digest, known last, is
#             checked like the other's; frames that end without it are a
#             digest_mismatch, nothing published. With the digest unknown
#             before the archive, the "already installed" check is made
#             once it is known: an archive of the digest already live, whose
#             tree is intact, is "unchanged" (nothing replaced, no restart)
#             as it is in the other form. Frames are cut with GNU
#             head, which reads no further than asked, under GNU timeout:
#             a host without them answers no_frames before it looks at,
#             locks or writes anything, and the caller sends the archive
#             whole instead.)
#   uninstall CONFIG_DIR NAME OWNER LOCK_WAIT RESTART_CMD
#   inventory CONFIG_DIR OWNER
#   restart   CONFIG_DIR OWNER LOCK_WAIT RESTART_CMD   (after a batch installed
#             with an empty RESTART_CMD: the runtime restarts once for the set)
# OWNER is the numeric uid:gid the config dir belongs to (neither 0, each
# at most 9 digits).
# Diagnostics go to stderr. stdout carries exactly one line, the result:
#   @@plugin-delivery-result {"status":...}
# Exit codes: 0 ok, 64 usage, 65 digest_mismatch, 66 bad_archive,
# 69 no_config_dir, 70 restart_failed, 71 unwire_failed,
# 72 no_privilege_drop, 73 migrate_failed, 74 fetch_failed, 75 busy,
# 77 bad_config_dir, 78 no_frames, 1 internal.
#
# Transports: over SSH the archive streams on stdin. Through SSM Run Command
# there is no stdin, so the command sets PLUGIN_ARCHIVE_URL (a presigned S3
# URL, valid a few minutes) and the script downloads the archive itself with
# curl or wget; everything after the download is the same code.
#
# Privilege separation. The config dir belongs to the agent user (OWNER), an
# AI agent that runs arbitrary code, so no path under it is ever followed,
# created, written, moved or removed as root (the one exception, the
# migration of the earlier layout, works on directory descriptors opened
# with O_NOFOLLOW and touches only what root itself made). Root only:
#   - checks CONFIG_DIR: a real directory, no symlink on its path, owned by
#     OWNER (else bad_config_dir, nothing changes);
#   - keeps its own state in $PLUGIN_STATE_ROOT/<CONFIG_DIR, "/" as "%">/
#     (default /var/lib/plugin-delivery, every dir 0700 root):
#       lock             flock file serialising mutating operations
#       sums/NAME@SHA    sha256sum list of each installed tree, so a tree
#                        changed on the host is found and repaired
#       restart-pending  a change landed that the runtime was not restarted for
#       work/            this operation's step channels (FIFOs), the
#                        downloaded archive (SSM), the new tree's sums and
#                        the owner step's report
#   - reads (stdin) or downloads the archive, copies it to the owner step
#     as it arrives and verifies its digest: the step extracts meanwhile,
#     into its own staging dir, and publishes only on root's word once the
#     whole archive matched;
#   - runs the restart command.
# Everything inside CONFIG_DIR is done by this same script started again as
# OWNER (setpriv --reuid --regid --clear-groups --nnp, util-linux; a clean
# environment, stdin and fds only as each step needs, a time limit): the
# kernel then refuses whatever the agent user could not do itself, whatever
# links it plants. Without a setpriv that can do that the script refuses
# (no_privilege_drop) and changes nothing. The owner steps (owner-install,
# owner-remove, owner-list; one per operation) write a report to a file of
# root's: a "changing" line before their first change, then one "ok ..."
# line or an error result (owner-install also tells root through a FIFO
# what is installed before root reads the archive, and takes the archive
# through another). Root trusts none of it: every word is checked, an error is
# reported by its code with root's own fixed message. The drift check itself
# runs as OWNER (root must not read the agent's files), so against the agent
# it is advisory: it can hide its own edits from repair, nothing more.
#
# Layout under CONFIG_DIR, all OWNER's (one filesystem, so every mv is a
# rename(2)):
#   plugins/NAME -> ../.plugin-delivery/store/NAME@SHA   (relative symlink;
#                   NAME@SHA-r when a damaged tree of the same digest is
#                   replaced, so the live tree is never removed first)
#   .plugin-delivery/staging/  scratch space, emptied at the start of each operation
#   .plugin-delivery/store/    plugin trees, one per installed digest
#   .plugin-delivery/aside/    a legacy plugin dir during its replacement only
# Swapping the symlink with rename(2) is atomic, so plugins/NAME is always the
# complete old tree or the complete new one. The installed digest is read back
# from the link target. Hosts of the earlier layout (root's lock and sums in
# .plugin-delivery/) are migrated by their first operation (migrate_legacy).

# Predictable modes for what we create; the restart command gets the
# caller's umask back (restart_runtime).
caller_umask=$(umask)
umask 022

unset CDPATH

# SHA-256 in sha256sum's line format: OpenSSL's when the host has it ("HASH
# *NAME" is sha256sum's binary mode, which `sha256sum -c` reads too), as it
# uses the CPU's SHA instructions (100 MiB: 0.13 s against coreutils' 0.66 s
# on the bench machine); else sha256sum. Both the archive and the per-file
# sums are taken with it; no plugin path needs sha256sum's escaping (archive
# paths hold no control character and no backslash).
SHA256=sha256sum
command -v openssl >/dev/null 2>&1 && SHA256='openssl dgst -sha256 -r'
# How the step inflates the archive: "gzip" (tar -z), or "python" for an
# archive of 1 MiB or more (check_bytes), when the host has python3.
# Python's zlib inflates stored deflate blocks, the bulk of an archive of
# incompressible files, ten times as fast as gzip does (100 MiB: 0.07
# against 0.65 CPU-seconds on the bench machine), and starts in 10 ms, which
# a small archive would not win back.
inflate=gzip
# Where a process finds its own fds by name (/dev/fd is a link to it on
# most systems, not all).
dev_fd=/dev/fd
[ -d /dev/fd/ ] || dev_fd=/proc/self/fd

# Character classes are spelled out, not ranges like a-z: ranges follow the
# locale's collation in some shells, and the runtime must keep its locale.
LOWER='abcdefghijklmnopqrstuvwxyz'
UPPER='ABCDEFGHIJKLMNOPQRSTUVWXYZ'
DIGITS='0123456789'
NL='
'

MARKER='@@plugin-delivery-result'
STATE_REL='.plugin-delivery'
STORE_REL='../.plugin-delivery/store'

self=${1-}  # this script's text, to start the owner steps with
[ "$#" -gt 0 ] && shift

plugin=''   # echoed in results only once NAME has been validated
work=''     # owner: this operation's staging dir, removed on any exit
scratch=''  # owner: a dir beside it for the step's own notes, the same
aside=''    # owner: legacy plugin dir moved aside, put back unless published
rwork=''    # root: this operation's dir in its own state, removed on exit

say() { printf 'plugin-host: %s\n' "$*" >&2; }

# Undo everything not yet published. Runs before the result is printed (so a
# closed stdout cannot skip it) and again from the EXIT trap as a safety net.
cleanup() {
    if [ -n "$aside" ] && [ ! -e "$link" ] && [ ! -L "$link" ]; then
        mv "$aside" "$link" || say 'could not restore the legacy plugin directory'
    fi
    aside=''
    if [ -n "$work" ]; then
        rm -rf "$work"
        work=''
    fi
    if [ -n "$scratch" ]; then
        rm -rf "$scratch"
        scratch=''
    fi
    if [ -n "$rwork" ]; then
        rm -rf "$rwork"
        rwork=''
    fi
}

# fail CODE MESSAGE EXIT: MESSAGE is a fixed text, safe to embed in JSON.
fail() {
    if [ -n "${step_pid-}" ]; then
        # A waiting install step hears no "go" and ends; one that is
        # applying finishes first (its time limit bounds the wait). One
        # still extracting gets the end of its feed. One whose channels
        # root never opened (a signal came first) would block opening them
        # for ever: it is ended.
        exec 6>&- 7<&- 3>&-
        [ "${step_open-}" = true ] || kill -KILL "$step_pid" 2>/dev/null || :
        wait "$step_pid" || :
        step_pid=''
    fi
    # What the last step said it changed decides whether the pending
    # restart stays; the report is read afresh (a signal can land between
    # a step's end and root's reading it). When unsure, it stays.
    if [ -n "${book-}" ]; then
        [ -n "$rwork" ] && [ -f "$rwork/report" ] &&
            report=$(head -c 1048576 "$rwork/report" 2>/dev/null)
        unmark_pending
    fi
    cleanup
    printf '%s {"status":"error","plugin":"%s","code":"%s","message":"%s"}\n' \
        "$MARKER" "$plugin" "$1" "$2"
    exit "$3"
}

usage() { fail usage "$1" 64; }

# done_ok STATUS DIGEST PREVIOUS RESTARTED: "pending_restart" says a change
# is on disk that the runtime has not been restarted for yet;
# "previous_kind" is what an install or uninstall found at plugins/NAME
# (none, link or legacy, as the owner step reported it; empty when there
# was no such step).
done_ok() {
    cleanup
    do_pending=false
    [ -n "${book-}" ] && [ -e "$book/restart-pending" ] && do_pending=true
    printf '%s {"status":"%s","plugin":"%s","digest":"%s","previous":"%s","previous_kind":"%s","restarted":%s,"pending_restart":%s}\n' \
        "$MARKER" "$1" "$plugin" "$2" "$3" "${rw_kind-}" "$4" "$do_pending"
    exit 0
}

trap cleanup EXIT
trap 'fail internal "interrupted" 1' INT TERM HUP
# A vanished reader (ssh connection gone) must not kill us before cleanup.
trap 'exit 1' PIPE

# ---------------------------------------------------------------- validation

valid_name() {
    case $1 in
        '' | *..* | [!"$LOWER$DIGITS"]* | *[!"$LOWER$DIGITS"._-]*) return 1 ;;
    esac
    [ "${#1}" -le 128 ]
}

valid_sha() {
    case $1 in
        *[!"${DIGITS}abcdef"]*) return 1 ;;
    esac
    [ "${#1}" -eq 64 ]
}

# Numeric uid:gid, neither root's: the owner steps must drop privileges.
valid_owner() {
    case $1 in
        '' | *[!"$DIGITS":]* | :* | *: | *:*:*) return 1 ;;
        *:*) [ "${#1}" -le 19 ] || return 1 ;;
        *) return 1 ;;
    esac
    vo_uid=${1%%:*}
    vo_gid=${1#*:}
    [ "${#vo_uid}" -le 9 ] && [ "${#vo_gid}" -le 9 ] || return 1
    case $vo_uid in *[!0]*) ;; *) return 1 ;; esac
    case $vo_gid in *[!0]*) ;; *) return 1 ;; esac
}

valid_wait() {
    case $1 in
        '' | *[!"$DIGITS"]*) return 1 ;;
    esac
    [ "${#1}" -le 6 ]
}

# An absolute, normalised path of plain characters: no "." or ".."
# component, no "//", no trailing "/", not "/" itself.
check_config_dir() {
    case $1 in
        /*) ;;
        *) usage 'config dir must be an absolute path' ;;
    esac
    case $1 in
        / | */ | *//* | */./* | */. | */../* | */.. | *[!"$LOWER$UPPER$DIGITS"/._-]*)
            usage 'config dir must be a plain normalised path' ;;
    esac
    [ "${#1}" -le 240 ] || usage 'config dir must be a plain normalised path'
    cfg=$1
}

check_name() {
    valid_name "$1" || usage 'invalid plugin name'
    name=$1
    plugin=$1
}

check_sha() {
    valid_sha "$1" || usage 'digest must be 64 lowercase hex characters'
    sha=$1
}

check_owner() {
    valid_owner "$1" || usage 'owner must be numeric uid:gid other than root'
    uid=${1%%:*}
    gid=${1#*:}
}

check_wait() {
    valid_wait "$1" || usage 'lock wait must be a whole number of seconds'
    lock_wait=$1
}

# ------------------------------------------------------------ root: its state

# Root's view of CONFIG_DIR, without following anything: every component of
# the path an existing real directory, the last owned by OWNER. Returns 1 when
# some component does not exist. A link planted after this check only changes
# where the owner steps work, which the kernel bounds to what OWNER may do.
inspect_config_dir() {
    icd_path=''
    icd_rest=${cfg#/}
    while [ -n "$icd_rest" ]; do
        icd_path=$icd_path/${icd_rest%%/*}
        case $icd_rest in
            */*) icd_rest=${icd_rest#*/} ;;
            *) icd_rest='' ;;
        esac
        [ -L "$icd_path" ] &&
            fail bad_config_dir 'the config directory or one of its parents is a symbolic link' 77
        [ -e "$icd_path" ] || return 1
        [ -d "$icd_path" ] ||
            fail bad_config_dir 'the config directory path holds something other than directories' 77
    done
    # stat does not follow a link: a swap since the loop shows the link's owner.
    icd_uid=$(stat -c %u -- "$cfg" 2>/dev/null) ||
        fail bad_config_dir 'the config directory cannot be inspected' 77
    [ "$icd_uid" = "$uid" ] ||
        fail bad_config_dir 'the config directory is not owned by the workspace user' 77
}

# Sets book, root's state dir for CONFIG_DIR (created only by open_book).
find_book() {
    state_root=${PLUGIN_STATE_ROOT:-/var/lib/plugin-delivery}
    case $state_root in
        /*) ;;
        *) usage 'state root must be an absolute path' ;;
    esac
    case $cfg/ in
        "$state_root"/*) usage 'the config dir cannot be inside the state root' ;;
    esac
    case $state_root/ in
        "$cfg"/*) usage 'the config dir cannot hold the state root' ;;
    esac
    # The path with "/" as "%" (no component holds a "%"): one name per
    # config dir, readable, and no process to compute it.
    fb_rest=${cfg#/}
    fb_key=''
    while :; do
        case $fb_rest in
            */*)
                fb_key=$fb_key${fb_rest%%/*}%
                fb_rest=${fb_rest#*/}
                ;;
            *) break ;;
        esac
    done
    book=$state_root/$fb_key$fb_rest
}

make_book() {
    if [ ! -d "$book/sums" ]; then
        (umask 077 && mkdir -p "$book/sums") || fail internal 'cannot create the state directory' 1
        printf '%s\n' "$cfg" >"$book/config-dir" || say 'could not record the config dir'
    fi
}

# SIGKILL every process with a file open under DIR (root's own work dir of
# a killed run; only called holding the lock, when no run of ours is live).
# A step blocked opening one of the run's FIFOs holds no file there yet:
# opening each FIFO read-write (which never blocks) lets it go on to where
# it holds some. DIR is root's state path, built from a validated config
# dir; the pattern is refused if it could hold a glob character.
end_leftover_steps() {
    case $1 in
        *[!"$LOWER$UPPER$DIGITS"/%._-]*) return 0 ;;
    esac
    els_fifos=false
    for els_f in "$1"/verdict "$1"/ctl "$1"/feed; do
        if [ -p "$els_f" ] && [ ! -L "$els_f" ]; then
            command exec 8<>"$els_f" && exec 8<&- && els_fifos=true
        fi
    done
    [ "$els_fifos" = true ] && sleep 0.1
    els_pids=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$1/*" 2>/dev/null |
        sed -n 's|^/proc/\([0-9]*\)/fd/.*|\1|p' | sort -u) || els_pids=''
    [ -n "$els_pids" ] || return 0
    say 'ending steps left by a run that was killed'
    # shellcheck disable=SC2086 # a list of numbers
    kill -KILL $els_pids 2>/dev/null || :
}

# Create root's state, take the host lock, migrate the earlier layout.
open_book() {
    make_book
    # fd-based so the lock lives exactly as long as this shell. "command"
    # keeps a failed redirection from killing the shell before it can report.
    command exec 9>>"$book/lock" || fail internal 'cannot open the lock file' 1
    flock -w "$lock_wait" 9 || fail busy 'another plugin operation holds the host lock' 75
    # Holding the lock: anything in work/ was left by a run killed outright,
    # and so is a process still holding a file in it (a step blocked opening
    # a channel its root will never open): ended first.
    # (A clean end removes work/, so the usual run forks nothing here.)
    if [ -e "$book/work" ] || [ -L "$book/work" ]; then
        end_leftover_steps "$book/work"
        rm -rf "$book/work" || fail internal 'cannot clear the state directory' 1
    fi
    mkdir -m 0700 "$book/work" || fail internal 'cannot create the state directory' 1
    rwork=$book/work
    migrate_legacy
}

# Hosts installed by the earlier layout kept root's lock, sums and marker in
# CONFIG_DIR/.plugin-delivery, a root-owned dir. Their first operation moves
# the sums and the marker here and hands the dir to OWNER, with plugins/NAME
# resolving throughout. Python works through directory descriptors opened
# without following links (O_NOFOLLOW), so nothing planted can redirect it.
# A root-owned .plugin-delivery: only root can have made it, so only the
# earlier layout. Checked on every operation: no marker can skip it.
legacy_layout() {
    # Link first: the two tests after it only read metadata, and Python
    # re-checks everything through O_NOFOLLOW descriptors before acting.
    [ ! -L "$cfg/$STATE_REL" ] && [ -d "$cfg/$STATE_REL" ] && [ -O "$cfg/$STATE_REL" ]
}

migrate_legacy() {
    if legacy_layout; then
        command -v python3 >/dev/null 2>&1 ||
            fail migrate_failed 'python3 is needed once to migrate this host' 73
        python3 -I - "$cfg" "$uid" "$gid" "$book" >&2 9>&- <<'PY' ||
import os
import re
import stat
import sys

cfg, uid, gid, book = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SUMS = re.compile(r"[a-z0-9][a-z0-9._-]*@[0-9a-f]{64}\Z")


def opendir(name, dir_fd):
    return os.open(name, DIR, dir_fd=dir_fd)


def walk(path):
    fd = os.open("/", DIR)
    for comp in path.strip("/").split("/"):
        try:
            nfd = opendir(comp, fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def lstat(name, dir_fd):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove(name, dir_fd):
    st = lstat(name, dir_fd)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = opendir(name, dir_fd)
    try:
        for e in os.listdir(fd):
            remove(e, fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def write_book(rel, data):
    path = os.path.join(book, rel)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


cfd = walk(cfg)
try:
    sfd = opendir(".plugin-delivery", cfd)
except OSError:
    sys.exit(0)  # gone, or not a real directory: nothing of the old layout
if os.fstat(sfd).st_uid != 0:
    sys.exit(0)  # already OWNER's: the new layout
st = lstat("sums", sfd)
if st is not None and stat.S_ISDIR(st.st_mode):
    dfd = opendir("sums", sfd)
    for e in os.listdir(dfd):
        est = lstat(e, dfd)
        if SUMS.match(e) and est is not None and stat.S_ISREG(est.st_mode) and est.st_uid == 0:
            fd = os.open(e, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                write_book(os.path.join("sums", e), f.read())
    os.close(dfd)
remove("sums", sfd)
if lstat("restart-pending", sfd) is not None:
    write_book("restart-pending", b"")
    remove("restart-pending", sfd)
remove("lock", sfd)
# Root-owned leftovers of killed runs: OWNER could not clear them.
st = lstat("staging", sfd)
if st is not None and stat.S_ISDIR(st.st_mode):
    dfd = opendir("staging", sfd)
    for e in os.listdir(dfd):
        remove(e, dfd)
    os.close(dfd)
for d in ("staging", "store", "aside"):
    st = lstat(d, sfd)
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == 0:
        dfd = opendir(d, sfd)
        os.fchown(dfd, uid, gid)
        os.close(dfd)
os.fchown(sfd, uid, gid)
PY
            fail migrate_failed 'the host could not migrate its plugin state' 73
    fi
}

# The sums of the trees named (NAME@SHA...) that root has, as one stream for
# the owner's check: "== NAME@SHA", then that tree's sha256sum lines.
send_sums() {
    ss_files=''
    for ss_tree in "$@"; do
        [ -f "$book/sums/$ss_tree" ] && ss_files="$ss_files $ss_tree"
    done
    [ -n "$ss_files" ] || return 0
    # shellcheck disable=SC2086 # the names are validated NAME@SHA words
    (cd "$book/sums" && awk 'FNR == 1 { print "== " FILENAME } { print }' $ss_files)
}

# Drop sums of NAME other than NAME@$1 ($1 may be empty).
prune_sums() {
    for ps_sums in "$book/sums/$name"@*; do
        [ -n "$1" ] && [ "$ps_sums" = "$book/sums/$name@$1" ] && continue
        [ -e "$ps_sums" ] && { rm -f "$ps_sums" || say 'could not remove old sums'; }
    done
}

# Sets restarted (true or false, the result's "restarted" field); a failed
# restart command fails the operation (restart_failed). No subshell: the
# caller's umask is set for the command and taken back after it.
restart_runtime() {
    restarted=false
    [ -n "$restart_cmd" ] || return 0
    # The runtime it starts must not inherit the archive's presigned URL.
    unset PLUGIN_ARCHIVE_URL
    # The marker (set before a change) goes only once the restart
    # succeeded: a run killed in between leaves it for the next one.
    # fd 9 closed: a daemon started here must not inherit (and keep) the lock.
    # stdout to stderr: the result line must stay the only thing on stdout.
    # PLUGIN_CONFIG_DIR: which config dir changed, for the runtime's tooling.
    umask "$caller_umask"
    rr_rc=0
    PLUGIN_CONFIG_DIR=$cfg sh -c "$restart_cmd" </dev/null >&2 9>&- || rr_rc=$?
    umask 022
    [ "$rr_rc" -eq 0 ] || fail restart_failed 'the runtime restart command failed' 70
    rm -f "$book/restart-pending"
    restarted=true
}

restart_if_owed() {
    restarted=false
    if [ -e "$book/restart-pending" ] && [ -n "$restart_cmd" ]; then
        restart_runtime
    fi
}

# Download $PLUGIN_ARCHIVE_URL to $1. The URL goes to curl/wget on stdin, not
# argv, so other users on the host never see it in the process table. Only
# the download happens here; the caller's digest check decides if it is good.
fetch_archive() {
    fa_max=${PLUGIN_FETCH_MAX_SECS:-600}
    valid_wait "$fa_max" || usage 'fetch time limit must be a whole number of seconds'
    # Presigned URLs are percent-encoded: a quote, backslash or line break
    # could only smuggle options into curl's config syntax.
    fa_cr=$(printf '\r')
    case $PLUGIN_ARCHIVE_URL in
        *'"'* | *\\* | *"$fa_cr"* | *"$NL"*) usage 'the archive URL holds characters a URL cannot hold' ;;
    esac
    if command -v curl >/dev/null 2>&1; then
        fa_code=$(printf 'url = "%s"\n' "$PLUGIN_ARCHIVE_URL" |
            curl -sS -K - -o "$1" -w '%{http_code}' --proto '=https,http' \
                --connect-timeout 15 --max-time "$fa_max" --retry 2 --retry-delay 1) ||
            fa_code=${fa_code:-000}
    elif command -v wget >/dev/null 2>&1; then
        # wget gives no usable status code, only success, "the server said
        # no" (GNU wget exit 8) or any other failure.
        if wget --version 2>/dev/null | grep -q 'GNU Wget'; then
            printf '%s\n' "$PLUGIN_ARCHIVE_URL" | wget -q -T 15 -t 3 -O "$1" -i -
            fa_rc=$?
        else
            # BusyBox wget reads no URL list, so the (short-lived) URL is
            # visible in its argv for the download's duration. No -T: it
            # crashes BusyBox 1.35's wget; the command's own timeout bounds it.
            wget -q -O "$1" "$PLUGIN_ARCHIVE_URL"
            fa_rc=$?
        fi
        case $fa_rc in
            0) fa_code=200 ;;
            8) fa_code=4xx ;;
            *) fa_code=000 ;;
        esac
    else
        fail fetch_failed 'neither curl nor wget is available to download the archive' 74
    fi
    case $fa_code in
        200) ;;
        403) fail fetch_failed 'the archive link was refused (expired or revoked)' 74 ;;
        4xx) fail fetch_failed 'the archive download was refused (the link may have expired)' 74 ;;
        000) fail fetch_failed 'the archive could not be downloaded' 74 ;;
        *) fail fetch_failed 'the archive download was answered with an error' 74 ;;
    esac
}

# --------------------------------------------------------- root: owner steps

# This script again, as OWNER: a clean environment (nothing of root's, the
# presigned URL least of all), no lock descriptor, bounded in time (a step
# the agent stops must not hold the lock for ever).
# as_owner IN OUT CMD...: stdin from IN ("-": as it is), stdout to OUT,
# set on this command alone, so that root's own stdout never points
# anywhere else (a signal's result line must reach the caller).
as_owner() {
    ao_in=$1
    ao_out=$2
    shift 2
    if [ -n "$step_timeout" ]; then
        set -- timeout -s KILL "$step_limit" "$@"
    fi
    # The lock's fd is closed first: opening a FIFO blocks until root opens
    # the other end, and a step left blocked there by a root killed outright
    # must not hold the host lock (the next operation ends such a step).
    if [ "$ao_in" = - ]; then
        env -i PATH="$PATH" LC_ALL=C HOME=/ "$@" 9>&- >"$ao_out"
    else
        env -i PATH="$PATH" LC_ALL=C HOME=/ "$@" 9>&- <"$ao_in" >"$ao_out"
    fi
}

# owner_step OP ARGS...: this script again as OWNER, to its end. stdin is
# the sums of the trees in $step_sums, else /dev/null. Then owner_finish.
owner_step() {
    step_rc=0
    if [ -n "${step_sums-}" ]; then
        # shellcheck disable=SC2086 # validated NAME@SHA words
        send_sums $step_sums | as_owner_sh - "$rwork/report" "$@" || step_rc=$?
    else
        as_owner_sh /dev/null "$rwork/report" "$@" || step_rc=$?
    fi
    step_sums=''
    owner_finish
}

# as_owner_sh IN OUT OP ARGS...: this script, as OWNER.
as_owner_sh() {
    aos_in=$1
    aos_out=$2
    shift 2
    # shellcheck disable=SC2016 # $1 is expanded by the new shell
    as_owner "$aos_in" "$aos_out" setpriv --reuid="$uid" --regid="$gid" --clear-groups --nnp -- \
        sh -c 'eval "$1"' plugin-host "$self" "$@"
}

# After a step ended with $step_rc: its report (a file of root's, not a
# pipe a child of the step could hold open; 1 MiB at most) into $report. A
# failed step: its error code (checked) with root's own message.
owner_finish() {
    report=$(head -c 1048576 "$rwork/report") || report=''
    [ "$step_rc" -eq 0 ] && return 0
    os_last=${report##*"$NL"}
    case $os_last in
        "$MARKER {\"status\":\"error\","*)
            os_code=${os_last#*\"code\":\"}
            case ${os_code%%\"*} in
                bad_archive) fail bad_archive 'archive could not be extracted' 66 ;;
                unwire_failed) fail unwire_failed 'could not remove what the previous version wired' 71 ;;
                bad_config_dir) fail bad_config_dir 'the workspace user cannot use its config directory' 77 ;;
            esac
            fail internal 'a step run as the workspace user failed' 1
            ;;
    esac
    # No report at all: was it setpriv (BusyBox's has no --reuid; no
    # CAP_SETUID in a container) that could not start the step?
    if [ -z "$report" ] && ! env -i PATH="$PATH" setpriv --reuid="$uid" --regid="$gid" \
        --clear-groups --nnp -- true >/dev/null 2>&1; then
        fail no_privilege_drop 'setpriv (util-linux) cannot act as the workspace user here' 72
    fi
    fail internal 'a step run as the workspace user did not finish' 1
}

# The word after "ok" on the report's last line, checked against a pattern.
report_ok() {
    ro_last=${report##*"$NL"}
    case $ro_last in
        "ok $1"*) ;;
        *) fail internal 'a step run as the workspace user gave no result' 1 ;;
    esac
}

# Did the step say it started changing the config dir?
report_changed() {
    case $NL$report in
        *"${NL}changing"*) return 0 ;;
    esac
    return 1
}

# ------------------------------------------------------------- owner: helpers
# Everything from here to "root: operations" runs as OWNER, in CONFIG_DIR.

# Enter CONFIG_DIR as OWNER; relative paths from here on.
owner_enter() {
    # A step started as root would defeat the point: refuse.
    { [ -O / ] || [ -G / ]; } && fail internal 'owner steps must not run as root' 1
    cd "$cfg" 2>/dev/null ||
        fail bad_config_dir 'the workspace user cannot enter its config directory' 77
    [ -O . ] || fail bad_config_dir 'the config directory is not owned by the workspace user' 77
    staging=$STATE_REL/staging
    store=$STATE_REL/store
    link=plugins/${name-}
}

# Create the state dirs and clear leftovers of killed runs. Only with root
# holding the lock: no other operation is using staging then.
# The usual run (both dirs there, staging empty) starts no process here.
owner_prepare() {
    # Made once, with their modes (they are OWNER's: setting them again on
    # every run would guard against nobody).
    if [ ! -d "$store" ] || [ ! -d "$staging" ]; then
        mkdir -p "$store" || fail internal 'cannot create the state directory' 1
        chmod 0755 "$STATE_REL" "$store" || fail internal 'cannot set state directory modes' 1
        if [ ! -d "$staging" ]; then
            mkdir -m 0700 "$staging" || fail internal 'cannot create the state directory' 1
        fi
    fi
    recover_aside
    # Anything in staging (dot names too) was left by a killed run.
    for op_left in "$staging"/* "$staging"/.[!.]* "$staging"/..?*; do
        if [ -e "$op_left" ] || [ -L "$op_left" ]; then
            find "$staging" -mindepth 1 -maxdepth 1 -exec rm -rf {} + ||
                fail internal 'cannot clear the staging directory' 1
            break
        fi
    done
}

# A legacy plugin dir left in aside/ by a killed run: put it back if its link
# never replaced it, else the replacement finished and it can go.
recover_aside() {
    for ra_dir in "$STATE_REL/aside"/*; do
        [ -e "$ra_dir" ] || [ -L "$ra_dir" ] || continue
        ra_link="plugins/${ra_dir##*/}"
        if [ -e "$ra_link" ] || [ -L "$ra_link" ]; then
            rm -rf "$ra_dir" || fail internal 'cannot clear a leftover legacy directory' 1
        else
            mv "$ra_dir" "$ra_link" || fail internal 'cannot restore a legacy plugin directory' 1
        fi
    done
}

# link_digest LINK NAME: for one of our links (exactly STORE_REL/NAME@SHA or
# STORE_REL/NAME@SHA-r) sets ld_sha and ld_dir (the store dir's name); for any
# other target both are empty.
link_digest() {
    ld_sha=''
    ld_dir=''
    ld_target=$(readlink "$1") || return 0
    ld_rest=${ld_target#"$STORE_REL/$2@"}
    [ "$ld_rest" != "$ld_target" ] || return 0
    case $ld_rest in
        *-r-r) return 0 ;;
    esac
    valid_sha "${ld_rest%-r}" || return 0
    ld_sha=${ld_rest%-r}
    ld_dir=$2@$ld_rest
}

# Sets prev_kind (none | link | legacy), prev_digest and prev_dir (its store
# dir) for plugins/NAME.
inspect_current() {
    prev_kind='none'
    prev_digest=''
    prev_dir=''
    if [ -L "$link" ]; then
        prev_kind='link'
        link_digest "$link" "$name"
        prev_digest=$ld_sha
        prev_dir=$ld_dir
    elif [ -d "$link" ]; then
        prev_kind='legacy'
    elif [ -e "$link" ]; then
        fail internal 'the plugin path is neither a link nor a directory' 1
    fi
}

# Remove store trees of NAME other than the one given (may be empty).
prune_store() {
    for ps_dir in "$store/$name"@*; do
        [ "$ps_dir" = "$1" ] && continue
        if [ -e "$ps_dir" ] || [ -L "$ps_dir" ]; then
            rm -rf "$ps_dir" || say 'could not remove an old store directory'
        fi
    done
}

# Remove exactly what the runtime wired from plugin dir $1 (see runtime
# contract in tests/stack/fake-runtime.py, which emulates the wiring side).
# As OWNER, in CONFIG_DIR: a planted link leads only where OWNER may write.
unwire() {
    command -v python3 >/dev/null 2>&1 ||
        fail unwire_failed 'python3 is not available on the host' 71
    python3 -I - "$cfg" "$name" "$1" >&2 <<'PY' ||
import json
import os
import re
import shutil
import sys
import tempfile

cfg, name, pdir = sys.argv[1:4]
claude_dir = os.path.join(os.path.abspath(cfg), ".claude")
plugins_root = os.path.join(cfg, "plugins")
NOT_FRAGMENTS = {"readme.md", "changelog.md", "license.md", "contributing.md"}


def entries(d):
    # Shell glob "*" semantics, as the runtime lists dirs: sorted, no dotfiles.
    try:
        return sorted(e for e in os.listdir(d) if not e.startswith("."))
    except OSError:
        return []


def read_text(path):
    # newline="" and surrogateescape: bytes round-trip exactly.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def plugin_text(path):
    # A file of the old tree the agent made unreadable (a link to a file it
    # may not read) wired nothing we could know of: skip it, say so.
    try:
        return read_text(path)
    except OSError:
        print("plugin-host: skipping an unreadable plugin file", file=sys.stderr)
        return None


def write_like(path, text):
    # Atomic replace of the real file, keeping its mode (and owner if we can).
    path = os.path.realpath(path)
    st = os.stat(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".plugin-delivery.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except OSError:
                    pass  # not ours to give away: the file becomes OWNER's
            os.fchmod(f.fileno(), st.st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def others():
    return [os.path.join(plugins_root, e) for e in entries(plugins_root)
            if e != name and os.path.isdir(os.path.join(plugins_root, e))]


def as_list(x):
    return x if isinstance(x, list) else []


# ---- a. memory blocks in CLAUDE.md

def blocks(p, n):
    out = []
    rules = os.path.join(p, "rules")
    for f in entries(rules):
        fp = os.path.join(rules, f)
        text = plugin_text(fp) if f.endswith(".md") and os.path.isfile(fp) else None
        if text is not None:
            out.append("# Plugin: %s / rule: %s\n\n%s" % (n, f, text.strip()))
    for f in entries(p):
        fp = os.path.join(p, f)
        if f.endswith(".md") and os.path.isfile(fp) and f.lower() not in NOT_FRAGMENTS:
            body = (plugin_text(fp) or "").strip()
            if body:
                out.append("# Plugin: %s / fragment: %s\n\n%s" % (n, f, body))
    return out


def find(text, piece, at_line_start):
    # First occurrence ending at EOF or before "\n" (and starting a line).
    i = text.find(piece)
    while i != -1:
        end = i + len(piece)
        if (end == len(text) or text[end] == "\n") and (
                not at_line_start or i == 0 or text[i - 1] == "\n"):
            return i, end
        i = text.find(piece, i + 1)
    return None


def strip_blocks(text, bl):
    # The runtime appended "\n" + "\n\n".join(blocks): remove that whole.
    hit = find(text, "\n" + "\n\n".join(bl), False)
    if hit:
        return text[:hit[0]] + text[hit[1]:]
    # Otherwise block by block, last first, each with one adjoining separator.
    for k in range(len(bl) - 1, -1, -1):
        hit = find(text, bl[k - 1] + "\n\n" + bl[k], True) if k else None
        if hit:
            # The "\n\n" is ours only because our previous block precedes it.
            start, end = hit[0] + len(bl[k - 1]), hit[1]
        else:
            hit = find(text, bl[k], True)
            if not hit:
                continue
            start, end = hit
            if start > 0:
                start -= 1
            elif end < len(text):
                end += 1
        text = text[:start] + text[end:]
    return text


def unwire_memory():
    path = os.path.join(cfg, "CLAUDE.md")
    bl = blocks(pdir, name)
    if not bl or not os.path.isfile(path):
        return
    text = read_text(path)
    new = strip_blocks(text, bl)
    if new != text:
        write_like(path, new)


# ---- b. skills

def scalar(x):
    x = x.strip()
    if x[:1] in ("'", '"'):
        close = x.find(x[0], 1)
        return x[1:close] if close > 0 else ""
    return re.split(r"\s#", x, 1)[0].strip()


def yaml_skills(p):
    try:
        lines = read_text(os.path.join(p, "plugin.yaml")).splitlines()
    except OSError:
        return set()
    items = []
    for i, line in enumerate(lines):
        m = re.match(r"skills\s*:(.*)$", line)
        if not m:
            continue
        rest = m.group(1).strip()
        if rest.startswith("["):
            items = rest[1:].split("]", 1)[0].split(",")
        elif rest == "" or rest.startswith("#"):
            for item in lines[i + 1:]:
                s = item.strip()
                if not s or s.startswith("#"):
                    continue
                m = re.match(r"-(\s+(.*))?$", s)
                if not m:
                    break
                items.append(m.group(2) or "")
        break
    return {s for s in map(scalar, items) if s not in ("", ".", "..") and "/" not in s}


def skills_of(p):
    d = os.path.join(p, "skills")
    return {s for s in entries(d) if os.path.isdir(os.path.join(d, s))} | yaml_skills(p)


def remove_path(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def unwire_skills():
    kept = set()
    for o in others():
        kept |= skills_of(o)
    for s in sorted(skills_of(pdir) - kept):
        remove_path(os.path.join(cfg, "skills", s))


# ---- c. hooks and commands

def files_of(p, sub, suffix):
    d = os.path.join(p, sub)
    return {f for f in entries(d) if f.endswith(suffix) and os.path.isfile(os.path.join(d, f))}


def unwire_files(sub, suffix):
    kept = set()
    for o in others():
        kept |= files_of(o, sub, suffix)
    for f in sorted(files_of(pdir, sub, suffix) - kept):
        path = os.path.join(claude_dir, sub, f)
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)


# ---- d. settings.json

def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, PermissionError):
        # The runtime cannot have merged (or written) unreadable JSON.
        print("plugin-host: ignoring unreadable JSON", file=sys.stderr)
        return None


def fragment(p):
    path = os.path.join(p, "settings-fragment.json")
    frag = load_json(path) if os.path.isfile(path) else None
    if not isinstance(frag, dict):
        return None
    hooks = frag.get("hooks")
    for groups in (hooks.values() if isinstance(hooks, dict) else []):
        for g in as_list(groups):
            for h in as_list(g.get("hooks") if isinstance(g, dict) else None):
                if isinstance(h, dict) and isinstance(h.get("command"), str):
                    h["command"] = h["command"].replace("${CLAUDE_DIR}", claude_dir)
    return frag


def unwire_settings():
    path = os.path.join(claude_dir, "settings.json")
    frag = fragment(pdir)
    if frag is None or not os.path.isfile(path):
        return
    settings = load_json(path)
    if not isinstance(settings, dict):
        return
    changed = False
    hooks, fhooks = settings.get("hooks"), frag.get("hooks")
    if isinstance(hooks, dict) and isinstance(fhooks, dict):
        dropped = False
        for event, groups in fhooks.items():
            have = hooks.get(event)
            if not isinstance(have, list):
                continue
            removed = False
            for g in as_list(groups):
                # The runtime appended the group: take the last equal one.
                for i in range(len(have) - 1, -1, -1):
                    if have[i] == g:
                        del have[i]
                        removed = True
                        break
            if removed:
                changed = True
                if not have:
                    del hooks[event]
                    dropped = True
        if dropped and not hooks:
            del settings["hooks"]
    servers, fservers = settings.get("mcpServers"), frag.get("mcpServers")
    if isinstance(servers, dict) and isinstance(fservers, dict):
        shared = set()
        for o in others():
            of = fragment(o)
            if of is not None and isinstance(of.get("mcpServers"), dict):
                shared |= set(of["mcpServers"])
        removed = False
        for s in fservers:
            if s in servers and s not in shared:
                del servers[s]
                removed = True
        if removed:
            changed = True
            if not servers:
                del settings["mcpServers"]
    if changed:
        write_like(path, json.dumps(settings, indent=2) + "\n")


unwire_memory()
unwire_skills()
unwire_files("hooks", "")
unwire_files("commands", ".md")
unwire_settings()
PY
        fail unwire_failed 'could not remove what the previous version wired' 71
}

# check_trees DIR...: reads root's sums stream (send_sums; or one bare sums
# file of the tree $first_tree) on stdin and sets
# checked: "good NAME@SHA" or "bad NAME@SHA" for each tree it covers, checked
# in the store dir given for it (NAME@SHA or NAME@SHA-r, the one the link
# points at). A tree is bad when a file it was installed with is gone or has
# other bytes; files added later (a runtime's __pycache__) do not count: the
# runtime may write into its plugins. One `sha256sum -c` for all trees, run
# in the store on "HASH  DIR/path" lines (a leading backslash is sha256sum's
# mark of an escaped name). Plain `-c`: BusyBox has no --quiet.
check_trees() {
    checked=$(awk -v dirs=" $* " -v tree="${first_tree-}" '
        BEGIN {
            dir = ""
            if (tree != "" && index(dirs, " " tree " ")) dir = tree
            else if (tree != "" && index(dirs, " " tree "-r ")) dir = tree "-r"
        }
        /^== / {
            tree = substr($0, 4); dir = ""
            if (index(dirs, " " tree " ")) dir = tree
            else if (index(dirs, " " tree "-r ")) dir = tree "-r"
            next
        }
        dir != "" {
            esc = ""; l = $0
            if (substr(l, 1, 1) == "\\") { esc = "\\"; l = substr(l, 2) }
            r = substr(l, 67); sub(/^\.\//, "", r)
            print esc substr(l, 1, 64) "  " dir "/" r
        }' |
        (cd "$store" 2>/dev/null && sha256sum -c 2>/dev/null) |
        awk '{
            l = $0; sub(/^\\/, "", l); sub(/\/.*/, "", l); sub(/-r$/, "", l)
            if ($0 !~ /: OK$/) bad[l] = 1; seen[l] = 1
        }
        END { for (t in seen) print (t in bad ? "bad " : "good ") t }')
}

# intact NAME@SHA: root has sums for the tree and every file of them checked
# good. A tree without sums, or one no check reported on, is not intact:
# a check that could not be made fails closed (the tree is reinstalled).
intact() {
    case " $with_sums " in
        *" $1 "*) ;;
        *) return 1 ;;
    esac
    case $NL$checked$NL in
        *"${NL}good $1$NL"*) return 0 ;;
    esac
    return 1
}

# ---------------------------------------------------------- owner: the steps

# owner-install CONFIG_DIR NAME SHA WITH_SUMS: one step for a whole install.
# fd 7 holds root's sums of NAME@SHA when WITH_SUMS is NAME@SHA. The step
# clears leftovers and writes what is there now to fd 3 (a FIFO root reads):
#   ok probe KIND DIGEST|- INTACT
# then waits for root's words on stdin (a FIFO). "feed HOW": the archive is
# coming on fd 5 (a FIFO root writes as the bytes arrive), to be inflated
# the way HOW names (extract_archive); the step extracts
# it into its staging dir and hashes the files (new sums to fd 4) while root
# is still receiving and hashing the archive. Then "go SHA" once root has
# verified the whole archive: only now is anything published. (SHA "-":
# the archive comes in frames, and the digest root verified last, given
# with "go", names the tree; else "go" must give SHA itself.) Or, for
# frames whose digest turned out to be the live tree's, "same SHA": the
# step checks the live tree against root's sums (fd 7 stays open for
# that) and leaves it, reporting "ok unchanged KIND DIGEST", if it is
# intact; else it goes on as with "go" (a repair). Any other word (or
# none: root closed it) ends the step with "ok stopped", leaving nothing
# behind. The report on stdout: "changing" before the first change, then
#   ok applied KIND DIGEST|-   (what was replaced)
owner_install() {
    [ "$#" -eq 4 ] || usage 'owner-install takes 4 arguments'
    check_config_dir "$1"
    check_name "$2"
    # "-": an archive in frames, whose digest comes with root's "go".
    sha=''
    [ "$3" = - ] || check_sha "$3"
    with_sums=$4
    owner_enter
    owner_prepare
    inspect_current
    probe_intact=false
    if [ "$prev_kind" = link ] && [ "$prev_digest" = "$sha" ] && [ -d "$link" ]; then
        checked=''
        first_tree=$name@$sha
        [ -n "$with_sums" ] && check_trees "$prev_dir" <&7
        intact "$name@$sha" && probe_intact=true
    fi
    [ -n "$sha" ] && exec 7<&-
    printf 'ok probe %s %s %s\n' "$prev_kind" "${prev_digest:--}" "$probe_intact" >&3
    exec 3>&-
    oi_word=''
    oi_how=''
    read -r oi_word oi_how || oi_word=''
    if [ "$oi_word" != feed ]; then
        printf 'ok stopped\n'
        return 0
    fi
    extract_archive "$oi_how" <&5
    exec 5<&-
    oi_word=''
    oi_sha=''
    read -r oi_word oi_sha || oi_word=''
    if [ "$oi_word" = same ] && [ -z "$sha" ]; then
        check_sha "$oi_sha"
        [ "$oi_sha" = "$prev_digest" ] || usage 'root gave another digest'
        checked=''
        first_tree=$name@$oi_sha
        [ "$with_sums" = "$name@$oi_sha" ] && [ -d "$link" ] && check_trees "$prev_dir" <&7
        if intact "$name@$oi_sha"; then
            printf 'ok unchanged %s %s\n' "$prev_kind" "$prev_digest"
            return 0
        fi
        oi_word=go
    fi
    exec 7<&-
    if [ "$oi_word" != go ]; then
        printf 'ok stopped\n'
        return 0
    fi
    if [ -z "$sha" ]; then
        check_sha "$oi_sha"
    elif [ "$oi_sha" != "$sha" ]; then
        usage 'root gave another digest'
    fi
    apply_archive
}

# extract_archive HOW (stdin: the archive as it arrives, not verified yet;
# fd 4: the new tree's sums), as OWNER in CONFIG_DIR after inspect_current:
# into a staging dir of its own, where nothing is live. HOW "python"
# inflates with python3's zlib, when there is one (see $inflate); else tar
# runs gzip. The rest of the input is read to its end, so root's copy to
# the step never breaks off early.
extract_archive() {
    # owner_prepare emptied staging, under root's lock; names of this step's
    # own (its pid) all the same, should a step of a killed run live on.
    work=$staging/tree.$$
    mkdir "$work" || fail internal 'cannot create a staging directory' 1
    ea_sums=''
    if [ "$1" = python ] && command -v python3 >/dev/null 2>&1; then
        scratch=$staging/notes.$$
        mkdir "$scratch" || fail internal 'cannot create a staging directory' 1
        ea_sums=$scratch/sums
        # tar may see a clean end of input where Python stopped on a bad
        # stream: the marker exists only if Python inflated a whole one.
        if ! { python3 -I -S -c "$INFLATE" "$ea_sums" && : >"$scratch/whole"; } |
            tar -xf - -C "$work" --no-same-owner >&2 ||
            [ ! -e "$scratch/whole" ]; then
            fail bad_archive 'archive could not be extracted' 66
        fi
    else
        tar -xzf - -C "$work" --no-same-owner >&2 ||
            fail bad_archive 'archive could not be extracted' 66
    fi
    cat >/dev/null || :
    # Plugins are plain files and directories, plugin.yaml among them;
    # anything else is not ours. Python's sums stand for the tree when they
    # name exactly the files tar made: then only the other kinds of entry
    # are looked for. Else one walk hashes the files (their sums to fd 4)
    # and names every other kind of entry (on stdout, captured). Files over
    # 1 MiB go to $SHA256, the rest to sha256sum, which starts in a third
    # of OpenSSL's time (1.8 against 5.5 ms): a plugin of small files
    # starts no OpenSSL at all.
    if [ -n "$ea_sums" ] && [ -f "$ea_sums" ] &&
        [ "$(cut -c67- "$ea_sums" | sort)" = "$(cd "$work" && find . -type f | sort)" ]; then
        odd=$(cd "$work" && find . ! -type d ! -type f -print) ||
            fail internal 'cannot list the plugin files' 1
        cat "$ea_sums" >&4 || fail internal 'cannot hash the plugin files' 1
    else
        # shellcheck disable=SC2016 # $@ is the inner shell's
        odd=$(cd "$work" && find . -type f -size +1024k -exec sh -c 'exec '"$SHA256"' "$@" >&4' sh {} + \
            -o -type f -exec sh -c 'exec sha256sum "$@" >&4' sh {} + \
            -o ! -type d -print) || fail internal 'cannot hash the plugin files' 1
    fi
    if [ -n "$scratch" ]; then
        rm -rf "$scratch"
        scratch=''
    fi
    [ -z "$odd" ] || fail bad_archive 'archive holds entries other than files and directories' 66
    [ -f "$work/plugin.yaml" ] || fail bad_archive 'archive holds no plugin.yaml' 66
}

# apply_archive, as OWNER after extract_archive and root's "go": publishes
# the extracted tree.
apply_archive() {
    # Never the dir the link points at now: a damaged tree of the same
    # digest stays live until the link moves to its replacement.
    new_dir=$name@$sha
    [ "$prev_dir" = "$new_dir" ] && new_dir=$name@$sha-r
    new_store=$store/$new_dir

    if [ ! -d plugins ]; then
        mkdir plugins || fail internal 'cannot create the plugins directory' 1
    fi
    printf 'changing\n'
    # Upgrade rule: the runtime wires only what is not wired yet, so remove
    # what the old version wired; the restart then wires the new one.
    if [ "$prev_kind" != none ]; then
        unwire "$link"
    fi
    # A store dir of this digest that no link points to is a stale leftover.
    if [ -e "$new_store" ] || [ -L "$new_store" ]; then
        rm -rf "$new_store" || fail internal 'cannot remove a stale store directory' 1
    fi
    mv "$work" "$new_store" || fail internal 'cannot move the plugin into the store' 1
    work=$staging/link.$$
    ln -s "$STORE_REL/$new_dir" "$work" || fail internal 'cannot create the plugin link' 1
    # (Had a directory been planted there, ln made its link inside it.)
    [ -L "$work" ] || fail internal 'cannot create the plugin link' 1
    if [ "$prev_kind" = legacy ]; then
        # A legacy install is a real directory, which rename(2) cannot replace
        # with a link: move it aside first (outside staging, so a run killed
        # right here loses nothing: recover_aside puts it back). Only legacy
        # installs see this gap.
        mkdir -p "$STATE_REL/aside" || fail internal 'cannot move the legacy plugin aside' 1
        mv "$link" "$STATE_REL/aside/$name" || fail internal 'cannot move the legacy plugin aside' 1
        aside="$STATE_REL/aside/$name"
    fi
    mv -T "$work" "$link" || fail internal 'cannot switch the plugin link' 1
    work=''
    if [ -n "$aside" ]; then
        rm -rf "$aside" || say 'could not remove the replaced legacy directory'
        aside=''
    fi
    cleanup
    prune_store "$new_store"
    printf 'ok applied %s %s\n' "$prev_kind" "${prev_digest:--}"
}

# owner-remove CONFIG_DIR NAME. Reports "changing" before the first change:
#   ok absent | ok removed KIND DIGEST|-
owner_remove() {
    [ "$#" -eq 2 ] || usage 'owner-remove takes 2 arguments'
    check_config_dir "$1"
    check_name "$2"
    owner_enter
    owner_prepare
    inspect_current
    if [ "$prev_kind" = none ]; then
        printf 'ok absent\n'
        return 0
    fi
    printf 'changing\n'
    unwire "$link"
    if [ "$prev_kind" = legacy ]; then
        # Move first so the path disappears in one step, then delete.
        work=$(mktemp -d "$staging/uninstall.XXXXXX") || fail internal 'cannot create a staging directory' 1
        mv "$link" "$work/legacy" || fail internal 'cannot remove the plugin' 1
        cleanup
    else
        rm -f "$link" || fail internal 'cannot remove the plugin link' 1
    fi
    prune_store ''
    printf 'ok removed %s %s\n' "$prev_kind" "${prev_digest:--}"
}

# owner-list CONFIG_DIR WITH_SUMS (stdin: root's sums of the trees named in
# WITH_SUMS). Reports the inventory's JSON entries:
#   ok list {"name":N,"digest":D},...
owner_list() {
    [ "$#" -eq 2 ] || usage 'owner-list takes 2 arguments'
    check_config_dir "$1"
    name=''
    with_sums=$2
    owner_enter
    # Our links first (NAME DIGEST DIR), then one check for all their trees.
    found=''
    dirs=''
    for entry in plugins/*; do
        n=${entry##*/}
        # Names we could not have installed (and could not quote) are skipped.
        valid_name "$n" || continue
        if [ -L "$entry" ]; then
            link_digest "$entry" "$n"
            # A dangling link is reported without a digest: it is reinstalled.
            [ -d "$entry" ] || ld_sha=''
            found="$found$n ${ld_sha:--}$NL"
            [ -n "$ld_sha" ] && dirs="$dirs $ld_dir"
        elif [ -d "$entry" ]; then
            found="$found$n -$NL"
        fi
    done
    checked=''
    # shellcheck disable=SC2086 # validated NAME@SHA words
    [ -n "$with_sums" ] && [ -n "$dirs" ] && check_trees $dirs
    inv=''
    while read -r n d; do
        [ -n "$n" ] || continue
        [ "$d" = - ] && d=''
        # A tree changed on the host is reported without a digest too.
        if [ -n "$d" ] && ! intact "$n@$d"; then d=''; fi
        inv="$inv${inv:+,}{\"name\":\"$n\",\"digest\":\"$d\"}"
    done <<EOF
$found
EOF
    printf 'ok list %s\n' "$inv"
}

# ----------------------------------------------------------- root: operations

# Root's state is touched only once the config dir passed inspection.
start_root() {
    case $self in
        '#!/bin/sh'*) ;;
        *) usage 'the script text must come first' ;;
    esac
    [ -O / ] || say 'not running as root: the owner steps will fail'
    cd / || fail internal 'cannot change to the root directory' 1
    # Every owner step is bounded in time (timeout from coreutils or
    # BusyBox; without one, only the transport's own deadline bounds it).
    step_limit=${PLUGIN_STEP_MAX_SECS:-900}
    valid_wait "$step_limit" || usage 'step time limit must be a whole number of seconds'
    step_timeout=''
    command -v timeout >/dev/null 2>&1 && step_timeout=timeout
}

# Set the pending-restart marker before a change; pending_ours says this
# operation set it (owner_step takes it back when nothing changed).
mark_pending() {
    pending_ours=false
    [ -e "$book/restart-pending" ] && return 0
    : >"$book/restart-pending" || fail internal 'cannot record the pending restart' 1
    pending_ours=true
}

unmark_pending() {
    if [ "${pending_ours-}" = true ] && ! report_changed; then
        rm -f "$book/restart-pending"
    fi
    pending_ours=false
}

# Splits the report's last line into $1... (set -f: no globbing).
report_words() {
    set -f
    # shellcheck disable=SC2086 # split on purpose; every word is checked
    set -- ${report##*"$NL"}
    set +f
    rw_kind=${3-}
    rw_digest=${4-}
    rw_flag=${5-}
    [ "$rw_digest" = - ] && rw_digest=''
    case $rw_kind in
        none | link | legacy | '') ;;
        *) fail internal 'a step run as the workspace user gave an odd result' 1 ;;
    esac
    [ -z "$rw_digest" ] || valid_sha "$rw_digest" ||
        fail internal 'a step run as the workspace user gave an odd result' 1
}

# The archive's size (optional): only picks root's hash tool and the
# step's inflate tool.
check_bytes() {
    case $1 in
        '' | *[!"$DIGITS"]*) usage 'archive size must be a number of bytes' ;;
    esac
    [ "${#1}" -le 15 ] || usage 'archive size must be a number of bytes'
    # Under 1,000,000 bytes sha256sum is done before OpenSSL has started.
    [ "${#1}" -le 6 ] && SHA256=sha256sum
    [ "${#1}" -ge 7 ] && [ "$1" -ge 1048576 ] && inflate=python
    :
}

# The plugin named on stdin's first line (install with NAME and SHA256 as
# "-"): NAME SHA256 [BYTES], or NAME + [BYTES] (the archive in frames, its
# digest after it; sha stays empty until then). A shell reads a pipe or socket a
# byte at a time, so the archive's first byte stays on stdin for the copy
# to the step. The line is read by a child shell under the step time
# limit: a caller gone without a word (its connection left open) must not
# keep root waiting for ever.
read_named() {
    # shellcheck disable=SC2016 # $l is the child's
    rn_line=$(bounded sh -c 'IFS= read -r l || exit 1; printf "%s\n" "$l"') ||
        usage 'no plugin was named on stdin'
    rn_name=''
    rn_sha=''
    rn_bytes=''
    rn_rest=''
    IFS=' ' read -r rn_name rn_sha rn_bytes rn_rest <<EOF
$rn_line
EOF
    [ -z "$rn_rest" ] || usage 'the plugin named on stdin takes 2 or 3 words'
    check_name "$rn_name"
    if [ "$rn_sha" = + ]; then
        [ -z "$rn_bytes" ] || check_bytes "$rn_bytes"
        frames_ok || fail no_frames 'this host cannot take an archive in frames' 78
        framed=true
        sha=''
        return 0
    fi
    check_sha "$rn_sha"
    [ -z "$rn_bytes" ] || check_bytes "$rn_bytes"
}

# Whether this host can cut frames safely: GNU head reads no further than
# it is asked to (BusyBox's reads ahead, and the frames after its first
# would be lost, or archive bytes taken for frame headers), and GNU timeout
# ends the whole group it runs, a head blocked on a silent caller included
# (BusyBox's ends only its own child). Without timeout, as everywhere in
# this script, steps run unbounded.
frames_ok() {
    case $(head --version 2>/dev/null) in
        *'GNU coreutils'*) ;;
        *) return 1 ;;
    esac
    [ -n "$step_timeout" ] || return 0
    case $(timeout --version 2>/dev/null) in
        *'GNU coreutils'*) ;;
        *) return 1 ;;
    esac
}

# The frames of a framed archive (stdin) as plain bytes (stdout); the
# digest of the "end" line to the file $1, only when the frames ended with
# it. head reads no further than it is asked to, so each frame's bytes are
# all it takes. Run as "sh -c" under the step time limit, which ends the
# whole group, head included, if the caller stops sending.
# shellcheck disable=SC2016 # the inner shell's variables
UNFRAME='
while IFS= read -r h; do
    case $h in
        "end "*) printf "%s\n" "${h#end }" >"$1"; exit 0 ;;
        "" | *[!0123456789]*) exit 1 ;;
    esac
    [ "${#h}" -le 8 ] && [ "$h" -ge 1 ] && [ "$h" -le 16777216 ] || exit 1
    head -c "$h" || exit 1
done
exit 1'

# Python's gunzip for extract_archive: stdin, one gzip member and nothing
# after it, to stdout; exit 1 on anything else (a cut stream, bad data).
# Output comes 1 MiB a call at most: a run of zeros cannot inflate into
# memory. A reader gone (tar stops at the end of the archive, before any
# padding) ends the output but not the check of the stream; tar's own
# status tells whether it had all it needed. It also hashes the tar
# stream's regular files as they pass, and writes their sums (sha256sum's
# lines, "./path") to the file $1, once the stream was whole, unless it gave
# up on reading the stream exactly as tar does (anything but GNU headers
# of files, dirs and long names; a name with a control character, a
# backslash, an empty, "." or ".." part; a name twice; any error of its
# own). The step then hashes the extracted files itself, as it does after
# gzip. A Python without zlib leaves the stream to gzip.
INFLATE='
import os, sys
try:
    import hashlib, zlib
except ImportError:
    os.execvp("gzip", ["gzip", "-dc"])
gone = False
def put(m):
    global gone
    v = memoryview(m)
    while v and not gone:
        try:
            v = v[os.write(1, v):]
        except BrokenPipeError:
            gone = True
def octal(f):
    f = f.strip(b" \0")
    return int(f, 8) if f and not f.translate(None, b"01234567") else None
class Sums:
    def __init__(self):
        self.ok = True
        self.done = False
        self.head = b""
        self.left = 0
        self.pad = 0
        self.hash = None
        self.long = None
        self.name = None
        self.lines = []
        self.seen = set()
    def take(self, v):
        try:
            self.feed(v)
        except Exception:
            self.ok = False
    def feed(self, v):
        i, n = 0, len(v)
        while i < n and self.ok and not self.done:
            if self.left:
                k = min(self.left, n - i)
                if self.hash is not None:
                    self.hash.update(v[i:i + k])
                else:
                    self.long.append(bytes(v[i:i + k]))
                self.left -= k
                i += k
                if not self.left:
                    self.entry_end()
            elif self.pad:
                k = min(self.pad, n - i)
                self.pad -= k
                i += k
            else:
                k = min(512 - len(self.head), n - i)
                self.head += bytes(v[i:i + k])
                i += k
                if len(self.head) == 512:
                    self.header(self.head)
                    self.head = b""
    def header(self, h):
        if h == bytes(512):
            self.done = True
            return
        size = octal(h[124:136])
        if (size is None or octal(h[148:156]) != sum(h[:148]) + 256 + sum(h[156:])
                or h[257:265] != b"ustar  \0"):
            self.ok = False
            return
        kind = h[156:157]
        self.pad = -size % 512
        self.left = size
        if kind == b"L":
            if self.long is not None or not size or size > 65536:
                self.ok = False
                return
            self.long = []
            self.hash = None
            self.name = None
            return
        if self.long is not None:
            name = b"".join(self.long).split(b"\0", 1)[0]
            self.long = None
        else:
            name = h[:100].split(b"\0", 1)[0]
        if kind == b"5":
            self.hash = None
            self.ok = not size
            return
        if kind not in (b"0", b"\0"):
            self.ok = False
            return
        if name.startswith(b"./"):
            name = name[2:]
        parts = name.split(b"/")
        if (not name or name in self.seen or any(p in (b"", b".", b"..") for p in parts)
                or any(c < 32 or c == 92 or c == 127 for c in name)):
            self.ok = False
            return
        self.seen.add(name)
        self.name = name
        self.hash = hashlib.sha256()
        if not size:
            self.entry_end()
    def entry_end(self):
        if self.hash is not None:
            self.lines.append(self.hash.hexdigest().encode() + b"  ./" + self.name + b"\n")
            self.hash = None
d = zlib.decompressobj(31)
sums = Sums()
try:
    b = os.read(0, 1048576)
    while b and not d.eof:
        out = d.decompress(b, 1048576)
        sums.take(memoryview(out))
        put(out)
        b = d.unconsumed_tail
        if not b and not d.eof:
            b = os.read(0, 1048576)
    out = d.flush()
    sums.take(memoryview(out))
    put(out)
    whole = d.eof and not d.unused_data and not b and not os.read(0, 1)
except (OSError, zlib.error):
    whole = False
if whole and sums.ok and sums.done:
    with open(sys.argv[1], "wb") as f:
        f.writelines(sums.lines)
sys.exit(0 if whole else 1)'

op_install() {
    [ "$#" -eq 6 ] || [ "$#" -eq 7 ] || usage 'install takes 6 arguments, or 7 with the size'
    check_config_dir "$1"
    framed=false
    if [ "$2" = - ] && [ "$3" = - ]; then
        [ "$#" -eq 6 ] || usage 'an install named on stdin takes its size there'
        named=stdin
    else
        check_name "$2"
        check_sha "$3"
        named=''
    fi
    check_owner "$4"
    check_wait "$5"
    restart_cmd=$6
    [ "$#" -eq 7 ] && check_bytes "$7"
    [ "$named" = stdin ] && read_named
    if [ "$framed" = true ] && [ -n "${PLUGIN_ARCHIVE_URL-}" ]; then
        usage 'a framed archive comes on stdin'
    fi
    inspect_config_dir || fail no_config_dir 'the runtime config directory does not exist' 69
    find_book
    open_book
    with_sums=''
    sums_in=/dev/null
    if [ -n "$sha" ] && [ -f "$book/sums/$name@$sha" ]; then
        with_sums=$name@$sha
        sums_in=$book/sums/$with_sums
    elif [ "$framed" = true ]; then
        # The frames' digest comes last: the sums of the one tree of NAME
        # root has (the live one, as a rule), should they turn out to be
        # its archive.
        for oi_sums in "$book/sums/$name"@*; do
            [ -f "$oi_sums" ] || continue
            if [ -n "$with_sums" ]; then
                with_sums=''
                sums_in=/dev/null
                break
            fi
            with_sums=${oi_sums##*/}
            sums_in=$oi_sums
        done
    fi
    # One owner step for the whole install (one privilege drop): it says
    # what is there through the verdict FIFO, then takes its orders on the
    # ctl FIFO, and the archive on the feed FIFO as root receives it.
    mkfifo -m 0600 "$rwork/verdict" "$rwork/ctl" "$rwork/feed" ||
        fail internal 'cannot create the step channels' 1
    # The lock's fd is closed with exec, first: a shell applying a
    # command's redirections keeps a copy of each fd it replaces, and this
    # one, blocked opening a FIFO of a root killed right now, must not hold
    # the host lock.
    step_open=false
    (
        exec 9>&-
        as_owner_sh "$rwork/ctl" "$rwork/report" owner-install "$cfg" "$name" "${sha:--}" \
            "$with_sums" 3>"$rwork/verdict" 4>"$rwork/sums" 5<"$rwork/feed" 7<"$sums_in"
    ) &
    step_pid=$!
    # Opened in the order the step opens them: verdict, ctl, feed. ctl is
    # opened for reading too, so a write to it never raises SIGPIPE when the
    # step is gone; closing it is the step's EOF. feed too, until the step
    # has its end (then root writes through fd 3 alone): neither side's open
    # of it blocks. (Opened after the step was started: no copy of it stays
    # with the shell that started the step, holding off the step's EOF.)
    command exec 8<"$rwork/verdict" || fail internal 'cannot open the step channels' 1
    command exec 6<>"$rwork/ctl" 7<>"$rwork/feed" || fail internal 'cannot open the step channels' 1
    step_open=true
    verdict=''
    read -r verdict <&8 || verdict=''
    exec 8<&-
    case $verdict in
        'ok probe '*) ;;
        *)
            step_end
            fail internal 'a step run as the workspace user gave no result' 1
            ;;
    esac
    report=$verdict
    report_words
    # Unasked: the step has no digest to find intact before the frames.
    [ "$rw_flag" = true ] && [ "$framed" = true ] &&
        fail internal 'a step run as the workspace user gave an odd result' 1
    if [ "$rw_flag" = true ]; then
        step_end
        # Already there: leave stdin unread and the runtime alone, unless
        # an earlier run was cut off before its restart.
        restart_if_owed
        done_ok unchanged "$sha" "$sha" "$restarted"
    fi

    # The step opened feed before it wrote its verdict: from here on it is
    # the only reader, and root writes through fd 3 alone (a step that is
    # gone makes the write fail instead of blocking).
    command exec 3>"$rwork/feed" 7<&- || fail internal 'cannot open the step channels' 1
    printf 'feed %s\n' "$inflate" >&6 || :
    # Root receives the archive, hashes it and copies it to the step in one
    # pass: the step extracts while the bytes arrive, and publishes nothing
    # before root's "go", given once the whole archive is verified. tee's
    # own status is kept apart from the pipeline's: the marker file exists
    # only if every byte reached the step. A cut connection just ends stdin
    # early; the digest check catches it.
    if [ -n "${PLUGIN_ARCHIVE_URL-}" ]; then
        # A download is whole on disk first: verified before the step sees
        # a byte of it (a replaced S3 object is never extracted).
        fetch_archive "$rwork/archive"
        got=$($SHA256 <"$rwork/archive" 9>&-) || fail internal 'cannot hash the archive' 1
        unset PLUGIN_ARCHIVE_URL
        [ "${got%% *}" = "$sha" ] || fail digest_mismatch 'archive digest does not match' 65
        bounded cat "$rwork/archive" >&3 9>&- && : >"$rwork/received"
    elif [ "$framed" = true ]; then
        got=$(feed_step_framed) || fail internal 'cannot hash the archive' 1
    else
        got=$(feed_step) || fail internal 'cannot hash the archive' 1
    fi
    exec 3>&-
    # The URL has served: nothing started from here on may see it.
    unset PLUGIN_ARCHIVE_URL
    if [ ! -e "$rwork/received" ]; then
        # The step may have ended on a bad archive: its error is the answer.
        step_end
        fail internal 'cannot read the archive' 1
    fi
    if [ "$framed" = true ]; then
        [ -f "$rwork/trailer" ] && IFS= read -r sha <"$rwork/trailer"
        valid_sha "$sha" || fail digest_mismatch 'the archive ended before its digest' 65
        say "the archive came in frames, its digest $sha last"
    fi
    [ "${got%% *}" = "$sha" ] || fail digest_mismatch 'archive digest does not match' 65

    mark_pending
    said=go
    # Frames of the live digest: the step leaves the live tree if intact.
    [ "$framed" = true ] && [ "$rw_kind" = link ] && [ "$sha" = "$rw_digest" ] && said=same
    printf '%s %s\n' "$said" "$sha" >&6 || :
    step_end
    case ${report##*"$NL"} in
        'ok unchanged '*)
            [ "$said" = same ] ||
                fail internal 'a step run as the workspace user gave an odd result' 1
            unmark_pending
            restart_if_owed
            done_ok unchanged "$sha" "$sha" "$restarted"
            ;;
    esac
    report_ok applied
    report_words
    mv "$rwork/sums" "$book/sums/$name@$sha" || say 'could not record the plugin file sums'
    prune_sums "$sha"
    restart_runtime
    done_ok installed "$sha" "$rw_digest" "$restarted"
}

# stdin to the install step (fd 3) and to the hash, whose line is the
# output. The hash reads a pipe of its own, which tee opens by name. Over
# SSH an archive that cannot be extracted may end the step (and so the
# copy) before its digest is known: it is then a bad_archive.
feed_step() {
    # (This runs in a subshell of root's: the lock stays with root alone.)
    exec 9>&-
    { bounded tee "$dev_fd/4" 4>&1 >&3 && : >"$rwork/received"; } | $SHA256 3>&-
}

# feed_step for an archive in frames: their bytes go on as feed_step's do.
# The trailer file exists only if they ended with their digest.
feed_step_framed() {
    exec 9>&-
    {
        bounded sh -c "$UNFRAME" unframe "$rwork/trailer" 3>&- 6>&- |
            { bounded tee "$dev_fd/4" 4>&1 >&3 && : >"$rwork/received"; }
    } | $SHA256 3>&-
}

# CMD... under the steps' time limit: root's own copy to a step that stops
# reading (or whose hash never starts) must not hold the lock for ever.
bounded() {
    if [ -n "$step_timeout" ]; then
        timeout -s KILL "$step_limit" "$@"
    else
        "$@"
    fi
}

# Let the background install step go (closing ctl tells it to stop unless
# it was told "go"), wait for it, and read its report.
step_end() {
    [ -n "${step_pid-}" ] || return 0
    exec 6>&- 7<&-
    step_rc=0
    wait "$step_pid" || step_rc=$?
    step_pid=''
    owner_finish
}

op_uninstall() {
    [ "$#" -eq 5 ] || usage 'uninstall takes 5 arguments'
    check_config_dir "$1"
    check_name "$2"
    check_owner "$3"
    check_wait "$4"
    restart_cmd=$5
    inspect_config_dir || done_ok absent '' '' false
    find_book
    open_book
    mark_pending
    owner_step owner-remove "$cfg" "$name"
    report_ok ''
    case ${report##*"$NL"} in
        'ok absent')
            # Nothing to remove, but an earlier run's missed restart is owed.
            unmark_pending
            restart_if_owed
            done_ok absent '' '' "$restarted"
            ;;
    esac
    report_ok removed
    report_words
    prune_sums ''
    restart_runtime
    done_ok uninstalled '' "$rw_digest" "$restarted"
}

op_restart() {
    [ "$#" -eq 4 ] || usage 'restart takes 4 arguments'
    check_config_dir "$1"
    check_owner "$2"
    check_wait "$3"
    restart_cmd=$4
    inspect_config_dir || fail no_config_dir 'the runtime config directory does not exist' 69
    find_book
    open_book
    restart_runtime
    done_ok restarted '' '' "$restarted"
}

op_inventory() {
    [ "$#" -eq 2 ] || usage 'inventory takes 2 arguments'
    check_config_dir "$1"
    check_owner "$2"
    name=''
    if ! inspect_config_dir; then
        printf '%s {"status":"inventory","plugins":[],"pending_restart":false}\n' "$MARKER"
        exit 0
    fi
    find_book
    # Reads take no lock, unless this host still has to be migrated.
    if legacy_layout; then
        lock_wait=${PLUGIN_LOCK_WAIT_SECS:-20}
        check_wait "$lock_wait"
        open_book
    else
        make_book
        rwork=$(mktemp -d "$book/inventory.XXXXXX") || fail internal 'cannot create the state directory' 1
    fi
    with_sums=''
    for iv_sums in "$book/sums"/*@*; do
        [ -f "$iv_sums" ] && with_sums="$with_sums ${iv_sums##*/}"
    done
    with_sums=${with_sums# }
    step_sums=$with_sums
    owner_step owner-list "$cfg" "$with_sums"
    report_ok list
    # Root writes the list itself, from names and digests it checked.
    iv_rest=${report##*"$NL"}
    iv_rest=${iv_rest#ok list}
    iv_rest=${iv_rest# }
    iv_items=''
    iv_seen=' '
    while [ -n "$iv_rest" ]; do
        iv_entry=${iv_rest%%\}*}
        iv_rest=${iv_rest#"$iv_entry"\}}
        iv_rest=${iv_rest#,}
        iv_n=${iv_entry#\{\"name\":\"}
        iv_n=${iv_n%%\"*}
        iv_d=${iv_entry#*\"digest\":\"}
        iv_d=${iv_d%\"}
        if ! { [ "$iv_entry" = "{\"name\":\"$iv_n\",\"digest\":\"$iv_d\"" ] &&
            valid_name "$iv_n" && { [ -z "$iv_d" ] || valid_sha "$iv_d"; }; }; then
            fail internal 'a step run as the workspace user gave an odd result' 1
        fi
        case $iv_seen in
            *" $iv_n "*) fail internal 'a step run as the workspace user gave an odd result' 1 ;;
        esac
        iv_seen="$iv_seen$iv_n "
        iv_items="$iv_items${iv_items:+,}{\"name\":\"$iv_n\",\"digest\":\"$iv_d\"}"
    done
    iv_pending=false
    [ -e "$book/restart-pending" ] && iv_pending=true
    cleanup
    printf '%s {"status":"inventory","plugins":[%s],"pending_restart":%s}\n' "$MARKER" "$iv_items" "$iv_pending"
    exit 0
}

op=${1-}
[ "$#" -gt 0 ] && shift
case $op in
    install | uninstall | inventory | restart) start_root ;;
esac
case $op in
    install) op_install "$@" ;;
    uninstall) op_uninstall "$@" ;;
    inventory) op_inventory "$@" ;;
    restart) op_restart "$@" ;;
    owner-install) owner_install "$@" ;;
    owner-remove) owner_remove "$@" ;;
    owner-list) owner_list "$@" ;;
    *) usage 'unknown operation' ;;
esac
