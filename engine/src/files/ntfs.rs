//! NTFS (Windows guests) through the `ntfs` crate, read-only over a
//! [`Volume`]. What a Linux user of ntfs-3g sees is what is listed: the
//! long (Win32) names, not the DOS 8.3 aliases nor the `$` metadata files
//! of the top folder; folders 0755, files 0644, owner root. Reparse points
//! (junctions, symlinks) are listed as what their flags say and their
//! targets are not followed.

use std::io::{self, Read, Write};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};

use super::{header, read_err, tar_err, FileEntry, FilesError, TarStats, Volume};

/// 100 ns ticks between 1601-01-01 and 1970-01-01.
const EPOCH_DIFF: u64 = 116_444_736_000_000_000;

pub(super) struct NtfsFs<'a> {
    ntfs: Ntfs,
    vol: Volume<'a>,
}

fn unix_time(nt: u64) -> i64 {
    (nt.saturating_sub(EPOCH_DIFF) / 10_000_000) as i64
}

impl<'a> NtfsFs<'a> {
    pub(super) fn open(mut vol: Volume<'a>) -> Result<NtfsFs<'a>, FilesError> {
        let mut ntfs = Ntfs::new(&mut vol).map_err(read_err)?;
        ntfs.read_upcase_table(&mut vol).map_err(read_err)?;
        Ok(NtfsFs { ntfs, vol })
    }

    /// The file at `path` ("/" for the top folder).
    fn resolve(&self, path: &str) -> Result<NtfsFile<'_>, FilesError> {
        let mut fs = self.vol.clone();
        let mut cur = self.ntfs.root_directory(&mut fs).map_err(read_err)?;
        let mut walked = String::new();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            walked.push('/');
            walked.push_str(part);
            if !cur.is_directory() {
                return Err(FilesError::NotADirectory(walked));
            }
            let index = cur.directory_index(&mut fs).map_err(read_err)?;
            let mut finder = index.finder();
            let entry = NtfsFileNameIndex::find(&mut finder, &self.ntfs, &mut fs, part)
                .ok_or_else(|| FilesError::NotFound(walked.clone()))?
                .map_err(read_err)?;
            cur = entry.to_file(&self.ntfs, &mut fs).map_err(read_err)?;
        }
        Ok(cur)
    }

    /// The (name, entry) pairs of a folder, Win32 names only.
    fn children(&self, dir: &NtfsFile<'_>, top: bool) -> Result<Vec<(FileEntry, u64)>, FilesError> {
        let mut fs = self.vol.clone();
        let index = dir.directory_index(&mut fs).map_err(read_err)?;
        let mut entries = index.entries();
        let mut out = Vec::new();
        while let Some(e) = entries.next(&mut fs) {
            let e = e.map_err(read_err)?;
            let Some(key) = e.key() else { continue };
            let name = key.map_err(read_err)?;
            if name.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let text = name.name().to_string_lossy();
            if text == "." || (top && text.starts_with('$')) {
                continue;
            }
            let file = e.to_file(&self.ntfs, &mut fs).map_err(read_err)?;
            let entry = self.entry(text, &file)?;
            out.push((entry, e.file_reference().file_record_number()));
        }
        Ok(out)
    }

    fn entry(&self, name: String, file: &NtfsFile<'_>) -> Result<FileEntry, FilesError> {
        let dir = file.is_directory();
        let size = if dir { 0 } else { self.data_len(file)? };
        let mtime = file
            .info()
            .map(|i| unix_time(i.modification_time().nt_timestamp()))
            .unwrap_or(0);
        Ok(FileEntry {
            name,
            kind: if dir { "dir" } else { "file" }.into(),
            mode: if dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size,
            mtime,
            target: None,
        })
    }

    fn data_len(&self, file: &NtfsFile<'_>) -> Result<u64, FilesError> {
        let mut fs = self.vol.clone();
        match file.data(&mut fs, "") {
            None => Ok(0),
            Some(item) => {
                let item = item.map_err(read_err)?;
                let attr = item.to_attribute().map_err(read_err)?;
                Ok(attr.value_length())
            }
        }
    }

    pub(super) fn list(&self, path: &str) -> Result<Vec<FileEntry>, FilesError> {
        let dir = self.resolve(path)?;
        if !dir.is_directory() {
            return Err(FilesError::NotADirectory(path.to_string()));
        }
        let top = path.trim_matches('/').is_empty();
        Ok(self
            .children(&dir, top)?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    pub(super) fn check(&self, path: &str) -> Result<(), FilesError> {
        self.resolve(path).map(drop)
    }

    pub(super) fn add_tree<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        path: &str,
        name: &str,
        stats: &mut TarStats,
    ) -> Result<(), FilesError> {
        let file = self.resolve(path)?;
        self.add_file(tar, &file, name, path.trim_matches('/').is_empty(), stats)
    }

    fn add_file<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        file: &NtfsFile<'_>,
        name: &str,
        top: bool,
        stats: &mut TarStats,
    ) -> Result<(), FilesError> {
        let e = self.entry(name.to_string(), file)?;
        let mut h = header(&e);
        if e.kind == "dir" {
            tar.append_data(&mut h, name, io::empty())
                .map_err(tar_err)?;
            stats.dirs += 1;
            for (child, record) in self.children(file, top)? {
                let mut fs = self.vol.clone();
                let f = self.ntfs.file(&mut fs, record).map_err(read_err)?;
                self.add_file(tar, &f, &format!("{name}/{}", child.name), false, stats)?;
            }
            return Ok(());
        }
        let mut fs = self.vol.clone();
        match file.data(&mut fs, "") {
            None => {
                tar.append_data(&mut h, name, io::empty())
                    .map_err(tar_err)?;
            }
            Some(item) => {
                let item = item.map_err(read_err)?;
                let attr = item.to_attribute().map_err(read_err)?;
                let value = attr.value(&mut fs).map_err(read_err)?;
                let reader = Attached {
                    value,
                    fs: self.vol.clone(),
                };
                tar.append_data(&mut h, name, reader.take(e.size))
                    .map_err(tar_err)?;
            }
        }
        stats.files += 1;
        stats.bytes += e.size;
        Ok(())
    }
}

/// A file's data as `Read`, over its own view of the volume.
struct Attached<'n, 'a> {
    value: ntfs::attribute_value::NtfsAttributeValue<'n, 'n>,
    fs: Volume<'a>,
}

impl Read for Attached<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.value
            .read(&mut self.fs, buf)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}
