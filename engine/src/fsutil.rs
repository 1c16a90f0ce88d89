//! The one place novabackup makes files durable. Single files go through
//! [`write_atomic`]: a temporary file in the same folder, written and
//! fsynced, renamed over the target, then the folder fsynced so the rename
//! itself survives a power cut. A reader therefore sees either the old
//! contents or the new ones, never a torn mix.
//!
//! Many small files written together (the chunks of a backup) go through
//! [`write_staged`] and then one [`publish`]: the staged files are flushed
//! with a single `syncfs`, renamed to their final names, and the renames
//! flushed with a second `syncfs`. The same guarantee (a final name never
//! holds a partial file) for two filesystem syncs instead of one fsync per
//! file.

pub mod direct;
mod writeback;

pub use writeback::start_writeback;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Atomically replaces `path` with `contents` (see the module doc).
///
/// `mode` sets the permission bits of the new file (`0o600` for secrets).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a file that a later [`publish`] will make durable; no fsync.
pub fn write_staged(path: &Path, contents: &[u8]) -> io::Result<()> {
    let r = File::create(path).and_then(|mut f| f.write_all(contents));
    if r.is_err() {
        let _ = fs::remove_file(path);
    }
    r
}

/// Makes staged files durable under their final names (module doc). A
/// move whose source is gone but whose target exists was done by an
/// earlier, interrupted call and is skipped.
pub fn publish(root: &Path, moves: &[(std::path::PathBuf, std::path::PathBuf)]) -> io::Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    syncfs(root)?;
    for (from, to) in moves {
        match fs::rename(from, to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && to.exists() => {}
            r => r?,
        }
    }
    syncfs(root)
}

fn syncfs(root: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(root)?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| io::Error::from_raw_os_error(e as i32))
}

/// Removes `path` durably: the folder is fsynced after the unlink.
pub fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_dir(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `dir` (and its parents) if needed and makes it private to its
/// owner (0700), also when it existed with wider permissions: backup data
/// and state are nobody else's to read.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Creates the temporary file `path` afresh: whatever was there (a
/// leftover of a crash, or a symbolic link someone planted) is unlinked,
/// never followed, and the new file is created exclusively, private to its
/// owner.
pub fn create_fresh(path: &Path) -> io::Result<File> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a folder is in the way of the temporary file; remove it",
            ))
        }
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Fsyncs a folder so that renames and unlinks inside it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether two paths name the same file or device (by device and inode,
/// so links and different spellings of one path agree).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino(), x.rdev()) == (y.dev(), y.ino(), y.rdev()),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_contents_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub");
        fs::create_dir(&target).unwrap();
        // Renaming a file over a non-empty directory fails.
        fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"data", 0o644).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn staged_files_are_published_under_their_final_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.tmp"), dir.path().join("a"));
        write_staged(&a, b"chunk").unwrap();
        publish(dir.path(), &[(a.clone(), b.clone())]).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"chunk");
        assert!(!a.exists());
        // A retry after an interrupted publish skips what was done.
        publish(dir.path(), &[(a, b.clone())]).unwrap();
        assert!(b.exists());
    }

    #[test]
    fn remove_durable_ignores_missing() {
        let dir = tempfile::tempdir().unwrap();
        remove_durable(&dir.path().join("absent")).unwrap();
    }
}
