//! Data movement for partial files: reading through a chain, copying chunks up,
//! completing, flattening.

use super::Partial;
use crate::node::DataRef;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Finds the path of a frozen file of a chain (a base file or a layer's backing file).
pub(crate) type Resolve<'a> = &'a dyn Fn(&DataRef) -> PathBuf;

/// The piece size of bulk copies (complete, flatten, materialize).
const PIECE: usize = 1 << 20;

/// Fills `buf` with the bytes at `offset` of the file whose backing file is `top` and
/// whose record is `partial` (`None`: `top` holds everything). Bytes past the end of a
/// file of the chain read as zeros.
pub(crate) fn fill(
    top: &File,
    partial: Option<&Partial>,
    resolve: Resolve<'_>,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    let Some(partial) = partial else {
        return read_full(top, buf, offset);
    };
    let end = offset + buf.len() as u64;
    let mut below = Below::new(partial, resolve);
    for (from, to, held) in partial.segments(offset, end) {
        let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
        if held {
            read_full(top, piece, from)?;
        } else {
            fill(
                below.file()?,
                partial.lower.as_deref(),
                resolve,
                piece,
                from,
            )?;
        }
    }
    Ok(())
}

/// `SEEK_DATA` (`hole` false) or `SEEK_HOLE` (`hole` true) within `[offset, end)` of the
/// file whose backing file is `top` and whose record is `partial`: the first offset there
/// that is in data (in a hole), or `None`. Held ranges ask `top`, the others the files
/// below; past the end of any file of the chain is a hole.
pub(crate) fn seek(
    top: &File,
    partial: Option<&Partial>,
    resolve: Resolve<'_>,
    offset: u64,
    end: u64,
    hole: bool,
) -> io::Result<Option<u64>> {
    if offset >= end {
        return Ok(None);
    }
    let Some(partial) = partial else {
        let whence = if hole {
            nix::unistd::Whence::SeekHole
        } else {
            nix::unistd::Whence::SeekData
        };
        let found = match nix::unistd::lseek(top, offset as i64, whence) {
            Ok(pos) => pos as u64,
            // Past the end of this file: all hole.
            Err(nix::errno::Errno::ENXIO) => return Ok(hole.then_some(offset)),
            Err(e) => return Err(e.into()),
        };
        return Ok((found < end).then_some(found));
    };
    let mut below = Below::new(partial, resolve);
    for (from, to, held) in partial.segments(offset, end) {
        let found = if held {
            seek(top, None, resolve, from, to, hole)?
        } else {
            let lower = partial.lower.as_deref();
            seek(below.file()?, lower, resolve, from, to, hole)?
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The file right below a partial file's record, opened on first use: a read or seek
/// within held ranges never opens it.
struct Below<'a> {
    partial: &'a Partial,
    resolve: Resolve<'a>,
    file: Option<File>,
}

impl<'a> Below<'a> {
    fn new(partial: &'a Partial, resolve: Resolve<'a>) -> Self {
        Self {
            partial,
            resolve,
            file: None,
        }
    }

    fn file(&mut self) -> io::Result<&File> {
        match self.file {
            Some(ref file) => Ok(file),
            None => Ok(self
                .file
                .insert(File::open((self.resolve)(&self.partial.below))?)),
        }
    }
}

/// Copies into `top` what of `[start, end)` `partial` does not hold, from the files
/// below it; returns the bytes written.
fn copy_unheld(
    top: &File,
    partial: &Partial,
    resolve: Resolve<'_>,
    start: u64,
    end: u64,
) -> io::Result<u64> {
    let mut below = Below::new(partial, resolve);
    let lower = partial.lower.as_deref();
    let mut written = 0;
    for (from, to, held) in partial.segments(start, end) {
        if !held {
            written += copy_through(below.file()?, lower, resolve, top, from, to)?;
        }
    }
    Ok(written)
}

/// Reads all of `buf` at `offset`, zeros past the end of the file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Copies `[start, end)` of the file (`src` with record `partial`) into the same offsets
/// of `dest`, leaving all-zero pieces as holes (`dest` is known to read zeros there);
/// returns the bytes written.
fn copy_through(
    src: &File,
    partial: Option<&Partial>,
    resolve: Resolve<'_>,
    dest: &File,
    start: u64,
    end: u64,
) -> io::Result<u64> {
    let mut buf = vec![0u8; PIECE.min((end - start) as usize)];
    let mut written = 0;
    let mut pos = start;
    while pos < end {
        let n = PIECE.min((end - pos) as usize);
        fill(src, partial, resolve, &mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            dest.write_all_at(&buf[..n], pos)?;
            written += n as u64;
        }
        pos += n as u64;
    }
    Ok(written)
}

/// Before a write (or a hole punch) of `[start, end)` into partial file `top`: copies the
/// chunks of size `chunk` it touches that `partial` does not hold from below, except those
/// it covers whole when `covered` (the caller overwrites them), and marks them held.
/// Returns the bytes written into `top`.
pub(crate) fn own(
    top: &File,
    partial: &mut Partial,
    resolve: Resolve<'_>,
    start: u64,
    end: u64,
    covered: bool,
    chunk: u64,
) -> io::Result<u64> {
    if start >= end {
        return Ok(0);
    }
    let size = top.metadata()?.len();
    let mut written = 0;
    let mut cs = start - start % chunk;
    while cs < end {
        let ce = cs.saturating_add(chunk);
        if !partial.holds(cs, ce) {
            if !(covered && start <= cs && ce <= end) {
                written += copy_unheld(top, partial, resolve, cs, ce.min(size))?;
            }
            partial.hold(cs, ce);
        }
        cs = ce;
    }
    Ok(written)
}

/// Copies every byte of partial file `top` that `partial` does not hold: afterwards `top`
/// holds the whole file and needs no record. Returns the bytes written.
pub(crate) fn complete(top: &File, partial: &Partial, resolve: Resolve<'_>) -> io::Result<u64> {
    let size = top.metadata()?.len();
    copy_unheld(top, partial, resolve, 0, size)
}

/// A copy-up of a file whose chain is too deep: `dest` (empty, sparse, of `src`'s size)
/// gets every byte some file above the chain's bottom holds, and the returned record
/// sits directly on the bottom file. `None` when that record would hold more than
/// [`super::MAX_RANGES`] ranges: the caller copies the file whole instead. Returns the
/// bytes written too.
pub(crate) fn flatten(
    src: &File,
    partial: &Partial,
    resolve: Resolve<'_>,
    dest: &File,
) -> io::Result<(Option<Partial>, u64)> {
    let mut held = Partial::over(partial.below.clone(), None);
    let mut link = Some(partial);
    let mut bottom = &partial.below;
    while let Some(p) = link {
        for &(s, e) in &p.held {
            held.hold(s, e);
        }
        bottom = &p.below;
        link = p.lower.as_deref();
    }
    if held.held.len() > super::MAX_RANGES {
        return Ok((None, 0));
    }
    held.below = bottom.clone();
    let size = src.metadata()?.len();
    let mut written = 0;
    for &(s, e) in &held.held {
        if s >= size {
            break;
        }
        written += copy_through(src, Some(partial), resolve, dest, s, e.min(size))?;
    }
    Ok((Some(held), written))
}

/// Copies all of the file (`src` with record `partial`) into the empty `dest`, holes of
/// zeros left as holes; returns the bytes written.
pub(crate) fn materialize(
    src: &File,
    partial: &Partial,
    resolve: Resolve<'_>,
    dest: &File,
) -> io::Result<u64> {
    let size = src.metadata()?.len();
    dest.set_len(size)?;
    copy_through(src, Some(partial), resolve, dest, 0, size)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::node::Bytes;

    /// A frozen base file of `len` bytes of `byte`, and a resolver to it.
    fn base(dir: &std::path::Path, name: &str, len: usize, byte: u8) -> DataRef {
        std::fs::write(dir.join(name), vec![byte; len]).unwrap();
        DataRef::Base(Bytes(name.as_bytes().to_vec()))
    }

    /// Resolves base references to files of `dir` (the unit tests' chains have no layers).
    fn base_resolver(dir: &std::path::Path) -> impl Fn(&DataRef) -> PathBuf + use<> {
        let root = dir.to_owned();
        move |d: &DataRef| match d {
            DataRef::Base(rel) => root.join(std::str::from_utf8(&rel.0).unwrap()),
            DataRef::Layer { .. } => unreachable!("a layer in a base-only chain"),
        }
    }

    fn sparse(dir: &std::path::Path, name: &str, len: u64) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn read(
        top: &File,
        p: Option<&Partial>,
        resolve: Resolve<'_>,
        off: u64,
        len: usize,
    ) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len];
        fill(top, p, resolve, &mut buf, off).unwrap();
        buf
    }

    #[test]
    fn a_small_write_copies_one_chunk_and_reads_merge() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = base_resolver(dir.path());
        let below = base(dir.path(), "b", 1000, 7);
        let top = sparse(dir.path(), "t", 1000);
        let mut p = Partial::over(below, None);
        let written = own(&top, &mut p, &resolve, 150, 151, true, 64).unwrap();
        assert_eq!(written, 64);
        assert_eq!(p.held, [(128, 192)]);
        top.write_all_at(&[1], 150).unwrap();
        let all = read(&top, Some(&p), &resolve, 0, 1000);
        let mut want = vec![7u8; 1000];
        want[150] = 1;
        assert_eq!(all, want);
        // A write covering whole chunks copies nothing.
        assert_eq!(own(&top, &mut p, &resolve, 256, 384, true, 64).unwrap(), 0);
        // Shrink then extend: the cut bytes read zeros.
        p.hold(500, u64::MAX);
        top.set_len(500).unwrap();
        top.set_len(1000).unwrap();
        let all = read(&top, Some(&p), &resolve, 400, 200);
        assert_eq!(&all[..100], &want[400..500]);
        assert!(all[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn seeks_find_data_and_holes_through_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = base_resolver(dir.path());
        // Below: 1 MiB, data only in [256 KiB, 320 KiB).
        let below = sparse(dir.path(), "b", 1 << 20);
        below.write_all_at(&[5; 64 << 10], 256 << 10).unwrap();
        let below_ref = DataRef::Base(Bytes(b"b".to_vec()));
        // Top: a write at 600 KiB (one 64 KiB chunk held, data), and the chunk at
        // [256 KiB, 320 KiB) held without data (as a punch makes it).
        let top = sparse(dir.path(), "t", 1 << 20);
        let mut p = Partial::over(below_ref, None);
        own(
            &top,
            &mut p,
            &resolve,
            600 << 10,
            (600 << 10) + 1,
            true,
            64 << 10,
        )
        .unwrap();
        top.write_all_at(&[1], 600 << 10).unwrap();
        p.hold(256 << 10, 320 << 10);
        let size = 1 << 20;
        let data = |off| seek(&top, Some(&p), &resolve, off, size, false).unwrap();
        let hole = |off| seek(&top, Some(&p), &resolve, off, size, true).unwrap();
        // The only data is the written chunk (the copy of [576 KiB, 640 KiB) from below
        // was zeros, left a hole, so the chunk's data is the written page).
        assert_eq!(data(0), Some(600 << 10));
        assert_eq!(hole(0), Some(0));
        assert_eq!(hole(600 << 10), Some((600 << 10) + 4096));
        assert_eq!(data((600 << 10) + 4096), None);
        // Without the hold over [256, 320) KiB, the data below shows.
        let mut q = Partial::over(DataRef::Base(Bytes(b"b".to_vec())), None);
        q.hold(576 << 10, 640 << 10);
        assert_eq!(
            seek(&top, Some(&q), &resolve, 0, size, false).unwrap(),
            Some(256 << 10)
        );
        assert_eq!(
            seek(&top, Some(&q), &resolve, 256 << 10, size, true).unwrap(),
            Some(320 << 10)
        );
    }

    #[test]
    fn chains_complete_flatten_and_materialize_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = base_resolver(dir.path());
        let bottom = base(dir.path(), "b", 4096, 3);
        // Link 1 over the base: writes 9 at 100.
        let mid = sparse(dir.path(), "m", 4096);
        let mut p1 = Partial::over(bottom, None);
        own(&mid, &mut p1, &resolve, 100, 101, true, 256).unwrap();
        mid.write_all_at(&[9], 100).unwrap();
        // Link 2 over link 1: writes 5 at 3000.
        let top = sparse(dir.path(), "t", 4096);
        let mut p2 = Partial::over(DataRef::Base(Bytes(b"m".to_vec())), Some(Arc::new(p1)));
        own(&top, &mut p2, &resolve, 3000, 3001, true, 256).unwrap();
        top.write_all_at(&[5], 3000).unwrap();
        let mut want = vec![3u8; 4096];
        want[100] = 9;
        want[3000] = 5;
        assert_eq!(read(&top, Some(&p2), &resolve, 0, 4096), want);

        let flat = sparse(dir.path(), "f", 4096);
        let (record, _) = flatten(&top, &p2, &resolve, &flat).unwrap();
        let record = record.unwrap();
        assert_eq!(record.depth(), 1);
        assert_eq!(read(&flat, Some(&record), &resolve, 0, 4096), want);

        let whole = sparse(dir.path(), "w", 0);
        materialize(&top, &p2, &resolve, &whole).unwrap();
        assert_eq!(read(&whole, None, &resolve, 0, 4096), want);

        complete(&top, &p2, &resolve).unwrap();
        assert_eq!(read(&top, None, &resolve, 0, 4096), want);
    }
}
