//! The gzip writer of canonical archives: deflate at level 1, except for
//! stretches the caller marks as incompressible, which go out as stored
//! deflate blocks (plain copies). Trying to compress random bytes (images,
//! model weights, other archives) costs the most CPU per byte of anything an
//! install does and saves nothing; storing them is a memory copy.
//!
//! Deterministic like the rest of the archive: the same bytes with the same
//! marks always give the same stream. Without marks the output is byte for
//! byte flate2's `GzBuilder::new().mtime(0)` at `Compression::fast()`, the
//! writer archives were made with before, so digests of plugins without
//! large incompressible files do not change.

use std::io::{self, Write};

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// gzip header: deflate, no flags, mtime 0, XFL 4 ("fastest"), OS 255
/// (unknown), as flate2 writes it for `Compression::fast()`.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

/// Largest payload of one stored block.
const STORED_MAX: usize = 65_535;

/// Output buffer of the compressor.
const OUT_BUF: usize = 32 * 1024;

pub struct GzWriter<W: Write> {
    out: W,
    /// The compressor while compressing; `None` while storing. A new one
    /// starts after every stored stretch: its window must not refer back
    /// into bytes it did not see.
    deflate: Option<Compress>,
    /// Bytes waiting to fill a stored block.
    stored: Vec<u8>,
    crc: Crc,
    buf: Vec<u8>,
}

fn level() -> Compression {
    Compression::fast()
}

impl<W: Write> GzWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&HEADER)?;
        Ok(GzWriter {
            out,
            deflate: Some(Compress::new(level(), false)),
            stored: Vec::new(),
            crc: Crc::new(),
            buf: Vec::with_capacity(OUT_BUF),
        })
    }

    /// From here on, stores (`true`) or compresses (`false`) what is
    /// written. Switching to storing ends the compressed stretch on a byte
    /// boundary (a sync flush); switching back starts a new compressor.
    pub fn store(&mut self, store: bool) -> io::Result<()> {
        match (store, self.deflate.is_some()) {
            (true, true) => {
                // A compressor that saw nothing has written nothing.
                if self.deflate.as_ref().is_some_and(|c| c.total_in() > 0) {
                    self.run(FlushCompress::Sync)?;
                }
                self.deflate = None;
            }
            (false, false) => {
                self.emit_stored(false)?;
                self.deflate = Some(Compress::new(level(), false));
            }
            _ => {}
        }
        Ok(())
    }

    /// Ends the deflate stream, writes the gzip trailer and returns the
    /// inner writer (not flushed).
    pub fn finish(mut self) -> io::Result<W> {
        if self.deflate.is_some() {
            self.run(FlushCompress::Finish)?;
        } else {
            self.emit_stored(true)?;
        }
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.out.write_all(&trailer)?;
        Ok(self.out)
    }

    /// One round of compression as flate2's writer does it: `input` fed
    /// with no flush into an empty 32 KiB output buffer, the output written
    /// out; again only if nothing was taken but output came. How much of
    /// `input` was taken. (Calls made the same way as flate2's make the same
    /// bytes; output room changes where miniz ends its blocks.)
    fn compress_some(&mut self, input: &[u8]) -> io::Result<usize> {
        let Some(c) = self.deflate.as_mut() else {
            return Err(io::Error::other("gzip writer: compressor missing"));
        };
        loop {
            self.buf.clear();
            let before = c.total_in();
            c.compress_vec(input, &mut self.buf, FlushCompress::None)
                .map_err(io::Error::other)?;
            let taken = (c.total_in() - before) as usize;
            self.out.write_all(&self.buf)?;
            if input.is_empty() || taken > 0 || self.buf.is_empty() {
                return Ok(taken);
            }
        }
    }

    /// Flushes the compressor (`Sync`: to a byte boundary, the stream going
    /// on; `Finish`: its final block), writing everything it gives.
    fn run(&mut self, flush: FlushCompress) -> io::Result<()> {
        let finish = matches!(flush, FlushCompress::Finish);
        let Some(c) = self.deflate.as_mut() else {
            return Err(io::Error::other("gzip writer: compressor missing"));
        };
        loop {
            self.buf.clear();
            let before = c.total_out();
            let status = c
                .compress_vec(&[], &mut self.buf, flush)
                .map_err(io::Error::other)?;
            self.out.write_all(&self.buf)?;
            if finish && status == Status::StreamEnd {
                return Ok(());
            }
            if c.total_out() == before {
                if finish {
                    return Err(io::Error::other("gzip writer: the stream did not end"));
                }
                return Ok(());
            }
            if !finish && self.buf.len() < self.buf.capacity() {
                return Ok(());
            }
        }
    }

    /// Writes the waiting stored bytes as one stored block (`last`: the
    /// stream's final block, written even when empty).
    fn emit_stored(&mut self, last: bool) -> io::Result<()> {
        if self.stored.is_empty() && !last {
            return Ok(());
        }
        let len = self.stored.len() as u16;
        let mut head = [0u8; 5];
        head[0] = u8::from(last);
        head[1..3].copy_from_slice(&len.to_le_bytes());
        head[3..].copy_from_slice(&(!len).to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&self.stored)?;
        self.stored.clear();
        Ok(())
    }
}

