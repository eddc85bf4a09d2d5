#!/usr/bin/env python3
"""Emulates the agent runtime's start-up wiring of plugins.

Usage: python3 fake-runtime.py CONFIG_DIR

Used as the RESTART_CMD in tests and the demo. For every plugin dir P named N
in CONFIG_DIR/plugins/* (sorted) it does what the real runtime does at start:

  a. appends "\\n" + chunk to CONFIG_DIR/CLAUDE.md, where chunk joins with
     "\\n\\n" one block per P/rules/*.md ("# Plugin: N / rule: F\\n\\n" +
     stripped content, even if empty) and per non-empty root-level P/*.md
     other than README/CHANGELOG/LICENSE/CONTRIBUTING ("# Plugin: N /
     fragment: F\\n\\n" + stripped content);
  b. copies each dir P/skills/S to CONFIG_DIR/skills/S when absent;
  c. copies the regular files of P/hooks/ to CONFIG_DIR/.claude/hooks/ (*.sh
     made executable) and P/commands/*.md to CONFIG_DIR/.claude/commands/;
  d. merges P/settings-fragment.json into CONFIG_DIR/.claude/settings.json:
     "${CLAUDE_DIR}" in hook commands becomes CONFIG_DIR/.claude, hook groups
     are appended per event, other top-level keys are set only when missing.

Like the runtime it is idempotent: a plugin whose "# Plugin: N / " marker is
already in CLAUDE.md is not appended again, and an equal hook group is not
added twice. plugin-host.sh's unwire step is the exact inverse of this file.
Each run also appends a timestamp line to CONFIG_DIR.restarts (a sibling
file), so tests can count restarts. Started as root, it does the wiring as
the config dir's owner, as the real runtime runs as the agent user.
"""

import json
import os
import re
import shutil
import sys
import time

NOT_FRAGMENTS = {"readme.md", "changelog.md", "license.md", "contributing.md"}


def entries(d):
    # Shell glob "*" semantics: sorted, no dotfiles.
    try:
        return sorted(e for e in os.listdir(d) if not e.startswith("."))
    except OSError:
        return []


def read_text(path):
    # newline="" and surrogateescape keep bytes exactly as they are on disk.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def write_text(path, text):
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


def as_list(x):
    return x if isinstance(x, list) else []


def wire_memory(cfg, p, n):
    blocks = []
    rules = os.path.join(p, "rules")
    for f in entries(rules):
        fp = os.path.join(rules, f)
        if f.endswith(".md") and os.path.isfile(fp):
            blocks.append("# Plugin: %s / rule: %s\n\n%s" % (n, f, read_text(fp).strip()))
    for f in entries(p):
        fp = os.path.join(p, f)
        if f.endswith(".md") and os.path.isfile(fp) and f.lower() not in NOT_FRAGMENTS:
            body = read_text(fp).strip()
            if body:
                blocks.append("# Plugin: %s / fragment: %s\n\n%s" % (n, f, body))
    if not blocks:
        return
    path = os.path.join(cfg, "CLAUDE.md")
    text = read_text(path) if os.path.isfile(path) else ""
    if re.search("(?m)^" + re.escape("# Plugin: %s / " % n), text):
        return
    write_text(path, text + "\n" + "\n\n".join(blocks))


def wire_skills(cfg, p):
    src = os.path.join(p, "skills")
    for s in entries(src):
        dest = os.path.join(cfg, "skills", s)
        if os.path.isdir(os.path.join(src, s)) and not os.path.lexists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copytree(os.path.join(src, s), dest)


def wire_files(claude_dir, p, sub, suffix):
    src = os.path.join(p, sub)
    for f in entries(src):
        if not (f.endswith(suffix) and os.path.isfile(os.path.join(src, f))):
            continue
        dest = os.path.join(claude_dir, sub, f)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(src, f), dest)
        if sub == "hooks" and f.endswith(".sh"):
            os.chmod(dest, 0o755)


def wire_settings(claude_dir, p):
    fpath = os.path.join(p, "settings-fragment.json")
    if not os.path.isfile(fpath):
        return
    with open(fpath, encoding="utf-8") as f:
        frag = json.load(f)
    path = os.path.join(claude_dir, "settings.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    else:
        settings = {}
    for key, value in frag.items():
        if key != "hooks":
            settings.setdefault(key, value)
            continue
        for event, groups in value.items():
            have = settings.setdefault("hooks", {}).setdefault(event, [])
            for g in as_list(groups):
                for h in as_list(g.get("hooks")):
                    if isinstance(h.get("command"), str):
                        h["command"] = h["command"].replace("${CLAUDE_DIR}", claude_dir)
                if g not in have:
                    have.append(g)
    new = json.dumps(settings, indent=2) + "\n"
    if not os.path.isfile(path) or read_text(path) != new:
        os.makedirs(claude_dir, exist_ok=True)
        write_text(path, new)


def main():
    # The config dir: the argument, else PLUGIN_CONFIG_DIR, which the host
    # script sets for the restart command (hosts sharing one restart line).
    if len(sys.argv) == 2:
        cfg = sys.argv[1]
    elif len(sys.argv) == 1 and os.environ.get("PLUGIN_CONFIG_DIR"):
        cfg = os.environ["PLUGIN_CONFIG_DIR"]
    else:
        sys.exit("usage: fake-runtime.py [CONFIG_DIR]  (default: $PLUGIN_CONFIG_DIR)")
    # The count of restarts sits beside the config dir, where only root may
    # write: open it first, then become the config dir's owner, as the real
    # runtime (in its container) only ever is.
    restarts = open(os.path.abspath(cfg) + ".restarts", "a")
    st = os.stat(cfg)
    if os.getuid() == 0 and st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    claude_dir = os.path.join(os.path.abspath(cfg), ".claude")
    plugins = os.path.join(cfg, "plugins")
    for n in entries(plugins):
        p = os.path.join(plugins, n)
        if not os.path.isdir(p):
            continue
        wire_memory(cfg, p, n)
        wire_skills(cfg, p)
        wire_files(claude_dir, p, "hooks", "")
        wire_files(claude_dir, p, "commands", ".md")
        wire_settings(claude_dir, p)
    with restarts as f:
        f.write("%.6f\n" % time.time())


if __name__ == "__main__":
    main()
