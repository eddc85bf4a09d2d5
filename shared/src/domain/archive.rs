//! Canonical plugin archives.
//!
//! The same tree always yields the same bytes, so an archive can be
//! content-addressed (`staged/<sha256>.tar.gz`) and reused: entries sorted by
//! path, directories and regular files only, uid/gid 0, mtime 0, modes 0644
//! or 0755, and a gzip header without name or time. Files of 1 MiB or more
//! whose first 64 KiB do not compress are stored, not deflated (`gzip`).
//! The archive is written to a temporary file while hashing, never held in
//! memory.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::domain::error::{Error, Result};
use crate::domain::gzip::{self, GzWriter};

/// Largest `plugin.yaml` we keep in memory for parsing and pinning.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// Exec bit kept (for anyone), setuid/setgid/sticky and write-for-others dropped.
pub fn canonical_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// A relative path made only of normal components, `/`-separated.
pub fn validate_relative_path(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.len() > 1024
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || path.chars().any(|c| c.is_control() || c == '\\');
    if bad {
        return Err(Error::unprocessable(format!(
            "plugin contains an unsafe path {path:?}"
        )));
    }
    Ok(())
}

/// A finished archive on local disk.
#[derive(Debug)]
pub struct ArchiveFile {
    pub file: NamedTempFile,
    pub sha256: String,
    pub size: u64,
    /// Bytes of the top-level `plugin.yaml`, when the tree has one.
    pub manifest: Option<Vec<u8>>,
}

