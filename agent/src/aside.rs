//! Where a run keeps large file content aside while it holds its catalog: one unnamed temporary
//! file (`O_TMPFILE`, mode 0600), which no other process can open by a name and which the
//! kernel removes when the run ends, however it ends. Its pages are the page cache's, which
//! the kernel may write out and drop, not the agent's own memory
//! (see [`converge_modules::content`]).

use converge_modules::catalog::{Resource, Spec};
use converge_modules::content::{self, Store};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An unnamed file that content is appended to and read back from, both through a buffer: a
/// catalog's content goes in and comes out in order, so a few large writes and reads serve
/// thousands of files.
pub struct TempStore {
    file: File,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Bytes wholly written to the file.
    written: u64,
    /// Content put after those, not written yet. A write that fails (a full disk) leaves it
    /// here, still read from here: every place `put` returned stays readable.
    pending: Vec<u8>,
    /// The last span read from the file, and where it starts.
    window: Vec<u8>,
    window_at: u64,
}

/// How much is written or read at once.
const BUFFER: usize = 64 * 1024;

impl TempStore {
    /// A store in the first of `dirs` whose filesystem can hold an unnamed file (a directory
    /// that is a symlink is passed over: a damaged state directory sends nothing elsewhere).
    pub fn open(dirs: &[PathBuf]) -> io::Result<TempStore> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no directory for content kept aside");
        for dir in dirs {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(dir)
            {
                Ok(file) => return Ok(TempStore::on(file)),
                Err(e) => last = io::Error::new(e.kind(), format!("{}: {e}", dir.display())),
            }
        }
        Err(last)
    }

    /// A store on `file`, opened for reading and writing.
    pub fn on(file: File) -> TempStore {
        let inner = Inner { written: 0, pending: Vec::new(), window: Vec::new(), window_at: 0 };
        TempStore { file, inner: Mutex::new(inner) }
    }

    /// Where a run on `root` keeps content aside: the agent's state directory, else /var/tmp
    /// (both on disk by convention, unlike /tmp).
    pub fn dirs(root: &Path, state_dir: &str) -> Vec<PathBuf> {
        vec![root.join(state_dir.trim_start_matches('/')), PathBuf::from("/var/tmp")]
    }
}

impl Store for TempStore {
    fn put(&self, bytes: &[u8]) -> io::Result<u64> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { written, pending, .. } = &mut *inner;
        if !pending.is_empty() && pending.len() + bytes.len() > BUFFER {
            self.file.write_all_at(pending, *written)?;
            *written += pending.len() as u64;
            pending.clear();
        }
        let at = *written + pending.len() as u64;
        if pending.capacity() == 0 {
            pending.reserve_exact(BUFFER);
        }
        pending.extend_from_slice(bytes);
        Ok(at)
    }

    fn read(&self, at: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { written, pending, window, window_at } = &mut *inner;
        let end = at.checked_add(len as u64).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if at >= *written {
            let from = (at - *written) as usize;
            return pending.get(from..from + len).map(<[u8]>::to_vec).ok_or_else(cut_short);
        }
        if end > *written {
            return Err(cut_short());
        }
        if at < *window_at || end > *window_at + window.len() as u64 {
            // Read ahead: the next contents are most likely the next asked for.
            let want = (len.max(BUFFER) as u64).min(*written - at) as usize;
            window.clear();
            window.resize(want, 0);
            self.file.read_exact_at(window, at)?;
            *window_at = at;
        }
        let from = (at - *window_at) as usize;
        Ok(window[from..from + len].to_vec())
    }
}

fn cut_short() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "content kept aside was cut short")
}

/// Whether `r` is a file whose content is kept aside.
pub fn is_kept(r: &Resource) -> bool {
    matches!(&r.spec, Spec::File(f) if f.content.as_ref().is_some_and(|c| c.is_kept()))
}

