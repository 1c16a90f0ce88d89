//! Listing the files of a snapshot's file systems, read in userspace
//! straight from the store: ext2/3/4 through the `ext4` crate ([`ext`]), FAT12/16/32
//! (EFI system partitions) through `fatfs`, NTFS through `ntfs`
//! ([`ntfs`]). Each reads a partition as a
//! window onto a [`SnapshotReader`], so a listing costs the few chunks
//! holding the superblock, the inode tables and the directory's blocks.
//! Other file systems get an error that says so.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

mod ext;
mod ntfs;

use crate::partitions::{self, PartitionTable};
use crate::snapshot_reader::SnapshotReader;

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    /// The name within its directory.
    pub name: String,
    /// "file", "dir", "symlink", "char", "block", "fifo" or "socket".
    pub kind: String,
    /// Permission bits (with set-id and sticky bits), e.g. 0o644. FAT has
    /// none: 0o755 for folders, 0o644 for files, as Linux mounts it.
    pub mode: u32,
    /// Owner (0 on FAT).
    pub uid: u32,
    /// Group (0 on FAT).
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since 1970 (FAT: local time taken as UTC).
    pub mtime: i64,
    /// Where a symbolic link points.
    pub target: Option<String>,
}

/// Errors listing files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The partition table could not be read.
    #[error(transparent)]
    Table(#[from] partitions::PartitionError),
    /// The disk has several partitions and none was chosen.
    #[error("the disk has {0}; pick one with --partition N")]
    ChoosePartition(String),
    /// No such partition.
    #[error("there is no partition {0}; `novabackup partitions` lists them")]
    NoPartition(u32),
    /// No file system this reader knows.
    #[error("{0}; single files can be read from ext2/3/4, FAT and NTFS: restore the whole snapshot (`novabackup restore ID --to PATH`) and mount it to reach others")]
    Unsupported(String),
    /// No such file or folder.
    #[error("{0} does not exist in the snapshot")]
    NotFound(String),
    /// The path names a file where a folder is needed.
    #[error("{0} is not a folder")]
    NotADirectory(String),
    /// The file system is damaged, or a chunk under it is.
    #[error("cannot read the file system: {0}")]
    Read(String),
}

/// A partition (or the whole disk) as a device of its own.
#[derive(Clone)]
struct Volume<'a> {
    reader: &'a SnapshotReader,
    start: u64,
    len: u64,
    pos: u64,
    /// Bytes shown in place of the volume's from byte 1024: a superblock
    /// edited for a crate's eyes (see [`ext`]).
    superblock: Option<Arc<[u8]>>,
}

impl Volume<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        if pos >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - pos) as usize);
        let got = self.reader.read_at(&mut buf[..n], self.start + pos)?;
        if let Some(sb) = &self.superblock {
            let (lo, hi) = (
                pos.max(1024),
                (pos + got as u64).min(1024 + sb.len() as u64),
            );
            if lo < hi {
                buf[(lo - pos) as usize..(hi - pos) as usize]
                    .copy_from_slice(&sb[(lo - 1024) as usize..(hi - 1024) as usize]);
            }
        }
        Ok(got)
    }

    /// This volume with `sb` read in place of its superblock.
    fn with_superblock(self, sb: Arc<[u8]>) -> Self {
        Volume {
            superblock: Some(sb),
            ..self
        }
    }
}

impl positioned_io::ReadAt for Volume<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        Volume::read_at(self, pos, buf)
    }
}

impl Read for Volume<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = Volume::read_at(self, self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Volume<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

/// A snapshot is never written: fatfs asks for a writer, and gets one that
/// refuses.
impl Write for Volume<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a snapshot is read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A partition as a volume of its own.
fn window<'a>(reader: &'a SnapshotReader, p: &partitions::Partition) -> Volume<'a> {
    Volume {
        reader,
        start: p.start,
        len: p.size,
        pos: 0,
        superblock: None,
    }
}

