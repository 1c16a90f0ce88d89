//! `novabackup partitions`: the partition table of a snapshot's disk, read
//! from the store without a restore, against what sfdisk and blkid say of
//! the same image. Images are made with the real tools: sfdisk for GPT and
//! MBR tables (with a logical partition in an extended one), mke2fs and
//! mkfs.vfat at the partitions' offsets, mkswap.

#[path = "harness.rs"]
mod harness;

use std::path::Path;

use harness::*;

const MIB: u64 = 1 << 20;

/// Lays out `script` with sfdisk on a new sparse image of `size` bytes.
fn table(img: &Path, size: u64, script: &str) {
    sparse_file(img, size);
    let mut c = std::process::Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (apt-get install fdisk)");
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk failed on {script}");
}

/// `sfdisk --json`'s partitions: (number, start sector, sectors, type).
fn sfdisk(img: &Path) -> Vec<(u32, u64, u64, String)> {
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
fn blkid(img: &Path, offset: u64) -> String {
    let o = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", "--offset"])
        .arg(offset.to_string())
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn mkfs_at(img: &Path, offset: u64, size: u64, fs: &str) {
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

/// Backs up `img` through a fresh agent and returns the partition table
/// the agent reads from the store.
fn partitions_of(t: &Path, img: &Path) -> serde_json::Value {
    let a = Agent::start(&t.join("agent"), "pread");
    a.attach("vm", img, &[]);
    let r: serde_json::Value = serde_json::from_str(&a.ok(&["backup", "vm", "--json"])).unwrap();
    let id = r["snapshot"].as_str().unwrap().to_string();
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
    table(
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
    table(
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
    let img = t.path().join("d.img");
    sparse_file(&img, 8 * MIB);
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
    let r: serde_json::Value = serde_json::from_str(&a.ok(&["backup", "vm", "--json"])).unwrap();
    let id = r["snapshot"].as_str().unwrap();
    // A token for another disk learns nothing of this one.
    let tok: serde_json::Value = serde_json::from_str(&a.ok(&[
        "token", "create", "other", "--role", "backup", "--disk", "web", "--json",
    ]))
    .unwrap();
    let o = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(a.state())
        .args(["partitions", id])
        .env("NOVABACKUP_TOKEN", tok["token"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("may not act on disk \"vm\""), "{e}");
}