/// A decoder's hook that keeps each resource's large content aside in `store`, until the store
/// first refuses (a full disk): from then on content stays in memory, as it would without one.
pub fn keeper(store: Option<Arc<dyn Store>>) -> impl FnMut(&mut Resource) {
    let mut store = store;
    move |r: &mut Resource| {
        if let Some(s) = &store
            && let Err(e) = content::keep_aside(r, s)
        {
            tracing::debug!(error = %e, "content is no longer kept aside: it stays in memory");
            store = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_modules::catalog::{FileSpec, Kind, Meta, ResourceId};
    use converge_modules::content::KEEP_ASIDE_FROM;

    fn file(i: usize) -> Resource {
        let text = format!("{i}").repeat(KEEP_ASIDE_FROM);
        Resource {
            id: ResourceId::new(Kind::File, &format!("/f{i}")).unwrap(),
            meta: Meta::default(),
            spec: Spec::File(FileSpec { content: Some(text.into()), ..FileSpec::default() }),
        }
    }

    fn content(r: &Resource) -> &converge_modules::catalog::Content {
        let Spec::File(f) = &r.spec else { panic!("a file") };
        f.content.as_ref().unwrap()
    }

    #[test]
    fn content_goes_to_an_unnamed_file_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(TempStore::open(&[dir.path().join("missing"), dir.path().into()]).unwrap());
        let mut keep = keeper(Some(store));
        let mut all: Vec<Resource> = (0..3).map(file).collect();
        all.iter_mut().for_each(&mut keep);
        for (i, r) in all.iter().enumerate() {
            assert!(content(r).is_kept());
            assert_eq!(content(r).text().unwrap(), format!("{i}").repeat(KEEP_ASIDE_FROM));
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the file has no name");
    }

    #[test]
    fn a_full_disk_leaves_content_in_memory_and_the_run_whole() {
        // /dev/full takes no byte: the first write of the buffer fails with ENOSPC; what the
        // buffer took stays readable, and what came after stays in memory.
        let full = std::fs::OpenOptions::new().read(true).write(true).open("/dev/full").unwrap();
        let mut keep = keeper(Some(Arc::new(TempStore::on(full))));
        let n = 3 * BUFFER / KEEP_ASIDE_FROM;
        let mut all: Vec<Resource> = (0..n).map(file).collect();
        all.iter_mut().for_each(&mut keep);
        let kept = all.iter().filter(|r| content(r).is_kept()).count();
        assert!(kept > 0 && kept < n, "{kept} of {n} kept aside");
        for (i, r) in all.iter().enumerate() {
            assert_eq!(content(r).text().unwrap(), format!("{i}").repeat(KEEP_ASIDE_FROM), "{i}");
        }
    }

    #[test]
    fn reads_come_back_in_any_order_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = TempStore::open(&[dir.path().into()]).unwrap();
        let items: Vec<Vec<u8>> = (0..500usize).map(|i| vec![(i % 251) as u8; 100 + i * 7 % 900]).collect();
        let places: Vec<u64> = items.iter().map(|b| store.put(b).unwrap()).collect();
        for i in (0..items.len()).rev().chain(0..items.len()).chain((0..items.len()).step_by(37)) {
            assert_eq!(store.read(places[i], items[i].len()).unwrap(), items[i], "item {i}");
        }
        let end = places[499] + items[499].len() as u64;
        assert_eq!(store.read(end, 1).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(store.read(places[10], usize::MAX).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_symlinked_directory_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let (elsewhere, link, next) = (dir.path().join("elsewhere"), dir.path().join("link"), dir.path().join("next"));
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::create_dir(&next).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let e = TempStore::open(std::slice::from_ref(&link)).err().unwrap();
        assert!(e.to_string().contains("link"), "{e}");
        // The next directory is taken; nothing is made anywhere (the file has no name).
        let store = TempStore::open(&[link, next.clone()]).unwrap();
        assert_eq!(store.read(store.put(b"abc").unwrap(), 3).unwrap(), b"abc");
        for d in [elsewhere, next] {
            assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
        }
    }

    #[test]
    fn no_directory_that_can_hold_one_is_an_error_naming_it() {
        let e = TempStore::open(&[PathBuf::from("/nonexistent/converge")]).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/converge"), "{e}");
    }
}
