//! Intake checks for archives that come from outside (GitHub tarballs,
//! https archives), run before anything is staged.
//!
//! `ingest` reads a `.tar.gz` stream once, refuses anything hostile or
//! malformed with a 4xx naming the offending entry, and re-packs the tree as
//! a canonical archive (`archive::CanonicalArchive`). Nothing is ever
//! extracted under a name taken from the archive.
//!
//! One copy on disk when it can be: while files arrive in canonical order
//! (byte order of their paths, as our own archives and most packers write
//! them), each goes straight into the canonical writer. At the first one out
//! of order, the files written so far are taken back out of that partial
//! archive and everything from then on is streamed into numbered files in a
//! private temporary directory, to be sorted and packed at the end (two
//! copies, as an unordered archive needs). Either way the tree is kept as a
//! list in memory and checked before the archive is finished, and the two
//! paths give byte-identical archives. Every failure drops the temporary
//! directory and the half-written output, so a refusal leaves nothing
//! behind.
//!
//! Synchronous on purpose: callers run it on a blocking thread.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::rc::Rc;

use crate::domain::archive::{self, ArchiveFile, CanonicalArchive};
use crate::domain::error::{Error, Result};

/// Largest single metadata entry (PAX header, GNU long name or long link).
/// The tar crate would read these whole into memory, so they are read here
/// under a cap instead; real ones are a few hundred bytes.
const MAX_METADATA_ENTRY_BYTES: u64 = 64 * 1024;
/// All metadata entries together (headers included), so thousands of PAX
/// global headers, which are not counted as entries, cannot inflate forever.
const MAX_METADATA_TOTAL_BYTES: u64 = 8 * 1024 * 1024;
/// Zeros allowed after the last entry: the two end-of-archive blocks plus
/// padding to the writer's record size (10 KiB for GNU tar's default). A
/// longer run of zeros is not padding, and must not be inflated without end.
const MAX_END_PADDING_BYTES: u64 = 1024 * 1024;
const BLOCK: u64 = 512;
/// Longest entry name quoted back in an error message.
const MAX_SHOWN_NAME_CHARS: usize = 200;

/// Longest file name a Linux file system takes (NAME_MAX).
const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntakeLimits {
    /// Sum of the sizes of the regular files (and of any data other entries
    /// carry); inclusive, like `CanonicalArchive`.
    pub max_tree_bytes: u64,
    /// Entries in the archive: files, directories, links and refused types
    /// alike. PAX and GNU long-name metadata entries are not counted.
    pub max_entries: usize,
    /// Bytes in an entry's path as it appears in the archive.
    pub max_path_bytes: usize,
    /// Components in an entry's path as it appears in the archive.
    pub max_depth: usize,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        IntakeLimits {
            max_tree_bytes: 100 * 1024 * 1024,
            max_entries: 10_000,
            max_path_bytes: 1024,
            max_depth: 32,
        }
    }
}

#[derive(Debug)]
pub struct Intake {
    pub archive: ArchiveFile,
    /// Links found in the archive and left out, sorted by path.
    pub skipped: Vec<Skipped>,
    /// File bytes that went through the staging directory: 0 when the
    /// archive's files arrived in canonical order (one copy on disk).
    pub spooled: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Path inside the plugin (after stripping the top-level directory).
    pub path: String,
    /// `"symlink"` or `"hardlink"`.
    pub reason: String,
}

/// Reads a .tar.gz stream, validates every entry, and re-packs the tree as a canonical archive.
/// `strip_top_level`: remove the single top-level directory GitHub adds (error if entries do not share exactly one top-level dir).
pub fn ingest(gz: impl Read, strip_top_level: bool, limits: &IntakeLimits) -> Result<Intake> {
    ingest_in(gz, strip_top_level, limits, &std::env::temp_dir())
}

/// `ingest`, staging under `staging_parent` (tests point it at a private
/// directory to check that nothing is left behind).
fn ingest_in(
    gz: impl Read,
    strip_top_level: bool,
    limits: &IntakeLimits,
    staging_parent: &Path,
) -> Result<Intake> {
    let fault = Rc::new(RefCell::new(None));
    let source = Source {
        inner: gz,
        read: 0,
        cap: input_cap(limits),
        fault: fault.clone(),
    };
    let result = ingest_stream(source, strip_top_level, limits, staging_parent);
    // A failing or oversized source reaches us through the gzip and tar
    // layers as some I/O error; report what really happened instead of
    // calling the archive corrupt. (Checked on success too, in case a layer
    // swallowed the error: an archive read from a failed source is not one.)
    let fault = fault.borrow_mut().take();
    match fault {
        Some(e) => Err(e),
        None => result,
    }
}

fn ingest_stream<R: Read>(
    source: Source<R>,
    strip_top_level: bool,
    limits: &IntakeLimits,
    staging_parent: &Path,
) -> Result<Intake> {
    let staging = tempfile::Builder::new()
        .prefix("intake-")
        .tempdir_in(staging_parent)
        .map_err(Error::internal)?;
    // The bufread decoder (single member, like `read::GzDecoder`) only
    // consumes the bytes of its member from our BufReader, so whatever follows
    // the gzip trailer is still there to be checked. `read::GzDecoder` hides
    // its own buffer, and with it any bytes it read ahead.
    let mut gz = flate2::bufread::GzDecoder::new(BufReader::with_capacity(64 * 1024, source));
    let mut tree = {
        let mut tar = tar::Archive::new(&mut gz);
        let tree = read_entries(&mut tar, strip_top_level, limits, staging.path())?;
        check_tar_end(tar.into_inner())?;
        tree
    };
    // `check_tar_end` read the decoder to its end, which also verified the
    // gzip CRC and length; anything left in the source is a second member or
    // garbage.
    let rest = gz.get_mut().fill_buf().map_err(corrupt)?;
    if !rest.is_empty() {
        return Err(Error::unprocessable(
            "unexpected data after the end of the gzip stream (a .tar.gz must be exactly one gzip member)",
        ));
    }
    if strip_top_level && tree.top.is_none() {
        return Err(Error::unprocessable(
            "the archive is empty: expected a single top-level directory",
        ));
    }
    check_tree(&mut tree.items)?;
    let archive = match tree.direct.take() {
        Some(direct) => direct.finish()?,
        None => pack(&mut tree, strip_top_level, limits, staging.path())?,
    };
    let mut skipped: Vec<Skipped> = tree
        .items
        .iter()
        .filter_map(|item| match item.kind {
            Kind::Link(reason) => Some(Skipped {
                path: item.rel(strip_top_level).to_string(),
                reason: reason.to_string(),
            }),
            _ => None,
        })
        .collect();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Intake {
        archive,
        skipped,
        spooled: tree.spooled,
    })
}

/// Upper bound on the compressed input. Inflated output is bounded by the
/// other limits, but deflate can also spend input producing nothing (empty
/// stored blocks), so the input needs a bound of its own. Twice the largest
/// legitimate tar stream leaves room for any sane encoder.
fn input_cap(limits: &IntakeLimits) -> u64 {
    let per_entry = 2 * BLOCK; // header, plus padding of the entry's data
    let tar_stream = limits
        .max_tree_bytes
        .saturating_add((limits.max_entries as u64 + 1).saturating_mul(per_entry))
        .saturating_add(MAX_METADATA_TOTAL_BYTES)
        .saturating_add(MAX_END_PADDING_BYTES);
    tar_stream.saturating_mul(2).saturating_add(1024 * 1024)
}

