#!/bin/sh
# plugin-host: the host side of every Plugin Delivery operation.
#
# Run remotely as  <prefix> sh -c '<this text>' plugin-host <op> <args...>
#   install   CONFIG_DIR NAME SHA256 OWNER LOCK_WAIT RESTART_CMD  (tar.gz on stdin,
#             or downloaded from $PLUGIN_ARCHIVE_URL when that is set)
#   uninstall CONFIG_DIR NAME OWNER LOCK_WAIT RESTART_CMD
#   inventory CONFIG_DIR
#   restart   CONFIG_DIR LOCK_WAIT RESTART_CMD   (after a batch installed with
#             an empty RESTART_CMD: the runtime restarts once for the set)
# Diagnostics go to stderr. stdout carries exactly one line, the result:
#   @@plugin-delivery-result {"status":...}
# Exit codes: 0 ok, 64 usage, 65 digest_mismatch, 66 bad_archive,
# 69 no_config_dir, 70 restart_failed, 71 unwire_failed, 74 fetch_failed,
# 75 busy, 1 internal.
#
# Transports: over SSH the archive streams on stdin. Through SSM Run Command
# there is no stdin, so the command sets PLUGIN_ARCHIVE_URL (a presigned S3
# URL, valid a few minutes) and the script downloads the archive itself with
# curl or wget; everything after the download is the same code.
#
# Layout under CONFIG_DIR (one filesystem, so every mv below is a rename(2)):
#   plugins/NAME -> ../.plugin-delivery/store/NAME@SHA   (relative symlink)
#   .plugin-delivery/lock      flock file serialising mutating operations
#   .plugin-delivery/staging/  private scratch space, one mktemp dir per op
#   .plugin-delivery/store/    immutable plugin trees, one per installed digest
#   .plugin-delivery/aside/    a legacy plugin dir during its replacement only
#   .plugin-delivery/sums/NAME@SHA  sha256sum list of that store tree: an
#                              install of the same digest and the inventory
#                              check it, so a tree changed by hand is repaired
# Swapping the symlink with rename(2) is atomic, so plugins/NAME is always the
# complete old tree or the complete new one. The installed digest is read back
# from the link target; there is no other state to drift.

# Predictable modes for what we create; the restart command gets the
# caller's umask back (restart_runtime).
caller_umask=$(umask)
umask 022

# Character classes are spelled out, not ranges like a-z: ranges follow the
# locale's collation in some shells, and the runtime must keep its locale.
LOWER='abcdefghijklmnopqrstuvwxyz'
DIGITS='0123456789'

MARKER='@@plugin-delivery-result'
STORE_REL='../.plugin-delivery/store'

plugin=''   # echoed in results only once NAME has been validated
work=''     # this operation's staging dir, removed on any exit
aside=''    # legacy plugin dir moved to .plugin-delivery/aside/, put back unless published

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
}

# fail CODE MESSAGE EXIT: MESSAGE is a fixed text, safe to embed in JSON.
fail() {
    cleanup
    printf '%s {"status":"error","plugin":"%s","code":"%s","message":"%s"}\n' \
        "$MARKER" "$plugin" "$1" "$2"
    exit "$3"
}

usage() { fail usage "$1" 64; }

# done_ok STATUS DIGEST PREVIOUS RESTARTED: "pending_restart" says a change
# is on disk that the runtime has not been restarted for yet.
done_ok() {
    cleanup
    do_pending=false
    [ -n "${state-}" ] && [ -e "$state/restart-pending" ] && do_pending=true
    printf '%s {"status":"%s","plugin":"%s","digest":"%s","previous":"%s","restarted":%s,"pending_restart":%s}\n' \
        "$MARKER" "$1" "$plugin" "$2" "$3" "$4" "$do_pending"
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

valid_owner() {
    case $1 in
        '' | *[!"$DIGITS":]* | :* | *: | *:*:*) return 1 ;;
        *:*) [ "${#1}" -le 21 ] ;;
        *) return 1 ;;
    esac
}

valid_wait() {
    case $1 in
        '' | *[!"$DIGITS"]*) return 1 ;;
    esac
    [ "${#1}" -le 6 ]
}