impl<W: Write> Write for GzWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.deflate.is_some() {
            let taken = self.compress_some(data)?;
            self.crc.update(&data[..taken]);
            return Ok(taken);
        }
        self.crc.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let take = rest.len().min(STORED_MAX - self.stored.len());
            self.stored.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.stored.len() == STORED_MAX {
                self.emit_stored(false)?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Whether a sample of a file's first bytes compresses by less than 1/20
/// at level 1: then the file is stored rather than compressed.
pub fn incompressible(sample: &[u8]) -> bool {
    if sample.is_empty() {
        return false;
    }
    let mut c = Compress::new(level(), false);
    let mut out = Vec::with_capacity(sample.len() + sample.len() / 16 + 64);
    match c.compress_vec(sample, &mut out, FlushCompress::Finish) {
        // Out of room means it did not shrink at all.
        Ok(Status::StreamEnd) => out.len() * 20 >= sample.len() * 19,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| b"the quick brown fox jumps over a lazy dog\n"[i % 42])
            .collect()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Writes `parts` (bytes, stored?) in odd-sized pieces.
    fn write(parts: &[(&[u8], bool)]) -> Vec<u8> {
        let mut w = GzWriter::new(Vec::new()).unwrap();
        for (bytes, store) in parts {
            w.store(*store).unwrap();
            for piece in bytes.chunks(7001) {
                w.write_all(piece).unwrap();
            }
        }
        w.finish().unwrap()
    }

    #[test]
    fn without_marks_the_bytes_are_flate2s_as_before() {
        for data in [Vec::new(), text(10), text(300_000), noise(200_000, 3)] {
            // Written in the same pieces as `write` writes them.
            let mut old = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), Compression::fast());
            for piece in data.chunks(7001) {
                old.write_all(piece).unwrap();
            }
            let (ours, theirs) = (write(&[(&data, false)]), old.finish().unwrap());
            let at = ours.iter().zip(&theirs).position(|(a, b)| a != b);
            assert!(
                ours == theirs,
                "{} bytes: ours {}, flate2's {}, first difference at {at:?}",
                data.len(),
                ours.len(),
                theirs.len()
            );
        }
    }

    #[test]
    fn stored_and_compressed_stretches_read_back_whole_in_any_order() {
        let (t, n) = (text(150_000), noise(200_000, 9));
        let cases: Vec<Vec<(&[u8], bool)>> = vec![
            vec![(&n, true)],
            vec![(&t, false), (&n, true), (&t, false)],
            vec![(&n, true), (&t, false), (&n, true)],
            vec![(&t, true), (&[], false), (&[], true)],
            vec![(&n[..STORED_MAX], true)],
        ];
        for parts in cases {
            let gz = write(&parts);
            let want: Vec<u8> = parts.iter().flat_map(|(b, _)| b.iter().copied()).collect();
            assert_eq!(gunzip(&gz), want);
            // gzip(1) agrees, trailer (CRC, length) included.
            let mut child = std::process::Command::new("gzip")
                .arg("-dc")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let feed = std::thread::spawn(move || stdin.write_all(&gz).unwrap());
            let out = child.wait_with_output().unwrap();
            feed.join().unwrap();
            assert!(out.status.success());
            assert_eq!(out.stdout, want);
        }
    }

    #[test]
    fn stored_bytes_cost_five_bytes_a_block_and_noise_is_found_incompressible() {
        let n = noise(1 << 20, 5);
        let gz = write(&[(&n, true)]);
        let blocks = n.len().div_ceil(STORED_MAX);
        // Header, the blocks (the last one final), the trailer.
        assert_eq!(gz.len(), 10 + n.len() + 5 * blocks + 8);
        assert!(incompressible(&n[..64 * 1024]));
        assert!(!incompressible(&text(64 * 1024)));
        assert!(!incompressible(&[]));
    }
}