/// The volume `partition` names (None: the only file system there is) and
/// the file system found on it.
fn volume(
    reader: &SnapshotReader,
    partition: Option<u32>,
) -> Result<(Volume<'_>, String), FilesError> {
    let table: PartitionTable = partitions::read(&mut reader.cursor(), reader.size())?;
    let whole = |fs: Option<String>| {
        let v = Volume {
            reader,
            start: 0,
            len: reader.size(),
            pos: 0,
            superblock: None,
        };
        (v, fs)
    };
    let (vol, fs) = match partition {
        Some(0) if table.scheme == "none" => whole(table.filesystem.clone()),
        Some(n) => {
            let p = table
                .partitions
                .iter()
                .find(|p| p.number == n)
                .ok_or(FilesError::NoPartition(n))?;
            (window(reader, p), p.filesystem.clone())
        }
        None if table.scheme == "none" => whole(table.filesystem.clone()),
        None => {
            let with_fs: Vec<_> = table
                .partitions
                .iter()
                .filter(|p| p.filesystem.is_some())
                .collect();
            match with_fs.as_slice() {
                [only] => (window(reader, only), only.filesystem.clone()),
                _ => {
                    let list: Vec<String> = table
                        .partitions
                        .iter()
                        .map(|p| {
                            format!(
                                "{} ({})",
                                p.number,
                                p.filesystem.as_deref().unwrap_or("no file system")
                            )
                        })
                        .collect();
                    return Err(FilesError::ChoosePartition(format!(
                        "partitions {}",
                        list.join(", ")
                    )));
                }
            }
        }
    };
    match fs {
        Some(fs) => Ok((vol, fs)),
        None => Err(FilesError::Unsupported(
            "no file system found there".to_string(),
        )),
    }
}

/// Lists the folder `path` ("/" for the top) of the file system on
/// `partition` of the snapshot, sorted by name.
pub fn list(
    reader: &SnapshotReader,
    partition: Option<u32>,
    path: &str,
) -> Result<Vec<FileEntry>, FilesError> {
    let (vol, fs) = volume(reader, partition)?;
    let mut out = match open(vol, &fs)? {
        Fs::Ext(e) => e.list(path)?,
        Fs::Fat(f) => list_fat(&f, path)?,
        Fs::Ntfs(n) => n.list(path)?,
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What [`write_tar`] put in the archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TarStats {
    /// Regular files.
    pub files: u64,
    /// Folders.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Device nodes, fifos and sockets, which are left out.
    pub skipped: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

/// Checks that every one of `paths` exists in the file system on
/// `partition`, so that an export fails before its first byte, not in the
/// middle of a stream.
pub fn check_paths(
    reader: &SnapshotReader,
    partition: Option<u32>,
    paths: &[String],
) -> Result<(), FilesError> {
    let (vol, fs) = volume(reader, partition)?;
    match open(vol, &fs)? {
        Fs::Ext(e) => {
            for p in paths {
                e.resolve(p)?;
            }
        }
        Fs::Fat(f) => {
            for p in paths {
                fat_resolve(&f, p)?;
            }
        }
        Fs::Ntfs(n) => {
            for p in paths {
                n.check(p)?;
            }
        }
    }
    Ok(())
}

/// Writes `paths` (files or whole folder trees) of the file system on
/// `partition` as a tar stream: modes, owners, times and symlinks kept;
/// each tree named from its last component ("/var/log" gives "log/...").
pub fn write_tar<W: Write>(
    reader: &SnapshotReader,
    partition: Option<u32>,
    paths: &[String],
    out: W,
) -> Result<TarStats, FilesError> {
    let (vol, fs) = volume(reader, partition)?;
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut stats = TarStats::default();
    match open(vol, &fs)? {
        Fs::Ext(e) => {
            for p in paths {
                let inode = e.resolve(p)?;
                e.add_tree(&mut tar, &top_name(p), inode, &mut stats)?;
            }
        }
        Fs::Fat(f) => {
            for p in paths {
                fat_add(&f, &mut tar, p, &top_name(p), &mut stats)?;
            }
        }
        Fs::Ntfs(n) => {
            for p in paths {
                n.add_tree(&mut tar, p, &top_name(p), &mut stats)?;
            }
        }
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| FilesError::Read(format!("writing the archive: {e}")))?;
    Ok(stats)
}

/// The name a requested path gets in the archive.
fn top_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(".")
        .to_string()
}

enum Fs<'a> {
    Ext(ext::Ext<'a>),
    Fat(fatfs::FileSystem<Volume<'a>>),
    Ntfs(ntfs::NtfsFs<'a>),
}

fn open<'a>(vol: Volume<'a>, fs: &str) -> Result<Fs<'a>, FilesError> {
    match fs {
        "ext2" | "ext3" | "ext4" => Ok(Fs::Ext(ext::Ext::open(vol)?)),
        "vfat" => Ok(Fs::Fat(
            fatfs::FileSystem::new(vol, fatfs::FsOptions::new())
                .map_err(|e| FilesError::Read(e.to_string()))?,
        )),
        "ntfs" => Ok(Fs::Ntfs(ntfs::NtfsFs::open(vol)?)),
        other => Err(FilesError::Unsupported(format!(
            "the file system there is {other}"
        ))),
    }
}

fn read_err(e: impl std::fmt::Display) -> FilesError {
    FilesError::Read(format!("{e:#}"))
}

fn tar_err(e: io::Error) -> FilesError {
    FilesError::Read(format!("writing the archive: {e}"))
}

/// A tar header for an entry (its size and type set; the path is set when
/// it is appended).
fn header(e: &FileEntry) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(e.mode);
    h.set_uid(u64::from(e.uid));
    h.set_gid(u64::from(e.gid));
    h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
    let (kind, size) = match e.kind.as_str() {
        "dir" => (tar::EntryType::Directory, 0),
        "symlink" => (tar::EntryType::Symlink, 0),
        _ => (tar::EntryType::Regular, e.size),
    };
    h.set_entry_type(kind);
    h.set_size(size);
    h
}

fn fat_time(m: fatfs::DateTime) -> i64 {
    chrono::NaiveDate::from_ymd_opt(
        i32::from(m.date.year),
        u32::from(m.date.month),
        u32::from(m.date.day),
    )
    .and_then(|d| {
        d.and_hms_opt(
            u32::from(m.time.hour),
            u32::from(m.time.min),
            u32::from(m.time.sec),
        )
    })
    .map(|t| t.and_utc().timestamp())
    .unwrap_or(0)
}

type FatFs<'a> = fatfs::FileSystem<Volume<'a>>;

fn fat_entry(e: &fatfs::DirEntry<'_, Volume<'_>>) -> FileEntry {
    FileEntry {
        name: e.file_name(),
        kind: if e.is_dir() { "dir" } else { "file" }.into(),
        mode: if e.is_dir() { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size: if e.is_dir() { 0 } else { e.len() },
        mtime: fat_time(e.modified()),
        target: None,
    }
}

/// The entry at `path`: None for the top folder.
fn fat_resolve<'a, 'b>(
    fs: &'b FatFs<'a>,
    path: &str,
) -> Result<Option<fatfs::DirEntry<'b, Volume<'a>>>, FilesError> {
    let clean = path.trim_matches('/');
    if clean.is_empty() {
        return Ok(None);
    }
    let (parent, name) = clean.rsplit_once('/').unwrap_or(("", clean));
    let dir = if parent.is_empty() {
        fs.root_dir()
    } else {
        fs.root_dir().open_dir(parent).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => FilesError::NotFound(format!("/{parent}")),
            _ => FilesError::NotADirectory(format!("/{parent}")),
        })?
    };
    for e in dir.iter() {
        let e = e.map_err(read_err)?;
        if e.file_name().eq_ignore_ascii_case(name) {
            return Ok(Some(e));
        }
    }
    Err(FilesError::NotFound(format!("/{clean}")))
}