/// The caller's reader, counted and capped, remembering its own failures so
/// they are not mistaken for a corrupt archive.
struct Source<R> {
    inner: R,
    read: u64,
    cap: u64,
    fault: Rc<RefCell<Option<Error>>>,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                if self.read > self.cap {
                    *self.fault.borrow_mut() = Some(
                        Error::too_large("the archive is larger than the plugin size limit allows")
                            .with_detail(format!("compressed input over {} bytes", self.cap)),
                    );
                    return Err(io::Error::other("archive input over its cap"));
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let msg = e.to_string();
                *self.fault.borrow_mut() = Some(
                    Error::unavailable("the archive could not be read from its source")
                        .with_detail(&msg),
                );
                Err(io::Error::new(e.kind(), msg))
            }
        }
    }
}

/// What an accepted entry becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Directories are only remembered for the conflict checks: the canonical
    /// archive emits the parents of files itself, so empty directories are
    /// dropped.
    Dir,
    /// A regular file, its data in staging file number `slot`.
    File { slot: usize, size: u64, mode: u32 },
    /// A regular file already in the canonical writer (files arriving in
    /// order); staged like `File` if a later one breaks the order.
    Packed { size: u64, mode: u32 },
    /// Never shipped; listed in `skipped` with this reason.
    Link(&'static str),
}

struct Item {
    /// Normalised path as in the archive (top-level directory included).
    path: String,
    kind: Kind,
}

impl Item {
    /// The path inside the plugin. With `strip`, every path is known to start
    /// with the one top-level component.
    fn rel(&self, strip: bool) -> &str {
        if !strip {
            return &self.path;
        }
        match self.path.split_once('/') {
            Some((_, rest)) => rest,
            None => "",
        }
    }
}

struct Tree {
    items: Vec<Item>,
    top: Option<String>,
    /// The canonical archive, when every file arrived in order.
    direct: Option<CanonicalArchive>,
    spooled: u64,
}

/// Metadata entries waiting for the entry they describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: bool,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && !self.long_link && self.pax.is_none()
    }
}

fn read_entries<R: Read>(
    tar: &mut tar::Archive<R>,
    strip: bool,
    limits: &IntakeLimits,
    staging: &Path,
) -> Result<Tree> {
    let mut r = EntryReader {
        strip,
        limits,
        staging,
        direct: Some(CanonicalArchive::create(limits.max_tree_bytes)?),
        last_packed: None,
        spooled: 0,
        items: Vec::new(),
        top: None,
        pending: Pending::default(),
        metadata_bytes: 0,
        count: 0,
        announced: 0,
        received: 0,
        slots: 0,
        buf: vec![0u8; 64 * 1024],
    };
    // Raw entries: the resolving iterator reads PAX headers and GNU long
    // names whole into memory with no cap, so a hostile archive could make
    // it allocate gigabytes. They are resolved here instead, under caps,
    // with the same meaning the tar crate gives them.
    for entry in tar.entries().map_err(corrupt)?.raw(true) {
        r.entry(&mut entry.map_err(corrupt)?)?;
    }
    if !r.pending.is_empty() {
        return Err(Error::unprocessable(
            "the archive ends with metadata (PAX header or GNU long name) but no entry for it",
        ));
    }
    Ok(Tree {
        items: r.items,
        top: r.top,
        direct: r.direct,
        spooled: r.spooled,
    })
}

/// The walk over an archive's raw entries and everything it counts.
struct EntryReader<'a> {
    strip: bool,
    limits: &'a IntakeLimits,
    staging: &'a Path,
    /// The canonical writer, while files arrive in order.
    direct: Option<CanonicalArchive>,
    /// Full path of the last file given to `direct`.
    last_packed: Option<String>,
    /// File bytes written to staging.
    spooled: u64,
    items: Vec<Item>,
    /// The one top-level directory, when stripping.
    top: Option<String>,
    /// Metadata entries waiting for the entry they describe.
    pending: Pending,
    metadata_bytes: u64,
    count: usize,
    /// Data announced by headers, checked before reading it; and file
    /// bytes actually read, checked as they arrive.
    announced: u64,
    received: u64,
    slots: usize,
    buf: Vec<u8>,
}

impl EntryReader<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size().map_err(corrupt)?;
        if matches!(
            kind,
            T::GNULongName | T::GNULongLink | T::XHeader | T::XGlobalHeader
        ) {
            return self.metadata(entry, kind, size);
        }
        let meta = std::mem::take(&mut self.pending);
        self.count += 1;
        if self.count > self.limits.max_entries {
            return Err(Error::unprocessable(format!(
                "the archive has more than {} entries",
                self.limits.max_entries
            )));
        }
        let raw = entry_path(entry.header(), &meta)?.into_owned();
        let path = normalise(&raw, self.limits)?;
        if let Some(pax) = &meta.pax {
            check_pax_for_entry(pax, size, &raw)?;
        }
        // Old (v7) archives mark directories as regular entries whose name
        // ends in '/'.
        let is_dir = kind == T::Directory || (kind == T::Regular && raw.ends_with(b"/"));
        let item_kind = item_kind(entry.header(), kind, is_dir, size, &raw)?;
        // Before reading a byte of data: a gzip bomb announces its size
        // here. Data on non-file entries counts too, because skipping it
        // still means inflating it.
        self.announced = self.announced.saturating_add(size);
        if self.announced > self.limits.max_tree_bytes {
            return Err(archive::too_large(self.limits.max_tree_bytes));
        }
        if path.is_empty() {
            // "./" or ".": the root itself. Nothing to keep.
            if is_dir {
                return Ok(());
            }
            return Err(refuse(&raw, "has an empty path"));
        }
        if self.strip {
            self.check_top(&path, &raw, is_dir)?;
        }
        let kind = match item_kind {
            Kind::File { size, mode, .. } => {
                let in_order = self.direct.is_some()
                    && self
                        .last_packed
                        .as_ref()
                        .is_none_or(|last| path.as_bytes() > last.as_bytes());
                if in_order {
                    self.pack_file(entry, &path, size, mode, &raw)?;
                    Kind::Packed { size, mode }
                } else {
                    self.unpack_direct()?;
                    let slot = self.stage_file(entry, size, &raw)?;
                    Kind::File { slot, size, mode }
                }
            }
            k => k,
        };
        self.items.push(Item { path, kind });
        Ok(())
    }

    /// A file that arrived in order: straight into the canonical writer,
    /// counted against the cap as it arrives, as `stage_file` counts.
    fn pack_file<R: Read>(
        &mut self,
        entry: &mut R,
        path: &str,
        size: u64,
        mode: u32,
        raw: &[u8],
    ) -> Result<()> {
        let rel = if self.strip {
            path.split_once('/').map_or("", |(_, rest)| rest)
        } else {
            path
        };
        let mut metered = Metered {
            inner: entry,
            copied: 0,
            size,
            short: false,
            received: &mut self.received,
            cap: self.limits.max_tree_bytes,
            failure: None,
        };
        let direct = self.direct.as_mut().expect("direct mode");
        let added = direct.add_file(rel, size, mode, &mut metered);
        // Our own words first (a failed read, the cap), then an entry that
        // ended before its size, then the writer's own refusal (a 1 MiB
        // plugin.yaml, ...), as the staged path would give them.
        if let Some(e) = metered.failure.take() {
            return Err(e);
        }
        if metered.short {
            return Err(refuse(raw, "is truncated"));
        }
        added?;
        if metered.copied != size {
            return Err(refuse(raw, "is truncated"));
        }
        self.last_packed = Some(path.to_string());
        Ok(())
    }

    /// The order broke: take the files packed so far back out of the
    /// partial archive into staging slots (in the order they were packed,
    /// which is the order of the `Packed` items), and stage from now on.
    fn unpack_direct(&mut self) -> Result<()> {
        let Some(direct) = self.direct.take() else {
            return Ok(());
        };
        let partial = direct.into_partial()?;
        let file = File::open(partial.path()).map_err(Error::internal)?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::with_capacity(
            128 * 1024,
            file,
        )));
        let mut packed = self
            .items
            .iter()
            .enumerate()
            .filter(|(_, i)| matches!(i.kind, Kind::Packed { .. }))
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
            .into_iter();
        // Our own bytes, already counted: the cap is not charged twice.
        let received = std::mem::take(&mut self.received);
        for entry in tar.entries().map_err(Error::internal)? {
            let mut entry = entry.map_err(Error::internal)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let n = packed
                .next()
                .ok_or_else(|| Error::internal("partial archive has more files than packed"))?;
            let Kind::Packed { size, mode } = self.items[n].kind else {
                unreachable!("filtered on Packed");
            };
            let raw = self.items[n].path.clone().into_bytes();
            let slot = self.stage_file(&mut entry, size, &raw)?;
            self.items[n].kind = Kind::File { slot, size, mode };
        }
        self.received = received;
        if packed.next().is_some() {
            return Err(Error::internal(
                "partial archive has fewer files than packed",
            ));
        }
        Ok(())
    }

    /// A PAX header or GNU long name/link: read whole (under caps) and kept
    /// for the entry it describes.
    fn metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: tar::EntryType,
        size: u64,
    ) -> Result<()> {
        use tar::EntryType as T;
        self.metadata_bytes = self
            .metadata_bytes
            .saturating_add(2 * BLOCK)
            .saturating_add(size);
        if size > MAX_METADATA_ENTRY_BYTES || self.metadata_bytes > MAX_METADATA_TOTAL_BYTES {
            return Err(Error::unprocessable(
                "the archive's metadata (PAX headers or GNU long names) is too large",
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.take(size).read_to_end(&mut data).map_err(corrupt)?;
        if data.len() as u64 != size {
            return Err(truncated());
        }
        let twice = || {
            Error::unprocessable(
                "the archive has two metadata entries of one kind for a single entry",
            )
        };
        let pending = &mut self.pending;
        match kind {
            T::GNULongName => {
                if pending.long_name.replace(data).is_some() {
                    return Err(twice());
                }
            }
            // Link targets are never needed: links are not shipped.
            T::GNULongLink => {
                if std::mem::replace(&mut pending.long_link, true) {
                    return Err(twice());
                }
            }
            T::XHeader => {
                check_pax_syntax(&data)?;
                if pending.pax.replace(data).is_some() {
                    return Err(twice());
                }
            }
            // Global headers (GitHub's `comment=<commit>`) describe the
            // archive, not an entry; like the tar crate, ignore them.
            _ => check_pax_syntax(&data)?,
        }
        Ok(())
    }

    /// Stripping needs exactly one top-level directory and nothing beside it.
    fn check_top(&mut self, path: &str, raw: &[u8], is_dir: bool) -> Result<()> {
        let first = path.split('/').next().unwrap_or_default();
        match &self.top {
            None => self.top = Some(first.to_string()),
            Some(t) if t != first => {
                return Err(Error::unprocessable(format!(
                "the archive must contain exactly one top-level directory, but has {:?} and {:?}",
                shown(t.as_bytes()),
                shown(first.as_bytes())
            )))
            }
            Some(_) => {}
        }
        if path == first && !is_dir {
            return Err(refuse(
                raw,
                "is at the top level, where the archive must contain exactly one directory",
            ));
        }
        Ok(())
    }

    /// Copies a file's data into the next staging slot, counting it against
    /// the cap as it arrives. Staging names are our own numbers, never the
    /// entry's name: nothing in the archive can point a write outside this
    /// directory, and `create_new` makes any reuse an error.
    fn stage_file<R: Read>(&mut self, entry: &mut R, size: u64, raw: &[u8]) -> Result<usize> {
        let slot = self.slots;
        self.slots += 1;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.staging.join(slot.to_string()))
            .map_err(Error::internal)?;
        let mut copied = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(e)),
            };
            copied += n as u64;
            self.received += n as u64;
            if self.received > self.limits.max_tree_bytes {
                return Err(archive::too_large(self.limits.max_tree_bytes));
            }
            out.write_all(&self.buf[..n]).map_err(Error::internal)?;
        }
        if copied != size {
            return Err(refuse(raw, "is truncated"));
        }
        self.spooled += copied;
        Ok(slot)
    }
}