impl ArchiveFile {
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// Told, each time the archive's file grows, its path and how many of its
/// bytes are in it: a reader (a host taking the archive while it is built)
/// may read that far.
pub type Tap = Box<dyn FnMut(&Path, u64) + Send>;

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The archive's file, telling its `Tap` what reached it.
struct Growing {
    file: File,
    path: std::path::PathBuf,
    len: u64,
    tap: Option<Tap>,
}

impl Write for Growing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.len += n as u64;
        if let Some(tap) = &mut self.tap {
            tap(&self.path, self.len);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Streams entries into a canonical `.tar.gz`. Callers add entries in
/// sorted order; `add_file` fails if the reader yields more or fewer bytes
/// than announced, or if the tree grows past the cap.
pub struct CanonicalArchive {
    builder: tar::Builder<GzWriter<HashingWriter<BufWriter<Growing>>>>,
    file: NamedTempFile,
    last_path: Option<String>,
    dirs: std::collections::BTreeSet<String>,
    tree_bytes: u64,
    max_tree_bytes: u64,
    manifest: Option<Vec<u8>>,
    /// The tree digest that a top-level `manifest.json` may pin (see
    /// `verify_tree_digest`), accumulated while the files stream through.
    tree: Sha256,
    manifest_json: Option<Vec<u8>>,
}

/// Files this large are sampled (their first `SAMPLE_BYTES`) for whether
/// they compress at all.
const SAMPLE_FILES_FROM: u64 = 1024 * 1024;
const SAMPLE_BYTES: u64 = 64 * 1024;

/// The file whose `sha256` field pins the rest of the tree.
pub const TREE_MANIFEST: &str = "manifest.json";

impl CanonicalArchive {
    pub fn create(max_tree_bytes: u64) -> Result<Self> {
        Self::create_tapped(max_tree_bytes, None)
    }

    /// `create`, telling `tap` each time the file grows (every 256 KiB, and
    /// at the end).
    pub fn create_tapped(max_tree_bytes: u64, tap: Option<Tap>) -> Result<Self> {
        let file = tempfile::Builder::new()
            .prefix("plugin-")
            .suffix(".tar.gz")
            .tempfile()
            .map_err(Error::internal)?;
        let out = file.reopen().map_err(Error::internal)?;
        let out = Growing {
            file: out,
            path: file.path().to_path_buf(),
            len: 0,
            tap,
        };
        let hashing = HashingWriter {
            inner: BufWriter::with_capacity(256 * 1024, out),
            hasher: Sha256::new(),
            count: 0,
        };
        // Level 1: plugins are mostly text, and on a 128-256 MB Lambda the
        // CPU spent on better ratios costs more time than the bytes saved.
        let gz = GzWriter::new(hashing).map_err(Error::internal)?;
        let mut builder = tar::Builder::new(gz);
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(CanonicalArchive {
            builder,
            file,
            last_path: None,
            dirs: Default::default(),
            tree_bytes: 0,
            max_tree_bytes,
            manifest: None,
            tree: Sha256::new(),
            manifest_json: None,
        })
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    }

    /// Emits the parent directories of `path` not yet emitted, so every
    /// file's directory exists in the archive with a canonical mode.
    fn add_parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
                self.builder
                    .append_data(&mut h, format!("{prefix}/"), io::empty())
                    .map_err(Error::internal)?;
            }
        }
        Ok(())
    }

    /// Adds one regular file. `path` must sort after the previous one.
    pub fn add_file(&mut self, path: &str, size: u64, mode: u32, data: impl Read) -> Result<()> {
        validate_relative_path(path)?;
        if let Some(last) = &self.last_path {
            if path.as_bytes() <= last.as_bytes() {
                return Err(Error::internal(format!(
                    "archive entries out of order at {path}"
                )));
            }
        }
        self.tree_bytes += size;
        if self.tree_bytes > self.max_tree_bytes {
            return Err(too_large(self.max_tree_bytes));
        }
        let keep = path == "plugin.yaml" || path == TREE_MANIFEST;
        if keep && size as usize > MAX_MANIFEST_BYTES {
            return Err(Error::unprocessable(format!("{path} is larger than 1 MiB")));
        }
        self.add_parents(path)?;
        let mut h = Self::header(tar::EntryType::Regular, canonical_mode(mode), size);
        // Tree digest entries are `path NUL content`; files arrive sorted by
        // path and NUL sorts first, so this is also the entries' byte order.
        let in_tree = path != TREE_MANIFEST;
        if in_tree {
            self.tree.update(path.as_bytes());
            self.tree.update([0u8]);
        }
        // A large file is sampled: one that does not compress is stored.
        let mut data = data;
        let mut sample = Vec::new();
        if size >= SAMPLE_FILES_FROM {
            (&mut data)
                .take(SAMPLE_BYTES)
                .read_to_end(&mut sample)
                .map_err(|e| Error::internal(format!("reading {path}: {e}")))?;
        }
        let store = gzip::incompressible(&sample);
        let mut counted = CountingReader {
            inner: io::Cursor::new(sample).chain(data),
            count: 0,
            copy: keep.then(Vec::new),
            tree: in_tree.then_some(&mut self.tree),
        };
        // `take(size)` plus the count check below: a source that changes
        // length under us is an error, never a silently truncated archive.
        let gz_mode = |b: &mut tar::Builder<_>, store| {
            GzWriter::store(b.get_mut(), store).map_err(Error::internal)
        };
        if store {
            gz_mode(&mut self.builder, true)?;
        }
        self.builder
            .append_data(&mut h, path, (&mut counted).take(size))
            .map_err(|e| Error::internal(format!("reading {path}: {e}")))?;
        if store {
            gz_mode(&mut self.builder, false)?;
        }
        if counted.count != size {
            return Err(Error::internal(format!(
                "{path}: expected {size} bytes, read {}",
                counted.count
            )));
        }
        if let Some(copy) = counted.copy {
            if path == TREE_MANIFEST {
                self.manifest_json = Some(copy);
            } else {
                self.manifest = Some(copy);
            }
        }
        self.last_path = Some(path.to_string());
        Ok(())
    }

    /// Completes the gzip stream of what was added so far, with no tree
    /// check: for a caller that wants the files back (intake's fallback when
    /// entries stop arriving in order), not an archive to ship.
    pub fn into_partial(self) -> Result<NamedTempFile> {
        let gz = self.builder.into_inner().map_err(Error::internal)?;
        let mut hashing = gz.finish().map_err(Error::internal)?;
        hashing.flush().map_err(Error::internal)?;
        Ok(self.file)
    }

    /// Checks the tree against `manifest.json`'s `sha256`, then completes
    /// the archive. No manifest, or no `sha256` key: nothing to check.
    pub fn finish(self) -> Result<ArchiveFile> {
        if let Some(json) = &self.manifest_json {
            verify_tree_digest(json, &hex::encode(self.tree.clone().finalize()))?;
        }
        let gz = self.builder.into_inner().map_err(Error::internal)?;
        let mut hashing = gz.finish().map_err(Error::internal)?;
        hashing.flush().map_err(Error::internal)?;
        let sha256 = hex::encode(hashing.hasher.finalize());
        Ok(ArchiveFile {
            file: self.file,
            sha256,
            size: hashing.count,
            manifest: self.manifest,
        })
    }
}