check_config_dir() {
    case $1 in
        /*) cfg=$1 ;;
        *) usage 'config dir must be an absolute path' ;;
    esac
}

check_name() {
    valid_name "$1" || usage 'invalid plugin name'
    name=$1
    plugin=$1
}

check_owner_wait() {
    valid_owner "$1" || usage 'owner must be numeric uid:gid'
    valid_wait "$2" || usage 'lock wait must be a whole number of seconds'
    owner=$1
    lock_wait=$2
}

# ------------------------------------------------------------------- helpers

paths() {
    state="$cfg/.plugin-delivery"
    staging="$state/staging"
    store="$state/store"
    link="$cfg/plugins/$name"
}

# Create the state dirs, take the host lock, clear leftovers of killed runs.
lock_host() {
    mkdir -p "$staging" "$store" || fail internal 'cannot create the state directory' 1
    chmod 0755 "$state" "$store" || fail internal 'cannot set state directory modes' 1
    chmod 0700 "$staging" || fail internal 'cannot set state directory modes' 1
    # fd-based so the lock lives exactly as long as this shell. "command"
    # keeps a failed redirection from killing the shell before it can report.
    command exec 9>>"$state/lock" || fail internal 'cannot open the lock file' 1
    flock -w "$lock_wait" 9 || fail busy 'another plugin operation holds the host lock' 75
    # Holding the lock means no other operation is using staging: anything
    # there was left by a run that was killed outright (SIGKILL, power loss;
    # SSM stops commands that way).
    recover_aside
    find "$staging" -mindepth 1 -maxdepth 1 -exec rm -rf {} + ||
        fail internal 'cannot clear the staging directory' 1
}

# A legacy plugin dir left in aside/ by a killed run: put it back if its link
# never replaced it, else the replacement finished and it can go.
recover_aside() {
    for ra_dir in "$state/aside"/*; do
        [ -e "$ra_dir" ] || [ -L "$ra_dir" ] || continue
        ra_link="$cfg/plugins/${ra_dir##*/}"
        if [ -e "$ra_link" ] || [ -L "$ra_link" ]; then
            rm -rf "$ra_dir" || fail internal 'cannot clear a leftover legacy directory' 1
        else
            mv "$ra_dir" "$ra_link" || fail internal 'cannot restore a legacy plugin directory' 1
        fi
    done
}

# Digest encoded in one of our links, or nothing for any other target.
link_digest() {
    ld_target=$(readlink "$1") || return 0
    case $ld_target in
        "$STORE_REL/$2@"*)
            ld_sha=${ld_target##*@}
            if valid_sha "$ld_sha"; then printf '%s' "$ld_sha"; fi
            ;;
    esac
}

# Sets prev_kind (none | link | legacy) and prev_digest for plugins/NAME.
inspect_current() {
    prev_kind='none'
    prev_digest=''
    if [ -L "$link" ]; then
        prev_kind='link'
        prev_digest=$(link_digest "$link" "$name")
    elif [ -d "$link" ]; then
        prev_kind='legacy'
    elif [ -e "$link" ]; then
        fail internal 'the plugin path is neither a link nor a directory' 1
    fi
}

# Remove store trees of NAME other than the one given (may be empty), and
# their sums.
prune_store() {
    for ps_dir in "$store/$name"@*; do
        [ "$ps_dir" = "$1" ] && continue
        if [ -e "$ps_dir" ] || [ -L "$ps_dir" ]; then
            rm -rf "$ps_dir" || say 'could not remove an old store directory'
        fi
    done
    for ps_sums in "$state/sums/$name"@*; do
        [ -n "$1" ] && [ "$ps_sums" = "$state/sums/${1##*/}" ] && continue
        [ -e "$ps_sums" ] && { rm -f "$ps_sums" || say 'could not remove old sums'; }
    done
}

# tree_intact NAME@SHA: every file the tree was installed with is still there
# with the same bytes. Files added later (a runtime's __pycache__) do not
# count: the runtime may write into its plugins. Trees installed before sums
# existed count as intact. Plain `sha256sum -c`: BusyBox has no --quiet.
tree_intact() {
    ti_sums="$state/sums/$1"
    [ -f "$ti_sums" ] || return 0
    (cd "$store/$1" && sha256sum -c "$ti_sums" >/dev/null 2>&1)
}

