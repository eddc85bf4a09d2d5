#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpus (fuzz/corpus/<target>/seed-*).

The fuzzers add what they find beside these; both are kept in the repo and
replayed by shared/tests/fuzz_corpus.rs. Run from fuzz/: ./seed.py
"""
import gzip, io, json, os, tarfile

def tgz(entries, top=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in entries:
            name = f"{top}/{name}" if top else name
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "file":
                info.size = len(data); info.mode = 0o644
                t.addfile(info, io.BytesIO(data))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE; info.mode = 0o755; t.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE; info.linkname = data.decode(); t.addfile(info)
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE; info.linkname = data.decode(); t.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE; t.addfile(info)
    return gzip.compress(buf.getvalue(), mtime=0)

plugin = [
    ("plugin.yaml", "file", b"name: demo\nversion: 1.0.0\nskills: [s]\nruntimes: [claude-code]\n"),
    ("skills", "dir", b""),
    ("skills/s", "dir", b""),
    ("skills/s/SKILL.md", "file", b"# S\n"),
    ("rules/r.md", "file", b"rule\n"),
    ("settings-fragment.json", "file", b'{"hooks": {}}'),
]
seeds = {
    "plain": (0, tgz(plugin)),
    "github-top": (1, tgz([("", "dir", b"")] + plugin, top="repo-abc123")),
    "tight-limits": (2, tgz(plugin)),
    "links": (0, tgz(plugin + [("l", "symlink", b"../../etc/passwd"), ("h", "hardlink", b"plugin.yaml")])),
    "dotdot": (0, tgz([("../x", "file", b"x")])),
    "fifo": (0, tgz([("p", "fifo", b"")])),
    "long-name": (0, tgz([("d/" * 40 + "f", "file", b"x"), ("n" * 300, "file", b"y")])),
    "duplicate": (0, tgz([("a", "file", b"1"), ("a", "file", b"2")])),
    "manifest-pin": (0, tgz(plugin + [("manifest.json", "file", b'{"sha256": "00"}')])),
    "two-members": (0, tgz(plugin) + tgz(plugin)),
    "not-gzip": (0, b"PK\x03\x04 not a tarball"),
}
for name, (mode, data) in seeds.items():
    open(f"corpus/intake/seed-{name}", "wb").write(bytes([mode]) + data)

for i, s in enumerate([
    "demo", "local://demo", "github://acme/tools", "github://acme/tools#v1.2.0",
    "github://acme/tools#../../x", "github://acme/tools#refs/heads/main",
    "https://example.com/p.tar.gz#sha256=" + "a" * 64,
    "https://example.com/p.tar.gz?X-Amz-Signature=abc&X-Amz-Expires=60#sha256=" + "b" * 64,
    "https://user:pw@example.com/p.tar.gz#sha256=" + "c" * 64,
    "https://EXAMPLE.com:443/a/../p.tgz#sha256=" + "d" * 64,
    "http://example.com/p.tar.gz", "ftp://x", "local://../etc", "UPPER", " demo ",
]):
    open(f"corpus/source/seed-{i:02}", "wb").write(s.encode())

def result(obj):
    return b"@@plugin-delivery-result " + json.dumps(obj).encode()
host = {
    "installed": (1, b"noise\n" + result({"status": "installed", "plugin": "demo", "digest": "ab", "restarted": True})),
    "busy": (2, result({"status": "error", "code": "busy", "message": "another operation holds the lock"})),
    "unknown-code": (2, result({"status": "error", "code": "weird/../code", "message": "/etc/shadow"})),
    "inventory": (1, result({"status": "inventory", "plugins": [{"name": "a", "digest": "x"}]})),
    "lost": (0, b"partial output\xffstderr text"),
    "killed": (4, b"\xffKilled"),
    "refused": (8, b""),
    "garbage": (1, b"@@plugin-delivery-result {not json"),
}
for name, (mode, data) in host.items():
    open(f"corpus/host_result/seed-{name}", "wb").write(bytes([mode]) + data)