pub fn too_large(cap: u64) -> Error {
    Error::too_large(format!(
        "plugin is larger than the {} MiB limit",
        cap / (1024 * 1024)
    ))
}

struct CountingReader<'a, R> {
    inner: R,
    count: u64,
    copy: Option<Vec<u8>>,
    tree: Option<&'a mut Sha256>,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(c) = &mut self.copy {
            c.extend_from_slice(&buf[..n]);
        }
        if let Some(t) = &mut self.tree {
            t.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The `plugin.yaml` inside a canonical archive, read from the archive
/// itself. Entries are sorted by path, so the scan stops at the first path
/// past it.
pub fn manifest_in(path: &Path) -> Result<Option<Vec<u8>>> {
    let file = File::open(path).map_err(Error::internal)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    for entry in tar.entries().map_err(Error::internal)? {
        let mut entry = entry.map_err(Error::internal)?;
        let p = entry
            .path()
            .map_err(Error::internal)?
            .to_string_lossy()
            .into_owned();
        match p.as_str().cmp("plugin.yaml") {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Greater => return Ok(None),
            std::cmp::Ordering::Equal => {
                let mut bytes = Vec::new();
                (&mut entry)
                    .take(MAX_MANIFEST_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
                    .map_err(Error::internal)?;
                if bytes.len() > MAX_MANIFEST_BYTES {
                    return Err(Error::unprocessable("plugin.yaml is larger than 1 MiB"));
                }
                return Ok(Some(bytes));
            }
        }
    }
    Ok(None)
}

/// `manifest.json`'s `sha256`, when present, must equal the tree digest
/// (case-insensitive): invalid JSON or a non-string `sha256` is refused.
pub fn verify_tree_digest(manifest_json: &[u8], tree_digest: &str) -> Result<()> {
    let doc: serde_json::Value = serde_json::from_slice(manifest_json)
        .map_err(|_| Error::unprocessable("manifest.json is not valid JSON"))?;
    match doc.get("sha256") {
        None => Ok(()),
        Some(serde_json::Value::String(want)) if want.eq_ignore_ascii_case(tree_digest) => Ok(()),
        Some(serde_json::Value::String(want)) => Err(Error::unprocessable(
            "the plugin's files do not match the sha256 in its manifest.json",
        )
        .with_field("expected", serde_json::json!(want.to_ascii_lowercase()))
        .with_field("actual", serde_json::json!(tree_digest))),
        Some(_) => Err(Error::unprocessable(
            "manifest.json's sha256 must be a string",
        )),
    }
}

/// SHA-256 of a byte string, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(files: &[(&str, &[u8], u32)]) -> ArchiveFile {
        let mut a = CanonicalArchive::create(1 << 20).unwrap();
        for (p, d, m) in files {
            a.add_file(p, d.len() as u64, *m, *d).unwrap();
        }
        a.finish().unwrap()
    }

    #[test]
    fn a_tap_follows_the_file_as_it_grows_to_its_end() {
        // Bytes that do not compress (xorshift), stored as they are.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let big: Vec<u8> = (0..3_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let files: &[(&str, &[u8], u32)] = &[
            ("data/big.bin", &big, 0o644),
            ("plugin.yaml", b"name: x\n", 0o644),
        ];
        let seen = std::sync::Arc::new(std::sync::Mutex::new(
            Vec::<(std::path::PathBuf, u64, u64)>::new(),
        ));
        let kept = seen.clone();
        let tap: Tap = Box::new(move |path, len| {
            // What the file holds when the tap hears of it.
            let on_disk = std::fs::metadata(path).unwrap().len();
            kept.lock()
                .unwrap()
                .push((path.to_path_buf(), len, on_disk));
        });
        let mut a = CanonicalArchive::create_tapped(1 << 23, Some(tap)).unwrap();
        for (p, d, m) in files {
            a.add_file(p, d.len() as u64, *m, *d).unwrap();
        }
        let tapped = a.finish().unwrap();
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() > 5, "{}", seen.len());
        let mut last = 0;
        for (path, len, on_disk) in &seen {
            assert_eq!(path, tapped.path());
            assert!(*len > last && *len <= *on_disk, "{len} {on_disk}");
            last = *len;
        }
        assert_eq!(last, tapped.size);
        // The same archive as an untapped build.
        let mut plain = CanonicalArchive::create(1 << 23).unwrap();
        for (p, d, m) in files {
            plain.add_file(p, d.len() as u64, *m, *d).unwrap();
        }
        assert_eq!(plain.finish().unwrap().sha256, tapped.sha256);
    }

    #[test]
    fn same_tree_same_bytes() {
        let files: &[(&str, &[u8], u32)] = &[
            ("hooks/run.sh", b"#!/bin/sh\n", 0o4775),
            ("plugin.yaml", b"name: x\n", 0o600),
            ("skills/a/SKILL.md", b"# A\n", 0o644),
        ];
        let a = build(files);
        let b = build(files);
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.manifest.as_deref(), Some(&b"name: x\n"[..]));
        let mut entries = Vec::new();
        let gz = flate2::read::GzDecoder::new(File::open(a.path()).unwrap());
        for e in tar::Archive::new(gz).entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            entries.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.mtime().unwrap(),
            ));
        }
        assert_eq!(
            entries,
            [
                ("hooks/".into(), 0o755, 0, 0),
                ("hooks/run.sh".into(), 0o755, 0, 0),
                ("plugin.yaml".into(), 0o644, 0, 0),
                ("skills/".into(), 0o755, 0, 0),
                ("skills/a/".into(), 0o755, 0, 0),
                ("skills/a/SKILL.md".into(), 0o644, 0, 0),
            ]
        );
    }

    /// The tree digest, computed independently of the archive writer.
    fn tree_digest(files: &[(&str, &[u8])]) -> String {
        let mut entries: Vec<Vec<u8>> = files
            .iter()
            .filter(|(p, _)| *p != TREE_MANIFEST)
            .map(|(p, d)| [p.as_bytes(), b"\0", d].concat())
            .collect();
        entries.sort();
        sha256_hex(&entries.concat())
    }

    #[test]
    fn the_plugin_yaml_is_read_from_the_archive_itself() {
        let build = |files: &[(&str, &[u8])]| {
            let mut b = CanonicalArchive::create(1 << 20).unwrap();
            for (p, d) in files {
                b.add_file(p, d.len() as u64, 0o644, *d).unwrap();
            }
            b.finish().unwrap()
        };
        let a = build(&[
            ("hooks/h.sh", b"x"),
            ("plugin.yaml", b"name: real\n"),
            ("rules/r.md", b"r"),
        ]);
        assert_eq!(
            manifest_in(a.path()).unwrap().as_deref(),
            Some(&b"name: real\n"[..])
        );
        let none = build(&[("hooks/h.sh", b"x"), ("rules/r.md", b"r")]);
        assert_eq!(manifest_in(none.path()).unwrap(), None);
    }

    #[test]
    fn manifest_json_pins_the_tree() {
        let files: Vec<(&str, &[u8])> = vec![
            ("a.b", b"x"),
            ("a/b", b"y"),
            ("plugin.yaml", b"name: t\n"),
            ("skills/s/SKILL.md", b"# S\n"),
        ];
        let digest = tree_digest(&files);
        let build = |manifest: &[u8]| {
            let mut all = files.clone();
            all.push(("manifest.json", manifest));
            all.sort();
            let mut a = CanonicalArchive::create(1 << 20).unwrap();
            for (p, d) in &all {
                a.add_file(p, d.len() as u64, 0o644, *d).unwrap();
            }
            a.finish()
        };
        let ok = format!(r#"{{"sha256": "{}", "name": "t"}}"#, digest.to_uppercase());
        build(ok.as_bytes()).unwrap();
        build(br#"{"name": "no digest"}"#).unwrap();
        let wrong = format!(r#"{{"sha256": "{}"}}"#, "0".repeat(64));
        assert_eq!(build(wrong.as_bytes()).unwrap_err().status(), 422);
        assert_eq!(build(b"{not json").unwrap_err().status(), 422);
        assert_eq!(build(br#"{"sha256": 5}"#).unwrap_err().status(), 422);
    }

    #[test]
    fn cap_is_inclusive_and_enforced() {
        let mut a = CanonicalArchive::create(4).unwrap();
        a.add_file("a", 4, 0o644, &b"abcd"[..]).unwrap();
        let e = a.add_file("b", 1, 0o644, &b"e"[..]).unwrap_err();
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn short_reads_and_bad_paths_fail() {
        let mut a = CanonicalArchive::create(100).unwrap();
        assert!(a.add_file("a", 5, 0o644, &b"abc"[..]).is_err());
        for p in ["/abs", "../x", "a//b", "a/./b", ""] {
            assert!(validate_relative_path(p).is_err(), "{p}");
        }
    }
}