# Prints "true" or "false" for the result's "restarted" field. Called in a
# command substitution, so the umask change stays in that subshell.
restart_runtime() {
    if [ -z "$restart_cmd" ]; then
        printf false
        return 0
    fi
    umask "$caller_umask"
    # The marker (set when a change lands) goes only once the restart
    # succeeded: a run killed in between leaves it for the next one.
    # fd 9 closed: a daemon started here must not inherit (and keep) the lock.
    # stdout to stderr: the result line must stay the only thing on stdout.
    # PLUGIN_CONFIG_DIR: which config dir changed, for the runtime's tooling.
    PLUGIN_CONFIG_DIR=$cfg sh -c "$restart_cmd" </dev/null >&2 9>&- || return 1
    rm -f "$state/restart-pending"
    printf true
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
        *'"'* | *\\* | *"$fa_cr"* | *'
'*) usage 'the archive URL holds characters a URL cannot hold' ;;
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

# Remove exactly what the runtime wired from plugin dir $1 (see runtime
# contract in tests/stack/fake-runtime.py, which emulates the wiring side).
unwire() {
    command -v python3 >/dev/null 2>&1 ||
        fail unwire_failed 'python3 is not available on the host' 71
    python3 - "$cfg" "$name" "$1" >&2 9>&- <<'PY' ||
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


def write_like(path, text):
    # Atomic replace of the real file, keeping its owner and mode.
    path = os.path.realpath(path)
    st = os.stat(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".plugin-delivery.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
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
        if f.endswith(".md") and os.path.isfile(fp):
            out.append("# Plugin: %s / rule: %s\n\n%s" % (n, f, read_text(fp).strip()))
    for f in entries(p):
        fp = os.path.join(p, f)
        if f.endswith(".md") and os.path.isfile(fp) and f.lower() not in NOT_FRAGMENTS:
            body = read_text(fp).strip()
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
    except ValueError:
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

# ---------------------------------------------------------------- operations

op_install() {
    [ "$#" -eq 6 ] || usage 'install takes 6 arguments'
    check_config_dir "$1"
    check_name "$2"
    valid_sha "$3" || usage 'digest must be 64 lowercase hex characters'
    sha=$3
    check_owner_wait "$4" "$5"
    restart_cmd=$6
    [ -d "$cfg" ] || fail no_config_dir 'the runtime config directory does not exist' 69
    paths
    lock_host
    inspect_current
    new_store="$store/$name@$sha"
    if [ "$prev_kind" = link ] && [ "$prev_digest" = "$sha" ] && [ -d "$new_store" ] &&
        tree_intact "$name@$sha"; then
        # Already there: leave stdin unread and the runtime alone, unless
        # an earlier run was cut off before its restart.
        restarted=false
        if [ -e "$state/restart-pending" ] && [ -n "$restart_cmd" ]; then
            restarted=$(restart_runtime) || fail restart_failed 'the runtime restart command failed' 70
        fi
        done_ok unchanged "$sha" "$sha" "$restarted"
    fi

    work=$(mktemp -d "$staging/install.XXXXXX") || fail internal 'cannot create a staging directory' 1
    if [ -n "${PLUGIN_ARCHIVE_URL-}" ]; then
        fetch_archive "$work/archive"
    else
        # A cut connection just ends stdin early; the digest check catches it.
        cat >"$work/archive" || fail internal 'cannot read the archive' 1
    fi
    got=$(sha256sum <"$work/archive") || fail internal 'cannot hash the archive' 1
    [ "${got%% *}" = "$sha" ] || fail digest_mismatch 'archive digest does not match' 65
    mkdir "$work/tree" || fail internal 'cannot create a staging directory' 1
    tar -xzf "$work/archive" -C "$work/tree" --no-same-owner >&2 ||
        fail bad_archive 'archive could not be extracted' 66
    rm -f "$work/archive"
    # Plugins are plain files and directories; anything else is not ours.
    [ -z "$(find "$work/tree" ! -type d ! -type f)" ] ||
        fail bad_archive 'archive holds entries other than files and directories' 66
    chown -R "$owner" "$work/tree" || fail internal 'cannot set the owner of the plugin files' 1
    (cd "$work/tree" && find . -type f -exec sha256sum {} +) >"$work/sums" ||
        fail internal 'cannot hash the plugin files' 1

    if [ ! -d "$cfg/plugins" ]; then
        mkdir "$cfg/plugins" || fail internal 'cannot create the plugins directory' 1
        chown "$owner" "$cfg/plugins" || fail internal 'cannot create the plugins directory' 1
    fi
    # Upgrade rule: the runtime wires only what is not wired yet, so remove
    # what the old version wired; the restart then wires the new one.
    if [ "$prev_kind" != none ]; then
        unwire "$link"
    fi
    # A store dir of this digest that no link points to is a stale leftover.
    rm -rf "$new_store" || fail internal 'cannot remove a stale store directory' 1
    mkdir -p "$state/sums" || fail internal 'cannot create the state directory' 1
    mv "$work/sums" "$state/sums/$name@$sha" || fail internal 'cannot record the plugin file sums' 1
    mv "$work/tree" "$new_store" || fail internal 'cannot move the plugin into the store' 1
    ln -s "$STORE_REL/$name@$sha" "$work/link" || fail internal 'cannot create the plugin link' 1
    chown -h "$owner" "$work/link" || fail internal 'cannot create the plugin link' 1
    if [ "$prev_kind" = legacy ]; then
        # A legacy install is a real directory, which rename(2) cannot replace
        # with a link: move it aside first (outside staging, so a run killed
        # right here loses nothing: recover_aside puts it back). Only legacy
        # installs see this gap.
        mkdir -p "$state/aside" || fail internal 'cannot move the legacy plugin aside' 1
        mv "$link" "$state/aside/$name" || fail internal 'cannot move the legacy plugin aside' 1
        aside="$state/aside/$name"
    fi
    : >"$state/restart-pending" || say 'could not record the pending restart'
    mv -T "$work/link" "$link" || fail internal 'cannot switch the plugin link' 1
    if [ -n "$aside" ]; then
        rm -rf "$aside" || say 'could not remove the replaced legacy directory'
        aside=''
    fi
    cleanup
    prune_store "$new_store"

    restarted=$(restart_runtime) || fail restart_failed 'the runtime restart command failed' 70
    done_ok installed "$sha" "$prev_digest" "$restarted"
}

op_uninstall() {
    [ "$#" -eq 5 ] || usage 'uninstall takes 5 arguments'
    check_config_dir "$1"
    check_name "$2"
    check_owner_wait "$3" "$4"
    restart_cmd=$5
    [ -d "$cfg" ] || done_ok absent '' '' false
    paths
    lock_host
    inspect_current
    if [ "$prev_kind" = none ]; then
        # Nothing to remove, but an earlier run's missed restart is owed.
        restarted=false
        if [ -e "$state/restart-pending" ] && [ -n "$restart_cmd" ]; then
            restarted=$(restart_runtime) || fail restart_failed 'the runtime restart command failed' 70
        fi
        done_ok absent '' '' "$restarted"
    fi

    : >"$state/restart-pending" || say 'could not record the pending restart'
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

    restarted=$(restart_runtime) || fail restart_failed 'the runtime restart command failed' 70
    done_ok uninstalled '' "$prev_digest" "$restarted"
}

op_restart() {
    [ "$#" -eq 3 ] || usage 'restart takes 3 arguments'
    check_config_dir "$1"
    valid_wait "$2" || usage 'lock wait must be a whole number of seconds'
    lock_wait=$2
    restart_cmd=$3
    [ -d "$cfg" ] || fail no_config_dir 'the runtime config directory does not exist' 69
    name=''
    paths
    lock_host
    restarted=$(restart_runtime) || fail restart_failed 'the runtime restart command failed' 70
    done_ok restarted '' '' "$restarted"
}

op_inventory() {
    [ "$#" -eq 1 ] || usage 'inventory takes 1 argument'
    check_config_dir "$1"
    name=''
    paths
    inv=''
    for entry in "$cfg/plugins"/*; do
        n=${entry##*/}
        # Names we could not have installed (and could not quote) are skipped.
        valid_name "$n" || continue
        if [ -L "$entry" ]; then
            d=$(link_digest "$entry" "$n")
            # A dangling link, or a tree changed by hand, is reported without
            # a digest so it is reinstalled.
            [ -d "$entry" ] || d=''
            if [ -n "$d" ] && ! tree_intact "$n@$d"; then d=''; fi
        elif [ -d "$entry" ]; then
            d=''
        else
            continue
        fi
        inv="$inv${inv:+,}{\"name\":\"$n\",\"digest\":\"$d\"}"
    done
    iv_pending=false
    [ -e "$state/restart-pending" ] && iv_pending=true
    printf '%s {"status":"inventory","plugins":[%s],"pending_restart":%s}\n' "$MARKER" "$inv" "$iv_pending"
    exit 0
}

op=${1-}
[ "$#" -gt 0 ] && shift
case $op in
    install) op_install "$@" ;;
    uninstall) op_uninstall "$@" ;;
    inventory) op_inventory "$@" ;;
    restart) op_restart "$@" ;;
    *) usage 'unknown operation' ;;
esac
