//! Looking into snapshots without a restore. `novabackup partitions`: the
//! partition table of a snapshot's disk against what sfdisk and blkid say
//! of the same image. `novabackup files` and `restore --file` on ext4
//! (inline data included) against the tree it was made from and debugfs.
//! Images are made with the real tools: sfdisk for GPT and MBR tables
//! (with a logical partition in an extended one), mke2fs -d at the
//! partitions' offsets, mkswap. FAT and NTFS: browse_fat_ntfs.rs.

#[path = "harness.rs"]
mod harness;
#[path = "browse_util.rs"]
mod util;

use std::path::Path;

use harness::*;
use util::*;

/// Backs up `img` through a fresh agent and returns the partition table
/// the agent reads from the store.
fn partitions_of(t: &Path, img: &Path) -> serde_json::Value {
    let a = Agent::start(&t.join("agent"), "pread");
    a.attach("vm", img, &[]);
    let id = backup_id(&a, "vm");
    // The human form names the scheme too.
    let text = a.ok(&["partitions", &id]);
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["partitions", &id, "--json"])).unwrap();
    let scheme = v["scheme"].as_str().unwrap().to_uppercase();
    assert!(text.contains(&scheme) || scheme == "NONE", "{text}");
    v
}

/// Every partition the agent lists is the one sfdisk lists, with the
/// file system blkid finds there.
fn same_as_the_tools(img: &Path, got: &serde_json::Value) {
    let want = sfdisk(img);
    let parts = got["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), want.len(), "{got:#}\nsfdisk: {want:?}");
    for (p, (n, start, sectors, ty)) in parts.iter().zip(&want) {
        assert_eq!(p["number"].as_u64().unwrap(), u64::from(*n), "{p}");
        assert_eq!(p["start"].as_u64().unwrap(), start * 512, "{p}");
        assert_eq!(p["size"].as_u64().unwrap(), sectors * 512, "{p}");
        let id = p["type_id"].as_str().unwrap().to_uppercase();
        // GPT: the same GUID; MBR: the same byte ("0x0c" here, "c" there).
        let same = match id.strip_prefix("0X") {
            Some(hex) => u8::from_str_radix(hex, 16).ok() == u8::from_str_radix(ty, 16).ok(),
            None => id == *ty,
        };
        assert!(same, "type {id} vs sfdisk's {ty}");
        let fs = blkid(img, start * 512);
        let ours = p["filesystem"].as_str().unwrap_or("");
        if !p["type_name"].as_str().unwrap().starts_with("Extended") {
            assert_eq!(ours, fs, "partition {n}: blkid says {fs:?}");
        }
    }
}

#[test]
fn a_gpt_disk_with_an_efi_partition_two_ext4_and_swap() {
    let t = tempdir();
    let img = t.path().join("gpt.img");
    sfdisk_table(
        &img,
        200 * MIB,
        "label: gpt\n\
         start=2048, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI\"\n\
         size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n\
         size=65536, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"home\"\n\
         size=16384, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n",
    );
    let parts = sfdisk(&img);
    mkfs_at(&img, parts[0].1 * 512, parts[0].2 * 512, "vfat");
    mkfs_at(&img, parts[1].1 * 512, parts[1].2 * 512, "ext4");
    mkfs_at(&img, parts[2].1 * 512, parts[2].2 * 512, "ext2");
    run(
        "sh",
        &[
            "-c",
            &format!(
                "dd if=/dev/zero of=/tmp/nbswap.$$ bs=1M count=8 status=none && mkswap -q /tmp/nbswap.$$ && \
                 dd if=/tmp/nbswap.$$ of={} bs=512 seek={} conv=notrunc status=none; rm -f /tmp/nbswap.$$",
                img.display(),
                parts[3].1
            ),
        ],
    );
    let got = partitions_of(t.path(), &img);
    assert_eq!(got["scheme"], "gpt");
    same_as_the_tools(&img, &got);
    let p = got["partitions"].as_array().unwrap();
    assert_eq!(p[0]["name"], "EFI");
    assert_eq!(p[0]["type_name"], "EFI System");
    assert_eq!(p[1]["name"], "root");
    assert_eq!(p[1]["filesystem"], "ext4");
    assert_eq!(p[3]["filesystem"], "swap");
}

#[test]
fn an_mbr_disk_with_a_logical_partition() {
    let t = tempdir();
    let img = t.path().join("mbr.img");
    sfdisk_table(
        &img,
        160 * MIB,
        "label: dos\n\
         start=2048, size=65536, type=c, bootable\n\
         start=67584, size=204800, type=5\n\
         start=69632, size=81920, type=83\n\
         start=153600, size=61440, type=83\n",
    );
    let parts = sfdisk(&img);
    assert_eq!(parts.len(), 4, "sfdisk: {parts:?}");
    mkfs_at(&img, parts[0].1 * 512, parts[0].2 * 512, "vfat");
    mkfs_at(&img, parts[2].1 * 512, parts[2].2 * 512, "ext4");
    let got = partitions_of(t.path(), &img);
    assert_eq!(got["scheme"], "mbr");
    same_as_the_tools(&img, &got);
    let p = got["partitions"].as_array().unwrap();
    assert_eq!(p[0]["bootable"], true);
    assert_eq!(p[0]["filesystem"], "vfat");
    assert_eq!(p[2]["number"], 5);
    assert_eq!(p[2]["logical"], true);
    assert_eq!(p[2]["filesystem"], "ext4");
    assert_eq!(p[3]["number"], 6);
    assert!(p[3]["filesystem"].is_null());
}

#[test]
fn a_whole_disk_file_system_and_an_empty_disk_have_no_table() {
    let t = tempdir();
    let img = t.path().join("fs.img");
    sparse_file(&img, 64 * MIB);
    mkfs_at(&img, 0, 64 * MIB, "ext4");
    let got = partitions_of(&t.path().join("a"), &img);
    assert_eq!(got["scheme"], "none");
    assert_eq!(got["filesystem"], "ext4");
    assert_eq!(got["disk_size"], 64 * MIB);

    let fat = t.path().join("fat.img");
    sparse_file(&fat, 64 * MIB);
    mkfs_at(&fat, 0, 64 * MIB, "vfat");
    let got = partitions_of(&t.path().join("b"), &fat);
    assert_eq!(
        (got["scheme"].as_str(), got["filesystem"].as_str()),
        (Some("none"), Some("vfat"))
    );

    let empty = t.path().join("empty.img");
    sparse_file(&empty, 8 * MIB);
    let got = partitions_of(&t.path().join("c"), &empty);
    assert_eq!(got["scheme"], "none");
    assert!(got["filesystem"].is_null());
    assert!(got["partitions"].as_array().unwrap().is_empty());
}

#[test]
fn unknown_snapshots_and_other_disks_tokens_are_refused() {
    let t = tempdir();
    let src = t.path().join("tree");
    tree(&src);
    let img = ext4_of(&src, &t.path().join("d.img"));
    let a = Agent::start(&t.path().join("agent"), "pread");
    a.attach("vm", &img, &[]);
    let o = a.cli(&["partitions", "vm@20200101T000000Z"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = a.cli(&["partitions", "not an id"]);
    assert!(!o.status.success());
    let id = backup_id(&a, "vm");
    let as_token = |role: &str, disk: &str, args: &[&str]| {
        let mut create = vec!["token", "create", role, "--role", role, "--json"];
        if !disk.is_empty() {
            create.extend(["--disk", disk]);
        }
        let tok: serde_json::Value = serde_json::from_str(&a.ok(&create)).unwrap();
        std::process::Command::new(BIN)
            .arg("--data-dir")
            .arg(a.state())
            .args(args)
            .env("NOVABACKUP_TOKEN", tok["token"].as_str().unwrap())
            .output()
            .unwrap()
    };
    let out = t.path().join("out");
    let out = out.to_str().unwrap();
    // A token for another disk learns nothing of this one and gets no file.
    for args in [
        vec!["partitions", &id],
        vec!["files", &id, "/etc"],
        vec!["restore", &id, "--file", "/etc/shadow", "--to", out],
    ] {
        let o = as_token("backup", "web", &args);
        assert!(!o.status.success(), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("may not act on disk \"vm\""), "{args:?}: {e}");
    }
    assert!(!Path::new(out).join("shadow").exists());
    // A read-only token may list, not take the files' contents.
    let o = as_token("read-only", "", &["files", &id, "/etc"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = as_token(
        "read-only",
        "",
        &["restore", &id, "--file", "/etc/shadow", "--stdout"],
    );
    assert!(!o.status.success());
    assert!(o.stdout.is_empty(), "a read-only token got file contents");
}

#[test]
fn ext4_folders_in_a_partition_and_on_a_whole_disk_match_their_tree_and_debugfs() {
    let t = tempdir();
    let src = t.path().join("tree");
    tree(&src);
    // On a whole disk, where debugfs can read it too.
    let img = ext4_of(&src, &t.path().join("ext4.img"));
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    let id = backup_id(&a, "vm");
    for dir in ["", "etc", "usr", "usr/bin", "var/many", "empty"] {
        let got = files(&a, &id, &format!("/{dir}"), None);
        assert_eq!(ours(&got), source(&src.join(dir)), "/{dir}");
        let names = debugfs_ls(&img, dir);
        let mine: Vec<String> = got
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(mine, names, "debugfs ls /{dir}");
    }
    let usr = files(&a, &id, "/usr", None);
    let link = usr.iter().find(|e| e["name"] == "hostname-link").unwrap();
    assert_eq!(link["target"], "../etc/hostname");
    let text = a.ok(&["files", &id, "/usr/bin"]);
    assert!(text.starts_with("-rwsr-xr-x"), "{text}");
    // Not there, not a folder.
    let o = a.cli(&["files", &id, "/nope"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = a.cli(&["files", &id, "/etc/hostname"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a folder"));

    // In the second partition of a GPT disk.
    let gpt = t.path().join("gpt.img");
    sfdisk_table(
        &gpt,
        100 * MIB,
        "label: gpt\nstart=2048, size=32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nsize=131072\n",
    );
    let parts = sfdisk(&gpt);
    mkfs_at(&gpt, parts[0].1 * 512, parts[0].2 * 512, "vfat");
    let e = format!("offset={}", parts[1].1 * 512);
    let blocks = (parts[1].2 * 512 / 4096).to_string();
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            &e,
            "-d",
            src.to_str().unwrap(),
            gpt.to_str().unwrap(),
            &blocks,
        ],
    );
    a.attach("gpt", &gpt, &[]);
    let gid = backup_id(&a, "gpt");
    // Two file systems: the operator must say which.
    let o = a.cli(&["files", &gid, "/"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--partition") && err.contains("2 (ext4)"),
        "{err}"
    );
    assert_eq!(
        ours(&files(&a, &gid, "/var/many", Some(2))),
        source(&src.join("var/many"))
    );
    let o = a.cli(&["files", &gid, "/", "--partition", "7"]);
    assert_eq!(o.status.code(), Some(4));
}

#[test]
fn ext4_with_inline_data_lists_and_restores_like_its_tree() {
    let t = tempdir();
    let src = t.path().join("tree");
    tree(&src);
    // Inline in i_block alone (etc/hostname), spilling into the
    // system.data attribute (etc/motd, 100 bytes), an inline folder and a
    // link longer than i_block.
    std::fs::write(src.join("etc/motd"), [b'm'; 100]).unwrap();
    std::fs::create_dir_all(src.join("small")).unwrap();
    std::fs::write(src.join("small/a"), b"a\n").unwrap();
    std::os::unix::fs::symlink("x".repeat(80), src.join("small/long-link")).unwrap();
    let img = t.path().join("inline.img");
    sparse_file(&img, 32 * MIB);
    let i = img.to_str().unwrap();
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "inline_data",
            "-d",
            src.to_str().unwrap(),
            i,
        ],
    );
    // The kernel's own layout too: a folder whose entries fill i_block and
    // go on in the attribute (mke2fs -d moves such a folder to a block).
    let k = src.join("k");
    std::fs::create_dir(&k).unwrap();
    for n in 1..=6 {
        std::fs::write(k.join(format!("f{n}")), format!("{n}\n")).unwrap();
    }
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &["-o", "loop", i, mnt.to_str().unwrap()]);
    let copied = std::process::Command::new("cp")
        .args(["-a", k.to_str().unwrap(), mnt.to_str().unwrap()])
        .status();
    run("umount", &[mnt.to_str().unwrap()]);
    assert!(copied.unwrap().success());
    // What this test claims to read is inline.
    for (p, size) in [
        ("/etc/hostname", 60),
        ("/etc/motd", 100),
        ("/small", 60),
        ("/k", 128),
    ] {
        let stat = run("debugfs", &["-R", &format!("stat {p}"), i]);
        assert!(
            stat.contains(&format!("Size of inline data: {size}")),
            "{p}: {stat}"
        );
    }
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    let id = backup_id(&a, "vm");
    for dir in [
        "", "etc", "usr", "usr/bin", "var/many", "empty", "small", "k",
    ] {
        let got = files(&a, &id, &format!("/{dir}"), None);
        assert_eq!(ours(&got), source(&src.join(dir)), "/{dir}");
        let mine: Vec<String> = got
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(mine, debugfs_ls(&img, dir), "debugfs ls /{dir}");
    }
    let small = files(&a, &id, "/small", None);
    let link = small.iter().find(|e| e["name"] == "long-link").unwrap();
    assert_eq!(link["target"], "x".repeat(80));
    let out = t.path().join("out");
    let mut args = vec!["restore", id.as_str()];
    for p in ["/etc", "/usr", "/small", "/k"] {
        args.extend(["--file", p]);
    }
    args.extend(["--to", out.to_str().unwrap()]);
    a.ok(&args);
    for p in ["etc", "usr", "small", "k"] {
        same_tree(&src.join(p), &out.join(p));
    }
    let o = a.cli(&["restore", &id, "--file", "/etc/motd", "--stdout"]);
    assert_eq!(o.stdout, [b'm'; 100]);
}

#[test]
fn a_file_system_not_read_yet_says_so() {
    let t = tempdir();
    let img = t.path().join("swap.img");
    sparse_file(&img, 16 * MIB);
    run("mkswap", &["-q", img.to_str().unwrap()]);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    let r: serde_json::Value = serde_json::from_str(&a.ok(&["backup", "vm", "--json"])).unwrap();
    let o = a.cli(&["files", r["snapshot"].as_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("swap") && err.contains("restore the whole snapshot"),
        "{err}"
    );
}

#[test]
fn files_and_trees_come_back_equal_to_the_source_with_modes_times_and_links() {
    let t = tempdir();
    let src = t.path().join("tree");
    tree(&src);
    let img = ext4_of(&src, &t.path().join("ext4.img"));
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    let id = backup_id(&a, "vm");
    let out = t.path().join("out");
    let o = out.to_str().unwrap();
    a.ok(&[
        "restore",
        &id,
        "--file",
        "/etc",
        "--file",
        "/usr",
        "--file",
        "/var/many/file-042",
        "--to",
        o,
    ]);
    same_tree(&src.join("etc"), &out.join("etc"));
    same_tree(&src.join("usr"), &out.join("usr"));
    assert_eq!(std::fs::read(out.join("file-042")).unwrap(), b"42");
    // Again without --force: nothing is overwritten.
    let again = a.cli(&["restore", &id, "--file", "/etc", "--to", o]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    a.ok(&["restore", &id, "--file", "/etc", "--to", o, "--force"]);
    // One file to standard output.
    let o = a.cli(&["restore", &id, "--file", "/usr/bin/tool", "--stdout"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, std::fs::read(src.join("usr/bin/tool")).unwrap());
    let o = a.cli(&["restore", &id, "--file", "/etc", "--stdout"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a regular file"));
    // A path that is not there fails before any byte is written.
    let o = a.cli(&[
        "restore",
        &id,
        "--file",
        "/etc/nope",
        "--to",
        t.path().join("none").to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
