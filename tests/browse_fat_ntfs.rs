//! Looking into FAT (EFI system partitions) and NTFS (Windows guests)
//! file systems of snapshots without a restore: listings against mdir and
//! ntfsls, files back byte for byte. Images are made with mkfs.vfat +
//! mcopy and with mkntfs + ntfs-3g.

#[path = "harness.rs"]
mod harness;
#[path = "browse_util.rs"]
mod util;

use std::path::Path;

use harness::*;
use util::*;

#[test]
fn fat_folders_match_mdir() {
    let t = tempdir();
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("EFI/BOOT")).unwrap();
    std::fs::write(src.join("EFI/BOOT/BOOTX64.EFI"), vec![0x4d; 123_456]).unwrap();
    std::fs::write(src.join("EFI/a long file name.txt"), b"hello").unwrap();
    std::fs::write(src.join("startup.nsh"), b"fs0:").unwrap();
    let img = t.path().join("esp.img");
    run("mkfs.vfat", &["-C", img.to_str().unwrap(), "65536"]);
    let i = img.to_str().unwrap();
    run(
        "mcopy",
        &[
            "-s",
            "-i",
            i,
            src.join("EFI").to_str().unwrap(),
            src.join("startup.nsh").to_str().unwrap(),
            "::/",
        ],
    );
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("esp", &img, &[]);
    let id = backup_id(&a, "esp");
    for dir in ["", "EFI", "EFI/BOOT"] {
        let got = files(&a, &id, &format!("/{dir}"), None);
        let mut want: Vec<(String, u64)> = std::fs::read_dir(src.join(dir))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    if md.is_dir() { 0 } else { md.len() },
                )
            })
            .collect();
        want.sort();
        let mine: Vec<(String, u64)> = got
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["size"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(mine, want, "/{dir}");
        // mdir -b prints each entry's full path.
        let listed = run("mdir", &["-b", "-i", i, &format!("::/{dir}")]);
        let mut names: Vec<String> = listed
            .lines()
            .filter_map(|l| {
                l.trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .map(str::to_string)
            })
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        let mine: Vec<String> = mine.into_iter().map(|(n, _)| n).collect();
        assert_eq!(mine, names, "mdir ::/{dir}");
    }
}

#[test]
fn fat_files_come_back_equal() {
    let t = tempdir();
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("EFI/BOOT")).unwrap();
    random_file(&src.join("EFI/BOOT/BOOTX64.EFI"), 1_234_567, 3);
    std::fs::write(src.join("EFI/a long file name.txt"), b"hello").unwrap();
    let img = t.path().join("esp.img");
    run("mkfs.vfat", &["-C", img.to_str().unwrap(), "65536"]);
    let i = img.to_str().unwrap();
    run(
        "mcopy",
        &["-s", "-i", i, src.join("EFI").to_str().unwrap(), "::/"],
    );
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("esp", &img, &[]);
    let id = backup_id(&a, "esp");
    let out = t.path().join("out");
    a.ok(&[
        "restore",
        &id,
        "--file",
        "/EFI",
        "--to",
        out.to_str().unwrap(),
    ]);
    for f in ["EFI/BOOT/BOOTX64.EFI", "EFI/a long file name.txt"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// `ntfsls -l` of `path`: (name, size) of every entry but `.`.
fn ntfsls(img: &Path, path: &str) -> Vec<(String, u64)> {
    let out = run("ntfsls", &["-l", "-p", path, img.to_str().unwrap()]);
    let mut v: Vec<(String, u64)> = out
        .lines()
        .filter_map(|l| {
            // "    SIZE Mon DD HH:MM YYYY NAME"
            let mut it = l.split_whitespace();
            let size = it.next()?.parse().ok()?;
            let name = it.skip(4).collect::<Vec<_>>().join(" ");
            (name != "." && name != "..").then_some((name, size))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn ntfs_folders_match_ntfsls_and_files_come_back_equal() {
    let t = tempdir();
    // The tree: a resident file, a multi-MiB one, a long Unicode name, a
    // nested folder; made with mkntfs and written through ntfs-3g.
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("Users/alice/Documents")).unwrap();
    std::fs::write(
        src.join("Users/alice/notes.txt"),
        b"small, resident in the MFT",
    )
    .unwrap();
    random_file(&src.join("Users/alice/Documents/report.bin"), 3_000_123, 9);
    std::fs::write(
        src.join("Users/alice/Documents/Überblick – 2026.txt"),
        b"unicode",
    )
    .unwrap();
    let fs = t.path().join("fs.img");
    sparse_file(&fs, 48 * MIB);
    run(
        "mkntfs",
        &[
            "-q",
            "-F",
            "-f",
            "-p",
            "2048",
            "-L",
            "win",
            fs.to_str().unwrap(),
        ],
    );
    let m = t.path().join("m");
    std::fs::create_dir(&m).unwrap();
    run("ntfs-3g", &[fs.to_str().unwrap(), m.to_str().unwrap()]);
    let copied = std::process::Command::new("cp")
        .args([
            "-r",
            src.join("Users").to_str().unwrap(),
            m.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    run("umount", &[m.to_str().unwrap()]);
    assert!(copied.success());
    // In an MBR partition (type 7) at 1 MiB, as a Windows disk has it.
    let img = t.path().join("win.img");
    sfdisk_table(
        &img,
        64 * MIB,
        "label: dos\nstart=2048, size=98304, type=7\n",
    );
    run(
        "dd",
        &[
            &format!("if={}", fs.display()),
            &format!("of={}", img.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("win", &img, &[]);
    let id = backup_id(&a, "win");
    let parts: serde_json::Value =
        serde_json::from_str(&a.ok(&["partitions", &id, "--json"])).unwrap();
    assert_eq!(parts["partitions"][0]["filesystem"], "ntfs", "{parts}");
    for dir in ["/", "/Users/alice", "/Users/alice/Documents"] {
        let mut got: Vec<(String, u64)> = files(&a, &id, dir, Some(1))
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["size"].as_u64().unwrap(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, ntfsls(&fs, dir), "{dir}");
    }
    let kinds = files(&a, &id, "/Users/alice", Some(1));
    let docs = kinds.iter().find(|e| e["name"] == "Documents").unwrap();
    assert_eq!(docs["kind"], "dir");
    let out = t.path().join("out");
    a.ok(&[
        "restore",
        &id,
        "--file",
        "/Users",
        "--partition",
        "1",
        "--to",
        out.to_str().unwrap(),
    ]);
    for f in [
        "Users/alice/notes.txt",
        "Users/alice/Documents/report.bin",
        "Users/alice/Documents/Überblick – 2026.txt",
    ] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
    let o = a.cli(&["files", &id, "/Users/nobody", "--partition", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}
