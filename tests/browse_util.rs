//! Helpers of the snapshot-browsing tests (browse.rs, browse_fat_ntfs.rs):
//! images made with the real tools, a known tree, and listings compared
//! with it.
#![allow(dead_code)]

use std::path::Path;

use crate::harness::*;

pub const MIB: u64 = 1 << 20;

/// `sfdisk --json`'s partitions: (number, start sector, sectors, type).
pub fn sfdisk(img: &Path) -> Vec<(u32, u64, u64, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["--json", img.to_str().unwrap()])).unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let n = node.trim_start_matches(|c: char| !c.is_ascii_digit() || node.is_empty());
            let n: u32 = n
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (
                n,
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["type"].as_str().unwrap().to_uppercase(),
            )
        })
        .collect()
}

/// What blkid finds at `offset` of the image ("" for nothing).
pub fn blkid(img: &Path, offset: u64) -> String {
    let o = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", "--offset"])
        .arg(offset.to_string())
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn mkfs_at(img: &Path, offset: u64, size: u64, fs: &str) {
    let i = img.to_str().unwrap();
    match fs {
        "ext4" | "ext2" => {
            let e = format!("offset={offset}");
            let blocks = (size / 4096).to_string();
            run(
                "mke2fs",
                &["-q", "-F", "-t", fs, "-b", "4096", "-E", &e, i, &blocks],
            );
        }
        "vfat" => {
            let sectors = (offset / 512).to_string();
            let kib = (size / 1024).to_string();
            run("mkfs.vfat", &["--offset", &sectors, "-F", "32", i, &kib]);
        }
        other => panic!("no mkfs for {other}"),
    }
}

/// A known tree: nested folders, a big folder, modes, a symlink, sizes.
pub fn tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mk = |p: &str, data: &[u8], mode: u32| {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, data).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mk("etc/hostname", b"vm1\n", 0o644);
    mk("etc/shadow", b"root:*:1::::::\n", 0o640);
    mk("usr/bin/tool", &vec![0x7f; 70_000], 0o4755);
    for i in 0..300 {
        mk(
            &format!("var/many/file-{i:03}"),
            format!("{i}").as_bytes(),
            0o600,
        );
    }
    std::os::unix::fs::symlink("../etc/hostname", root.join("usr/hostname-link")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
}

/// A 64 MiB image holding an ext4 made of `src` with mke2fs -d.
pub fn ext4_of(src: &Path, img: &Path) -> std::path::PathBuf {
    sparse_file(img, 64 * MIB);
    let (s, i) = (src.to_str().unwrap(), img.to_str().unwrap());
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-d", s, i]);
    img.to_path_buf()
}

/// The id of a new backup of `disk`.
pub fn backup_id(a: &Agent, disk: &str) -> String {
    let r: serde_json::Value = serde_json::from_str(&a.ok(&["backup", disk, "--json"])).unwrap();
    r["snapshot"].as_str().unwrap().to_string()
}

/// `files --json` of `path`.
pub fn files(a: &Agent, id: &str, path: &str, partition: Option<u32>) -> Vec<serde_json::Value> {
    let mut args = vec!["files", id, path, "--json"];
    let n = partition.map(|n| n.to_string());
    if let Some(n) = &n {
        args.extend(["--partition", n]);
    }
    let v: serde_json::Value = serde_json::from_str(&a.ok(&args)).unwrap();
    v.as_array().unwrap().clone()
}

/// The entries of `dir` in the source tree: (name, kind, mode, size).
pub fn source(dir: &Path) -> Vec<(String, String, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            let kind = if md.is_dir() {
                "dir"
            } else if md.file_type().is_symlink() {
                "symlink"
            } else {
                "file"
            };
            let size = if md.is_dir() { 0 } else { md.len() };
            (
                e.file_name().into_string().unwrap(),
                kind.to_string(),
                u64::from(md.mode() & 0o7777),
                size,
            )
        })
        .collect();
    v.sort();
    v
}

pub fn ours(entries: &[serde_json::Value]) -> Vec<(String, String, u64, u64)> {
    entries
        .iter()
        .filter(|e| e["name"] != "lost+found")
        .map(|e| {
            let size = if e["kind"] == "dir" {
                0
            } else {
                e["size"].as_u64().unwrap()
            };
            (
                e["name"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e["mode"].as_u64().unwrap(),
                size,
            )
        })
        .collect()
}

/// Every file, folder and link below `a` equals its copy below `b`:
/// contents, modes, modification times, link targets.
pub fn same_tree(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (ma, mb) = (
        std::fs::symlink_metadata(a).unwrap(),
        std::fs::symlink_metadata(b).unwrap(),
    );
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    if ma.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(a).unwrap(),
            std::fs::read_link(b).unwrap()
        );
        return;
    }
    assert_eq!(
        ma.mode() & 0o7777,
        mb.mode() & 0o7777,
        "mode of {}",
        b.display()
    );
    if ma.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut theirs: Vec<_> = std::fs::read_dir(b)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        theirs.sort();
        assert_eq!(names, theirs, "{}", b.display());
        for n in names {
            same_tree(&a.join(&n), &b.join(&n));
        }
    } else {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{}",
            b.display()
        );
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", b.display());
    }
}

/// debugfs's parsable listing of `dir` (/inode/mode/uid/gid/name/size/),
/// names only, without "." and "..", sorted.
pub fn debugfs_ls(img: &Path, dir: &str) -> Vec<String> {
    let ls = run(
        "debugfs",
        &["-R", &format!("ls -p /{dir}"), img.to_str().unwrap()],
    );
    let mut names: Vec<String> = ls
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    names
}