/// An entry's data on its way into the canonical writer: counted against
/// the tree cap, and its failures kept in our own words (the writer only
/// sees an I/O error).
struct Metered<'a, R> {
    inner: &'a mut R,
    copied: u64,
    /// The size the header announced; `short` is set when the data ends
    /// before it.
    size: u64,
    short: bool,
    received: &'a mut u64,
    cap: u64,
    failure: Option<Error>,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                let msg = e.to_string();
                self.failure = Some(corrupt(e));
                return Err(io::Error::other(msg));
            }
        };
        if n == 0 && !buf.is_empty() && self.copied < self.size {
            self.short = true;
        }
        self.copied += n as u64;
        *self.received += n as u64;
        if *self.received > self.cap {
            self.failure = Some(archive::too_large(self.cap));
            return Err(io::Error::other("over the tree cap"));
        }
        Ok(n)
    }
}

/// What an entry becomes: a directory, a file (its slot filled in when
/// staged), or a link (dropped, reported); anything else is refused.
fn item_kind(
    header: &tar::Header,
    kind: tar::EntryType,
    is_dir: bool,
    size: u64,
    raw: &[u8],
) -> Result<Kind> {
    use tar::EntryType as T;
    Ok(match kind {
        _ if is_dir => Kind::Dir,
        T::Regular => Kind::File {
            slot: 0,
            size,
            mode: header.mode().map_err(corrupt)?,
        },
        T::Symlink => Kind::Link("symlink"),
        T::Link => Kind::Link("hardlink"),
        // Everything else, known or not: devices, FIFOs, GNU sparse and
        // contiguous files (whose data the raw reader would not lay out
        // correctly), and types we have never heard of.
        other => {
            return Err(refuse(
                raw,
                format_args!("is {}, which a plugin cannot contain", describe(other)),
            ))
        }
    })
}

/// The entry's path with the meaning the tar crate's `entries()` gives it:
/// a GNU long name, else a PAX `path`, else the header's own name (ustar
/// prefix included). Both a long name and a PAX path is ambiguous: refused.
fn entry_path<'a>(header: &'a tar::Header, meta: &'a Pending) -> Result<Cow<'a, [u8]>> {
    let pax_path = match &meta.pax {
        Some(pax) => tar::PaxExtensions::new(pax)
            .filter_map(|r| r.ok())
            .find(|e| e.key_bytes() == b"path")
            .map(|e| e.value_bytes()),
        None => None,
    };
    match (&meta.long_name, pax_path) {
        (Some(_), Some(_)) => Err(Error::unprocessable(
            "an archive entry has both a GNU long name and a PAX path",
        )),
        (Some(long), None) => {
            // GNU writes the name NUL-terminated.
            let end = long.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            Ok(Cow::Borrowed(&long[..end]))
        }
        (None, Some(p)) => Ok(Cow::Borrowed(p)),
        (None, None) => Ok(header.path_bytes()),
    }
}

fn check_pax_syntax(data: &[u8]) -> Result<()> {
    for record in tar::PaxExtensions::new(data) {
        record.map_err(corrupt)?;
    }
    Ok(())
}

/// PAX records we would otherwise silently misread: `size` overrides the
/// header (the raw reader does not apply it, and a disagreement is exactly
/// how archives are made to look different to different tools; honest ones
/// only use it past 8 GiB, far over any cap), and `GNU.sparse.*` describes a
/// sparse file.
fn check_pax_for_entry(pax: &[u8], header_size: u64, raw: &[u8]) -> Result<()> {
    for record in tar::PaxExtensions::new(pax) {
        let record = record.map_err(corrupt)?;
        let key = record.key_bytes();
        if key == b"size" {
            let same = record
                .value()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v == header_size);
            if !same {
                return Err(refuse(raw, "has a PAX size that disagrees with its header"));
            }
        } else if key.starts_with(b"GNU.sparse.") {
            return Err(refuse(
                raw,
                "is a sparse file, which a plugin cannot contain",
            ));
        }
    }
    Ok(())
}