fn list_fat(fs: &FatFs<'_>, path: &str) -> Result<Vec<FileEntry>, FilesError> {
    let dir = match fat_resolve(fs, path)? {
        None => fs.root_dir(),
        Some(e) if e.is_dir() => e.to_dir(),
        Some(_) => return Err(FilesError::NotADirectory(path.to_string())),
    };
    let mut out = Vec::new();
    for e in dir.iter() {
        let e = e.map_err(read_err)?;
        let name = e.file_name();
        if name != "." && name != ".." {
            out.push(fat_entry(&e));
        }
    }
    Ok(out)
}

fn fat_add<W: Write>(
    fs: &FatFs<'_>,
    tar: &mut tar::Builder<W>,
    path: &str,
    name: &str,
    stats: &mut TarStats,
) -> Result<(), FilesError> {
    let (entry, dir) = match fat_resolve(fs, path)? {
        None => (None, Some(fs.root_dir())),
        Some(e) if e.is_dir() => {
            let d = e.to_dir();
            (Some(fat_entry(&e)), Some(d))
        }
        Some(e) => {
            let fe = fat_entry(&e);
            let mut h = header(&fe);
            tar.append_data(&mut h, name, e.to_file().take(fe.size))
                .map_err(tar_err)?;
            stats.files += 1;
            stats.bytes += fe.size;
            return Ok(());
        }
    };
    let top = entry.unwrap_or(FileEntry {
        name: name.to_string(),
        kind: "dir".into(),
        mode: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 0,
        target: None,
    });
    tar.append_data(&mut header(&top), name, io::empty())
        .map_err(tar_err)?;
    stats.dirs += 1;
    let dir = dir.expect("a folder here");
    for e in dir.iter() {
        let e = e.map_err(read_err)?;
        let child = e.file_name();
        if child == "." || child == ".." {
            continue;
        }
        let child_path = format!("{}/{child}", path.trim_end_matches('/'));
        fat_add(fs, tar, &child_path, &format!("{name}/{child}"), stats)?;
    }
    Ok(())
}