fn describe(kind: tar::EntryType) -> Cow<'static, str> {
    use tar::EntryType as T;
    match kind {
        T::Char => "a character device".into(),
        T::Block => "a block device".into(),
        T::Fifo => "a FIFO".into(),
        T::Continuous => "a contiguous file".into(),
        T::GNUSparse => "a sparse file".into(),
        other => format!("an entry of unknown type {:?}", other.as_byte() as char).into(),
    }
}

/// Validates an entry's name and returns it normalised: leading `./` and one
/// trailing `/` removed. The empty string is the root (`./`).
fn normalise(raw: &[u8], limits: &IntakeLimits) -> Result<String> {
    let Ok(s) = std::str::from_utf8(raw) else {
        return Err(refuse(raw, "has a name that is not valid UTF-8"));
    };
    if s.chars().any(char::is_control) {
        return Err(refuse(raw, "has a control character in its name"));
    }
    // A Windows separator: means something else to every other tool.
    if s.contains('\\') {
        return Err(refuse(raw, "has a backslash in its name"));
    }
    if s.starts_with('/') {
        return Err(refuse(raw, "has an absolute path"));
    }
    let mut p = s;
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    if p == "." {
        p = "";
    }
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.len() > limits.max_path_bytes {
        return Err(refuse(
            raw,
            format_args!("has a path longer than {} bytes", limits.max_path_bytes),
        ));
    }
    if p.is_empty() {
        return Ok(String::new());
    }
    if p.split('/').any(|c| c == "..") {
        return Err(refuse(raw, "has a `..` component (path traversal)"));
    }
    if p.split('/').any(|c| c.is_empty() || c == ".") {
        return Err(refuse(raw, "has an empty or `.` component in its path"));
    }
    if p.split('/').count() > limits.max_depth {
        return Err(refuse(
            raw,
            format_args!("is nested deeper than {} levels", limits.max_depth),
        ));
    }
    // No file system on a host holds a longer name (NAME_MAX): refuse it
    // here rather than fail the extraction after staging.
    if p.split('/').any(|c| c.len() > MAX_NAME_BYTES) {
        return Err(refuse(
            raw,
            format_args!("has a name component longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(p.to_string())
}

/// After the last entry the tar stream may hold only zeros: at least the
/// second end-of-archive block (the first one ended the entries; a stream
/// that just stops at an entry boundary has lost its end and is refused as
/// truncated), plus record padding.
fn check_tar_end(mut r: impl Read) -> Result<()> {
    let mut buf = [0u8; 8192];
    let mut zeros = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        zeros += n as u64;
        if buf[..n].iter().any(|b| *b != 0) || zeros > MAX_END_PADDING_BYTES {
            return Err(Error::unprocessable(
                "unexpected data after the end of the tar archive",
            ));
        }
    }
    if zeros < BLOCK {
        return Err(Error::unprocessable(
            "the tar archive is truncated: it has no end-of-archive marker",
        ));
    }
    Ok(())
}

/// Refuses duplicate paths, and any file or link that is also the parent of
/// another entry (`a` and `a/b`: on disk one would replace or redirect the
/// other). Sorting with '/' as the lowest byte puts an entry's descendants
/// right after it, so one pass over neighbours finds both cases. Names hold
/// no NUL (control characters are refused), so the mapping is unambiguous.
fn check_tree(items: &mut [Item]) -> Result<()> {
    fn key(b: u8) -> u8 {
        if b == b'/' {
            0
        } else {
            b
        }
    }
    items.sort_unstable_by(|a, b| a.path.bytes().map(key).cmp(b.path.bytes().map(key)));
    for pair in items.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.path == b.path {
            return Err(refuse(b.path.as_bytes(), "appears more than once"));
        }
        let parent_of_b = b.path.len() > a.path.len()
            && b.path.starts_with(&a.path)
            && b.path.as_bytes()[a.path.len()] == b'/';
        if a.kind != Kind::Dir && parent_of_b {
            return Err(refuse(
                a.path.as_bytes(),
                format_args!(
                    "is not a directory but is also the parent of {:?}",
                    shown(b.path.as_bytes())
                ),
            ));
        }
    }
    Ok(())
}

/// Feeds the staged files to the canonical writer in byte order of their
/// path inside the plugin. Stripping one common top-level component keeps
/// the order, so sorting the full paths is enough.
fn pack(
    tree: &mut Tree,
    strip: bool,
    limits: &IntakeLimits,
    staging: &Path,
) -> Result<ArchiveFile> {
    tree.items.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let mut out = CanonicalArchive::create(limits.max_tree_bytes)?;
    for item in &tree.items {
        if let Kind::File { slot, size, mode } = item.kind {
            let file = File::open(staging.join(slot.to_string())).map_err(Error::internal)?;
            out.add_file(
                item.rel(strip),
                size,
                mode,
                BufReader::with_capacity(128 * 1024, file),
            )?;
        }
    }
    out.finish()
}

/// An entry name for messages: lossy UTF-8, cut short.
fn shown(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    match s.char_indices().nth(MAX_SHOWN_NAME_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.into_owned(),
    }
}

/// A 422 naming the entry. Debug-quoting keeps control characters out of
/// the message; the name also goes in the `entry` field.
fn refuse(raw: &[u8], why: impl fmt::Display) -> Error {
    let name = shown(raw);
    Error::unprocessable(format!("archive entry {name:?} {why}"))
        .with_field("entry", serde_json::Value::String(name))
}

/// The reader's own words help ("checksum mismatch", "invalid gzip
/// header"), but some quote the entry's raw name: escaped, so no control
/// character reaches the message.
fn corrupt(e: io::Error) -> Error {
    Error::unprocessable(format!(
        "the archive is corrupt or truncated: {}",
        e.to_string().escape_debug()
    ))
    .with_detail(&e)
}

fn truncated() -> Error {
    Error::unprocessable("the archive is corrupt or truncated")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    use flate2::write::GzEncoder;
    use flate2::Compression;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    fn limits() -> IntakeLimits {
        IntakeLimits {
            max_tree_bytes: MIB,
            ..Default::default()
        }
    }

    /// A header written field by field, so names the tar crate refuses to
    /// write (`..`, absolute, non-UTF-8, control characters) can be tested.
    fn raw_header(name: &[u8], kind: u8, mode: u32, size: u64, link: &[u8]) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    fn pax_data(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in records {
            // The length counts its own digits.
            let rest = 3 + key.len() + value.len();
            let mut len = rest + 1;
            while rest + len.to_string().len() != len {
                len = rest + len.to_string().len();
            }
            out.extend_from_slice(format!("{len} {key}=").as_bytes());
            out.extend_from_slice(value);
            out.push(b'\n');
        }
        out
    }

    /// A tar stream built from raw blocks.
    #[derive(Default)]
    struct Tar(Vec<u8>);

    impl Tar {
        fn header(mut self, h: &tar::Header, data: &[u8]) -> Self {
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.resize(self.0.len() + pad, 0);
            self
        }
        fn entry(self, name: &[u8], kind: u8, mode: u32, data: &[u8]) -> Self {
            let h = raw_header(name, kind, mode, data.len() as u64, b"");
            self.header(&h, data)
        }
        fn file(self, name: &str, data: &[u8]) -> Self {
            self.entry(name.as_bytes(), b'0', 0o644, data)
        }
        fn mode_file(self, name: &str, mode: u32, data: &[u8]) -> Self {
            self.entry(name.as_bytes(), b'0', mode, data)
        }
        fn dir(self, name: &str) -> Self {
            self.entry(name.as_bytes(), b'5', 0o755, b"")
        }
        fn link(self, name: &str, kind: u8, target: &str) -> Self {
            let h = raw_header(name.as_bytes(), kind, 0o777, 0, target.as_bytes());
            self.header(&h, b"")
        }
        /// A GNU long-name entry for the next entry, as GNU tar writes it.
        fn long_name(self, name: &str) -> Self {
            let mut data = name.as_bytes().to_vec();
            data.push(0);
            self.entry(b"././@LongLink", b'L', 0o644, &data)
        }
        /// A PAX header (`x` for the next entry, `g` global).
        fn pax(self, kind: u8, records: &[(&str, &[u8])]) -> Self {
            self.entry(b"PaxHeaders/x", kind, 0o644, &pax_data(records))
        }
        /// The two end-of-archive blocks.
        fn end(mut self) -> Vec<u8> {
            self.0.extend_from_slice(&[0; 1024]);
            self.0
        }
    }

    fn gz(tar: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(tar).unwrap();
        e.finish().unwrap()
    }

    /// A tar written by the tar crate itself (GNU headers, so long names get
    /// GNU long-name entries), gzipped.
    fn built(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, *data).unwrap();
        }
        gz(&b.into_inner().unwrap())
    }

    /// Ingest with a private staging root, which must be empty afterwards
    /// whatever the outcome.
    fn run_reader(r: impl Read, strip: bool, limits: &IntakeLimits) -> Result<Intake> {
        let root = tempfile::tempdir().unwrap();
        let out = ingest_in(r, strip, limits, root.path());
        let left = std::fs::read_dir(root.path()).unwrap().count();
        assert_eq!(left, 0, "staging directory left behind");
        out
    }

    fn accepted(gz: &[u8], strip: bool, limits: &IntakeLimits) -> Intake {
        run_reader(gz, strip, limits)
            .unwrap_or_else(|e| panic!("refused: {} / {:?}", e.message, e.detail))
    }

    /// A refusal with this status whose message mentions `needle`. The Err
    /// itself is the proof that no archive was produced (a finished one
    /// only exists inside `Intake`; the half-written one is deleted on
    /// drop), and `run_reader` checks the staging directory is gone.
    fn refused(gz: &[u8], strip: bool, limits: &IntakeLimits, status: u16, needle: &str) -> Error {
        refused_reader(gz, strip, limits, status, needle)
    }

    fn refused_reader(
        r: impl Read,
        strip: bool,
        limits: &IntakeLimits,
        status: u16,
        needle: &str,
    ) -> Error {
        let e = match run_reader(r, strip, limits) {
            Ok(i) => panic!("accepted: {:?}", contents(&i.archive)),
            Err(e) => e,
        };
        assert_eq!(e.status(), status, "{} / {:?}", e.message, e.detail);
        assert!(
            e.message.contains(needle),
            "message {:?} does not mention {needle:?}",
            e.message
        );
        e
    }

    fn entry_field(e: &Error) -> &str {
        e.fields["entry"].as_str().unwrap()
    }

    /// (path, mode, data) of every entry of an archive, in order.
    fn contents(a: &ArchiveFile) -> Vec<(String, u32, Vec<u8>)> {
        let gz = flate2::read::GzDecoder::new(File::open(a.path()).unwrap());
        let mut out = Vec::new();
        for e in tar::Archive::new(gz).entries().unwrap() {
            let mut e = e.unwrap();
            let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mode = e.header().mode().unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((path, mode, data));
        }
        out
    }

    fn paths(a: &ArchiveFile) -> Vec<String> {
        contents(a).into_iter().map(|(p, _, _)| p).collect()
    }

    fn skipped(path: &str, reason: &str) -> Skipped {
        Skipped {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Serves a byte slice a few KiB at a time and counts what was taken,
    /// to show how little of a bomb was read.
    struct Trickle<'a> {
        data: &'a [u8],
        taken: Rc<Cell<usize>>,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(4096).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.taken.set(self.taken.get() + n);
            Ok(n)
        }
    }

    /// A 1000:1 gzip bomb: a tar whose single file is `zeros` zero bytes,
    /// optionally with the zeros after the end of the archive instead.
    fn bomb(zeros: u64, after_end: bool) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        if after_end {
            e.write_all(&Tar::default().file("plugin.yaml", b"name: x\n").end())
                .unwrap();
        } else {
            e.write_all(raw_header(b"bomb", b'0', 0o644, zeros, b"").as_bytes())
                .unwrap();
        }
        let chunk = vec![0u8; MIB as usize];
        for _ in 0..zeros / MIB {
            e.write_all(&chunk).unwrap();
        }
        if !after_end {
            e.write_all(&[0; 1024]).unwrap();
        }
        e.finish().unwrap()
    }

    // ---- paths ------------------------------------------------------------

    /// Files in canonical order go straight into the archive (nothing
    /// spooled); the same tree in any other order is spooled, and both give
    /// the same bytes. With a top-level directory to strip as well.
    #[test]
    fn in_order_archives_take_one_copy_and_match_shuffled_ones() {
        let files: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("d{}/f{i:02}", i % 3), vec![i as u8; 1000 + i * 37]))
            .collect();
        let mut sorted = files.clone();
        sorted.sort();
        let mut shuffled = sorted.clone();
        shuffled.swap(3, 30);
        shuffled.reverse();
        let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
        for strip in [false, true] {
            let tree = |order: &[(String, Vec<u8>)]| {
                let named: Vec<(String, &[u8])> = order
                    .iter()
                    .map(|(p, d)| {
                        let p = if strip { format!("top/{p}") } else { p.clone() };
                        (p, d.as_slice())
                    })
                    .collect();
                let refs: Vec<(&str, &[u8])> =
                    named.iter().map(|(p, d)| (p.as_str(), *d)).collect();
                built(&refs)
            };
            let direct = accepted(&tree(&sorted), strip, &limits());
            assert_eq!(direct.spooled, 0, "in order: one copy");
            let spooled = accepted(&tree(&shuffled), strip, &limits());
            assert_eq!(spooled.spooled, total, "out of order: every byte spooled");
            assert_eq!(direct.archive.sha256, spooled.archive.sha256);
            assert_eq!(contents(&direct.archive), contents(&spooled.archive));
            // Broken late: the files packed so far come back out intact.
            let mut late = sorted.clone();
            let last = late.len() - 1;
            late.swap(last - 1, last);
            let fallback = accepted(&tree(&late), strip, &limits());
            assert_eq!(fallback.archive.sha256, direct.archive.sha256);
            assert_eq!(fallback.spooled, total);
        }
    }

    /// A refusal of the canonical writer reads the same on the one-copy
    /// path as after spooling.
    #[test]
    fn an_oversized_plugin_yaml_is_named_on_both_paths() {
        let big = vec![b'a'; (1 << 20) + 1];
        let lim = IntakeLimits::default();
        let e = refused(&built(&[("plugin.yaml", &big)]), false, &lim, 422, "");
        assert!(e.message.contains("larger than 1 MiB"), "{}", e.message);
        let e = refused(
            &built(&[("z", b"1"), ("plugin.yaml", &big)]),
            false,
            &lim,
            422,
            "",
        );
        assert!(e.message.contains("larger than 1 MiB"), "{}", e.message);
    }

    /// The cap holds in both paths, counted once.
    #[test]
    fn the_cap_counts_packed_files_once() {
        let half = vec![7u8; 600 * KIB as usize];
        let lim = limits(); // 1 MiB
                            // In order, then one out of order: 600 KiB + 300 KiB spooled back
                            // and forth stays under 1 MiB.
        let small = vec![1u8; 300 * KIB as usize];
        let ok = accepted(&built(&[("b", &half), ("a", &small)]), false, &lim);
        assert_eq!(ok.spooled, 900 * KIB);
        refused(&built(&[("a", &half), ("b", &half)]), false, &lim, 413, "");
        refused(&built(&[("b", &half), ("a", &half)]), false, &lim, 413, "");
    }

    #[test]
    fn dot_dot_is_refused() {
        let tar = Tar::default().file("ok", b"x").file("../x", b"evil").end();
        let e = refused(&gz(&tar), false, &limits(), 422, "\"../x\"");
        assert!(e.message.contains("traversal"), "{}", e.message);
        assert_eq!(entry_field(&e), "../x");
    }

    #[test]
    fn nested_dot_dot_is_refused() {
        let tar = Tar::default().file("a/../../x", b"evil").end();
        refused(&gz(&tar), false, &limits(), 422, "\"a/../../x\" has a `..`");
        // Hidden behind a "./" prefix too.
        let tar = Tar::default().file("./../x", b"evil").end();
        refused(&gz(&tar), false, &limits(), 422, "traversal");
    }

    #[test]
    fn absolute_path_is_refused() {
        let tar = Tar::default().file("/etc/x", b"evil").end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"/etc/x\" has an absolute path",
        );
        let tar = Tar::default().dir("/").end();
        refused(&gz(&tar), false, &limits(), 422, "absolute");
    }

    #[test]
    fn odd_components_and_backslashes_are_refused() {
        for name in ["a//b", "a/./b", "a\\..\\b"] {
            let tar = Tar::default().file(name, b"x").end();
            let e = run_reader(&gz(&tar)[..], false, &limits()).unwrap_err();
            assert_eq!(e.status(), 422, "{name}");
            assert_eq!(entry_field(&e), name);
        }
    }

    #[test]
    fn non_utf8_name_is_refused() {
        let tar = Tar::default()
            .entry(b"bad\xffname", b'0', 0o644, b"x")
            .end();
        let e = refused(&gz(&tar), false, &limits(), 422, "not valid UTF-8");
        assert_eq!(entry_field(&e), "bad\u{fffd}name");
    }

    #[test]
    fn control_characters_are_refused() {
        for name in ["a\nb", "esc\x1b[31m", "del\x7f", "nul\u{85}c1"] {
            let tar = Tar::default().file(name, b"x").end();
            let e = refused(&gz(&tar), false, &limits(), 422, "control character");
            // Quoted in the message, never raw.
            assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
        }
    }

    #[test]
    fn long_name_within_the_limit_is_accepted() {
        // A 250-byte file name needs a GNU long-name entry (ustar stops at
        // 100); that metadata entry is neither counted nor refused.
        let name = format!("skills/{}.md", "n".repeat(250));
        let one = IntakeLimits {
            max_entries: 1,
            ..limits()
        };
        let i = accepted(&built(&[(&name, b"long")]), false, &one);
        assert_eq!(paths(&i.archive), ["skills/".to_string(), name]);
    }

    #[test]
    fn a_300_byte_name_is_refused() {
        let name = format!("skills/{}.md", "n".repeat(300));
        refused(&built(&[(&name, b"x")]), false, &limits(), 422, "255 bytes");
    }

    #[test]
    fn path_over_1024_bytes_is_refused() {
        let segment = "s".repeat(200);
        let at_limit = format!(
            "{segment}/{segment}/{segment}/{segment}/{}",
            "f".repeat(220)
        );
        assert_eq!(at_limit.len(), 1024);
        let i = accepted(&built(&[(&at_limit, b"x")]), false, &limits());
        assert!(paths(&i.archive).contains(&at_limit));

        let over = format!("{at_limit}g");
        let e = refused(
            &built(&[(&over, b"x")]),
            false,
            &limits(),
            422,
            "longer than 1024 bytes",
        );
        assert!(e.message.len() < 400, "the name is cut short in messages");
    }

    #[test]
    fn depth_over_32_is_refused() {
        let deep = |n: usize| format!("{}f", "d/".repeat(n - 1));
        let tar = Tar::default().file(&deep(32), b"x").end();
        accepted(&gz(&tar), false, &limits());
        let tar = Tar::default().file(&deep(33), b"x").end();
        refused(&gz(&tar), false, &limits(), 422, "deeper than 32 levels");
    }

    #[test]
    fn duplicate_entries_are_refused() {
        let tar = Tar::default()
            .file("a", b"1")
            .file("b", b"")
            .file("a", b"2")
            .end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"a\" appears more than once",
        );
        // The same path after normalising "./" and a trailing "/".
        let tar = Tar::default().file("./a", b"1").file("a", b"2").end();
        refused(&gz(&tar), false, &limits(), 422, "more than once");
        let tar = Tar::default().dir("d/").dir("./d").file("d/x", b"").end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"d\" appears more than once",
        );
        let tar = Tar::default().file("d", b"").dir("d/").end();
        refused(&gz(&tar), false, &limits(), 422, "more than once");
    }

    #[test]
    fn file_and_directory_conflicts_are_refused() {
        let tar = Tar::default().file("a", b"1").file("a/b", b"2").end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"a\" is not a directory but is also the parent of \"a/b\"",
        );
        // Either order, and across unrelated names sorting in between.
        let tar = Tar::default()
            .file("a/b/c", b"2")
            .file("a.txt", b"")
            .file("a/b", b"1")
            .file("a-b", b"")
            .end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"a/b\" is not a directory",
        );
        // The classic escape: a symlink, then a file "through" it.
        let tar = Tar::default()
            .link("etc", b'2', "/etc")
            .file("etc/cron.d/x", b"evil")
            .end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"etc\" is not a directory",
        );
    }

    #[test]
    fn neighbouring_names_are_not_conflicts() {
        // "a.txt" and "a-b" sort between "a" and "a/..." in byte order.
        let tar = Tar::default()
            .file("a-b", b"1")
            .file("a/b", b"2")
            .file("a.txt", b"3")
            .file("a0", b"4")
            .dir("a")
            .end();
        let i = accepted(&gz(&tar), false, &limits());
        assert_eq!(paths(&i.archive), ["a-b", "a.txt", "a/", "a/b", "a0"]);
    }

    // ---- entry types and modes ---------------------------------------------

    #[test]
    fn symlink_out_of_the_tree_is_skipped() {
        let tar = Tar::default()
            .file("plugin.yaml", b"name: x\n")
            .link("escape", b'2', "../../../etc/passwd")
            .link("abs", b'2', "/etc/shadow")
            .end();
        let i = accepted(&gz(&tar), false, &limits());
        assert_eq!(
            i.skipped,
            [skipped("abs", "symlink"), skipped("escape", "symlink")]
        );
        assert_eq!(
            contents(&i.archive),
            [("plugin.yaml".into(), 0o644, b"name: x\n".to_vec())]
        );
        assert_eq!(i.archive.manifest.as_deref(), Some(&b"name: x\n"[..]));
    }

    #[test]
    fn hardlink_is_skipped() {
        let tar = Tar::default()
            .file("a", b"data")
            .link("b", b'1', "a")
            .link("c", b'1', "/etc/passwd")
            .end();
        let i = accepted(&gz(&tar), false, &limits());
        assert_eq!(
            i.skipped,
            [skipped("b", "hardlink"), skipped("c", "hardlink")]
        );
        assert_eq!(paths(&i.archive), ["a"]);
    }

    #[test]
    fn char_device_is_refused() {
        let tar = Tar::default()
            .file("a", b"")
            .entry(b"dev/null", b'3', 0o666, b"")
            .end();
        let e = refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "\"dev/null\" is a character device",
        );
        assert_eq!(entry_field(&e), "dev/null");
    }

    #[test]
    fn fifo_is_refused() {
        let tar = Tar::default().entry(b"pipe", b'6', 0o644, b"").end();
        refused(&gz(&tar), false, &limits(), 422, "\"pipe\" is a FIFO");
    }

    #[test]
    fn other_entry_types_are_refused() {
        for (kind, what) in [
            (b'4', "block device"),
            (b'7', "contiguous file"),
            (b'S', "sparse file"),
            (b'V', "unknown type 'V'"),
            (b'Z', "unknown type 'Z'"),
        ] {
            let tar = Tar::default().entry(b"x", kind, 0o644, b"").end();
            refused(&gz(&tar), false, &limits(), 422, what);
        }
        // PAX-described sparse files too.
        let tar = Tar::default()
            .pax(
                b'x',
                &[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")],
            )
            .file("sparse", b"")
            .end();
        refused(&gz(&tar), false, &limits(), 422, "sparse file");
    }

    #[test]
    fn setuid_setgid_sticky_are_stripped_and_exec_kept() {
        let tar = Tar::default()
            .mode_file("suid", 0o4755, b"1")
            .mode_file("sgid", 0o2710, b"2")
            .mode_file("sticky", 0o1644, b"3")
            .mode_file("all", 0o7666, b"4")
            .end();
        let i = accepted(&gz(&tar), false, &limits());
        let modes: Vec<(String, u32)> = contents(&i.archive)
            .into_iter()
            .map(|(p, m, _)| (p, m))
            .collect();
        assert_eq!(
            modes,
            [
                ("all".into(), 0o644),
                ("sgid".into(), 0o755),
                ("sticky".into(), 0o644),
                ("suid".into(), 0o755),
            ]
        );
    }

    // ---- sizes and counts --------------------------------------------------

    #[test]
    fn gzip_bomb_is_refused_without_inflating_it() {
        let bomb = bomb(200 * MIB, false);
        assert!(
            bomb.len() < 400 * KIB as usize,
            "1000:1 or so: {}",
            bomb.len()
        );
        let cap = IntakeLimits {
            max_tree_bytes: 100 * KIB,
            ..Default::default()
        };
        let taken = Rc::new(Cell::new(0));
        let started = Instant::now();
        let e = refused_reader(
            Trickle {
                data: &bomb,
                taken: taken.clone(),
            },
            false,
            &cap,
            413,
            "larger than",
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        // Refused from the header: a few KiB of a few hundred read.
        assert!(
            taken.get() < bomb.len() / 10,
            "read {} of {}",
            taken.get(),
            bomb.len()
        );
        assert!(e.detail.is_none());
    }

    #[test]
    fn zeros_after_the_end_are_not_inflated() {
        let bomb = bomb(200 * MIB, true);
        let taken = Rc::new(Cell::new(0));
        let started = Instant::now();
        refused_reader(
            Trickle {
                data: &bomb,
                taken: taken.clone(),
            },
            false,
            &limits(),
            422,
            "after the end of the tar archive",
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(
            taken.get() < bomb.len() / 10,
            "read {} of {}",
            taken.get(),
            bomb.len()
        );
    }

    #[test]
    fn data_on_links_and_metadata_counts_against_the_caps() {
        // A symlink carrying data: skipping it would still inflate it.
        let mut tar = Tar::default();
        let h = raw_header(b"l", b'2', 0o777, 10 * MIB, b"x");
        tar.0.extend_from_slice(h.as_bytes());
        tar.0.resize(tar.0.len() + 10 * MIB as usize, 0);
        refused(&gz(&tar.end()), false, &limits(), 413, "larger than");
        // An oversized PAX header is refused before it is read into memory.
        let mut tar = Tar::default();
        let h = raw_header(b"PaxHeaders/x", b'x', 0o644, 10 * MIB, b"");
        tar.0.extend_from_slice(h.as_bytes());
        tar.0.resize(tar.0.len() + 10 * MIB as usize, b'a');
        refused(&gz(&tar.end()), false, &limits(), 422, "metadata");
    }

    #[test]
    fn size_cap_is_inclusive() {
        let cap = IntakeLimits {
            max_tree_bytes: 10,
            ..Default::default()
        };
        let tar = Tar::default().file("a", b"12345").file("b", b"67890").end();
        accepted(&gz(&tar), false, &cap);
        let tar = Tar::default()
            .file("a", b"12345")
            .file("b", b"67890")
            .file("c", b"!")
            .end();
        refused(&gz(&tar), false, &cap, 413, "larger than");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let few = IntakeLimits {
            max_entries: 100,
            ..limits()
        };
        let many = |n: usize| {
            let mut tar = Tar::default().dir("d/");
            for i in 1..n {
                tar = tar.file(&format!("d/{i:05}"), b"");
            }
            gz(&tar.end())
        };
        let i = accepted(&many(100), false, &few);
        assert_eq!(paths(&i.archive).len(), 100);
        refused(&many(101), false, &few, 422, "more than 100 entries");
    }

    #[test]
    fn default_entry_limit_is_10000() {
        let many = |n: usize| {
            let mut tar = Tar::default();
            for i in 0..n {
                tar = tar.file(&format!("f/{i:05}"), b"");
            }
            gz(&tar.end())
        };
        let i = accepted(&many(10_000), false, &IntakeLimits::default());
        assert_eq!(paths(&i.archive).len(), 10_001); // with "f/"
        refused(
            &many(10_001),
            false,
            &IntakeLimits::default(),
            422,
            "more than 10000 entries",
        );
    }

    // ---- stream integrity --------------------------------------------------

    fn small() -> Vec<u8> {
        Tar::default()
            .file("plugin.yaml", b"name: x\n")
            .file("README.md", &[b'r'; 3000])
            .end()
    }

    #[test]
    fn truncated_gzip_is_refused() {
        let whole = gz(&small());
        accepted(&whole, false, &limits());
        for cut in [whole.len() / 2, whole.len() - 4, 5] {
            refused(&whole[..cut], false, &limits(), 422, "corrupt or truncated");
        }
        refused(b"", false, &limits(), 422, "corrupt or truncated");
    }

    #[test]
    fn corrupt_gzip_and_tar_are_refused() {
        refused(&small(), false, &limits(), 422, "corrupt"); // not gzipped
        let mut bad_crc = gz(&small());
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 1;
        refused(&bad_crc, false, &limits(), 422, "corrupt");
        let mut bad_sum = small();
        bad_sum[0] = b'X'; // the name changes, the checksum does not
        refused(&gz(&bad_sum), false, &limits(), 422, "checksum");
    }

    #[test]
    fn trailing_garbage_after_gzip_is_refused() {
        let mut bytes = gz(&small());
        bytes.extend_from_slice(b"garbage");
        refused(
            &bytes,
            false,
            &limits(),
            422,
            "after the end of the gzip stream",
        );
    }

    #[test]
    fn second_gzip_member_is_refused() {
        let mut bytes = gz(&small());
        bytes.extend_from_slice(&gz(&Tar::default().file("extra", b"x").end()));
        refused(&bytes, false, &limits(), 422, "exactly one gzip member");
    }

    #[test]
    fn tar_end_is_checked() {
        // Zero padding up to a 10 KiB record is what GNU tar writes.
        let mut padded = small();
        padded.resize(10 * 1024, 0);
        accepted(&gz(&padded), false, &limits());
        // Data after the end-of-archive blocks: another archive, or garbage.
        let mut more = small();
        more.extend_from_slice(&Tar::default().file("hidden", b"x").end());
        refused(
            &gz(&more),
            false,
            &limits(),
            422,
            "after the end of the tar archive",
        );
        // No end-of-archive marker, or half of one: truncated.
        let tar = small();
        refused(
            &gz(&tar[..tar.len() - 1024]),
            false,
            &limits(),
            422,
            "end-of-archive",
        );
        refused(
            &gz(&tar[..tar.len() - 512]),
            false,
            &limits(),
            422,
            "end-of-archive",
        );
        // Cut inside a file's data.
        refused(
            &gz(&tar[..1024 + 512 + 100]),
            false,
            &limits(),
            422,
            "truncated",
        );
    }

    #[test]
    fn source_failure_is_not_a_corrupt_archive() {
        let whole = gz(&small());
        let failing = (&whole[..whole.len() / 2]).chain(FailingReader);
        refused_reader(failing, false, &limits(), 503, "could not be read");
    }

    struct FailingReader;

    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "reset by peer",
            ))
        }
    }

    #[test]
    fn endless_empty_deflate_blocks_hit_the_input_cap() {
        // Valid deflate that never produces a byte: a gzip header, then empty
        // non-final stored blocks forever.
        struct Endless(usize);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                const HEAD: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
                const BLOCK: [u8; 5] = [0, 0, 0, 0xff, 0xff];
                for b in buf.iter_mut() {
                    *b = if self.0 < HEAD.len() {
                        HEAD[self.0]
                    } else {
                        BLOCK[(self.0 - HEAD.len()) % BLOCK.len()]
                    };
                    self.0 += 1;
                }
                Ok(buf.len())
            }
        }
        let tiny = IntakeLimits {
            max_tree_bytes: KIB,
            max_entries: 10,
            ..Default::default()
        };
        refused_reader(Endless(0), false, &tiny, 413, "larger than");
    }

    // ---- metadata ----------------------------------------------------------

    #[test]
    fn pax_headers_are_applied_and_checked() {
        // A PAX path (here with non-ASCII) replaces the header's name.
        let tar = Tar::default()
            .pax(
                b'x',
                &[("path", "docs/ünïcode.md".as_bytes()), ("mtime", b"1.5")],
            )
            .file("short", b"x")
            .end();
        let i = accepted(&gz(&tar), false, &limits());
        assert_eq!(paths(&i.archive), ["docs/", "docs/ünïcode.md"]);
        // ... and is checked like any other name.
        let tar = Tar::default()
            .pax(b'x', &[("path", b"../up")])
            .file("short", b"x")
            .end();
        refused(&gz(&tar), false, &limits(), 422, "traversal");
        // A size that disagrees with the header.
        let tar = Tar::default()
            .pax(b'x', &[("size", b"0")])
            .file("f", b"x")
            .end();
        refused(&gz(&tar), false, &limits(), 422, "PAX size");
        // Malformed records.
        let tar = Tar::default()
            .entry(b"PaxHeaders/x", b'x', 0o644, b"99 path=x\n")
            .file("f", b"x")
            .end();
        refused(&gz(&tar), false, &limits(), 422, "malformed pax");
        // Metadata with nothing after it.
        let tar = Tar::default().file("f", b"x").long_name("dangling").end();
        refused(&gz(&tar), false, &limits(), 422, "no entry");
        // Two long names for one entry, or a long name and a PAX path.
        let tar = Tar::default()
            .long_name("a")
            .long_name("b")
            .file("f", b"")
            .end();
        refused(&gz(&tar), false, &limits(), 422, "two metadata entries");
        let tar = Tar::default()
            .long_name("a")
            .pax(b'x', &[("path", b"b")])
            .file("f", b"")
            .end();
        refused(
            &gz(&tar),
            false,
            &limits(),
            422,
            "both a GNU long name and a PAX path",
        );
    }

    // ---- top-level directory -----------------------------------------------

    fn github_like() -> Vec<u8> {
        Tar::default()
            .pax(
                b'g',
                &[("comment", b"4b825dc642cb6eb9a060e54bf8d69288fbee4904")],
            )
            .dir("acme-plugin-4b825dc/")
            .file("acme-plugin-4b825dc/plugin.yaml", b"name: acme\n")
            .dir("acme-plugin-4b825dc/skills/")
            .file("acme-plugin-4b825dc/skills/SKILL.md", b"# Skill\n")
            .link("acme-plugin-4b825dc/skills/latest", b'2', "SKILL.md")
            .end()
    }

    #[test]
    fn github_top_level_dir_is_stripped() {
        let i = accepted(&gz(&github_like()), true, &limits());
        assert_eq!(
            contents(&i.archive),
            [
                ("plugin.yaml".into(), 0o644, b"name: acme\n".to_vec()),
                ("skills/".into(), 0o755, vec![]),
                ("skills/SKILL.md".into(), 0o644, b"# Skill\n".to_vec()),
            ]
        );
        assert_eq!(i.skipped, [skipped("skills/latest", "symlink")]);
        assert_eq!(i.archive.manifest.as_deref(), Some(&b"name: acme\n"[..]));
        // Without stripping, the directory stays.
        let i = accepted(&gz(&github_like()), false, &limits());
        assert_eq!(paths(&i.archive)[0], "acme-plugin-4b825dc/");
    }

    #[test]
    fn strip_needs_exactly_one_top_level_dir() {
        let tar = Tar::default().file("a/x", b"1").file("b/y", b"2").end();
        refused(
            &gz(&tar),
            true,
            &limits(),
            422,
            "exactly one top-level directory, but has \"a\" and \"b\"",
        );
        let tar = Tar::default().file("README", b"1").end();
        refused(
            &gz(&tar),
            true,
            &limits(),
            422,
            "\"README\" is at the top level",
        );
        let tar = Tar::default()
            .dir("a/")
            .file("a/x", b"")
            .file("stray", b"")
            .end();
        refused(
            &gz(&tar),
            true,
            &limits(),
            422,
            "exactly one top-level directory",
        );
        refused(&gz(&Tar::default().end()), true, &limits(), 422, "empty");
        // Without stripping, several top-level entries are fine.
        let tar = Tar::default().file("a/x", b"1").file("b/y", b"2").end();
        accepted(&gz(&tar), false, &limits());
    }

    // ---- the re-packed archive ---------------------------------------------

    #[test]
    fn valid_tree_repacks_byte_identically() {
        let long_dir = format!("skills/{}", "long-".repeat(30));
        let long_file = format!("{long_dir}/doc.md");
        let tar = Tar::default()
            .file("./skills/b/SKILL.md", b"# B\n")
            .dir("./")
            .dir("./hooks/")
            .mode_file("./plugin.yaml", 0o600, b"name: x\nversion: 1\n")
            .mode_file("./hooks/run.sh", 0o4775, b"#!/bin/sh\necho hi\n")
            .dir("./skills/")
            .dir("./empty/")
            .long_name(&format!("./{long_file}"))
            .file("ignored-short-name", &[b'z'; 2000])
            .pax(
                b'x',
                &[("path", "skills/pax/ünï.md".as_bytes()), ("mtime", b"1")],
            )
            .file("ignored", b"pax\n")
            .end();
        let i = accepted(&gz(&tar), false, &limits());
        assert!(i.skipped.is_empty());

        let zs = [b'z'; 2000];
        let files: [(&str, &[u8], u32); 5] = [
            ("hooks/run.sh", b"#!/bin/sh\necho hi\n", 0o4775),
            ("plugin.yaml", b"name: x\nversion: 1\n", 0o600),
            ("skills/b/SKILL.md", b"# B\n", 0o644),
            (&long_file, &zs, 0o644),
            ("skills/pax/ünï.md", b"pax\n", 0o644),
        ];
        let mut direct = CanonicalArchive::create(MIB).unwrap();
        for (p, d, m) in files {
            direct.add_file(p, d.len() as u64, m, d).unwrap();
        }
        let direct = direct.finish().unwrap();
        assert_eq!(i.archive.sha256, direct.sha256);
        assert_eq!(i.archive.size, direct.size);
        assert_eq!(
            std::fs::read(i.archive.path()).unwrap(),
            std::fs::read(direct.path()).unwrap()
        );
        assert_eq!(i.archive.manifest, direct.manifest);
        assert_eq!(
            paths(&i.archive),
            [
                "hooks/".to_string(),
                "hooks/run.sh".into(),
                "plugin.yaml".into(),
                "skills/".into(),
                "skills/b/".into(),
                "skills/b/SKILL.md".into(),
                format!("{long_dir}/"),
                long_file.clone(),
                "skills/pax/".into(),
                "skills/pax/ünï.md".into(),
            ]
        );
    }
}
