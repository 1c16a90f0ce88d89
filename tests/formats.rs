//! On-disk formats stay readable across upgrades. `tests/fixtures/formats/`
//! holds, per release, an agent's state folder as that release left it
//! after a clean stop: the store (its format file, packs, index,
//! manifests), the change-tracking bitmap with writes recorded after the
//! last backup, the disk list and a schedule. The current agent must pick
//! each one up as an upgraded package would: the bitmap trusted with the
//! same dirty blocks, the snapshot restorable and verifiable, the schedule
//! kept, and the next backup incremental on the old snapshot.
//!
//! A release that changes a format adds its own fixture with
//! `NOVABACKUP_WRITE_FIXTURE=VERSION cargo test --test formats -- --ignored`
//! and keeps the older ones passing.

#[path = "harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

use harness::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
/// Where the disk image sits in a fixture's disks.json; the test puts
/// its own path there.
const IMAGE_MARK: &str = "@IMAGE@";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/formats")
}

/// What the disk holds at the backup (`after` false) and at the clean stop.
fn image_bytes(after: bool) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    v[..MIB as usize].fill(0x41);
    v[(3 * MIB) as usize..(3 * MIB + MIB / 2) as usize].fill(0x42);
    if after {
        v[(5 * MIB) as usize..(5 * MIB + 128 * 1024) as usize].fill(0x43);
    }
    v
}

fn qemu_write(a: &Agent, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    run("qemu-io", &["-f", "raw", "-c", &cmd, &a.uri("vm")]);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// Writes the fixture of this build's formats; run once per release that
/// changes a format.
#[test]
#[ignore = "writes a fixture; run with NOVABACKUP_WRITE_FIXTURE=VERSION"]
fn write_fixture() {
    let Ok(version) = std::env::var("NOVABACKUP_WRITE_FIXTURE") else {
        panic!("set NOVABACKUP_WRITE_FIXTURE to the release's version");
    };
    let t = tempdir();
    let img = t.path().join("disk.img");
    sparse_file(&img, SIZE);
    let mut a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    qemu_write(&a, 0x41, 0, MIB);
    qemu_write(&a, 0x42, 3 * MIB, MIB / 2);
    let r = json(&a.ok(&["backup", "vm", "--json"]));
    assert_eq!(r["kind"], "full");
    a.ok(&[
        "schedule",
        "add",
        "backup",
        "--cron",
        "0 3 * * *",
        "--disk",
        "vm",
        "--id",
        "nightly",
    ]);
    qemu_write(&a, 0x43, 5 * MIB, 128 * 1024);
    a.stop();
    assert_eq!(std::fs::read(&img).unwrap(), image_bytes(true));

    let out = fixtures().join(&version);
    let _ = std::fs::remove_dir_all(&out);
    copy_tree(&a.state(), &out.join("state"));
    // Not formats: what the running agent says of itself, and its secret.
    for transient in ["agent.json", "restores", "api.token"] {
        let p = out.join("state").join(transient);
        let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
    }
    let disks = out.join("state/disks.json");
    let text = std::fs::read_to_string(&disks).unwrap();
    std::fs::write(&disks, text.replace(img.to_str().unwrap(), IMAGE_MARK)).unwrap();
    std::fs::write(
        out.join("formats.json"),
        serde_json::to_string_pretty(&formats_of(&out.join("state"))).unwrap() + "\n",
    )
    .unwrap();
    std::fs::write(
        out.join("snapshot"),
        format!("{}\n", r["snapshot"].as_str().unwrap()),
    )
    .unwrap();
}

/// Every fixture: the format numbers it carries, then the agent's view.
#[test]
fn the_current_agent_reads_every_earlier_release_s_state() {
    let mut seen = 0;
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let dir = e.unwrap().path();
        if dir.join("state").is_dir() {
            reads_fixture(&dir);
            seen += 1;
        }
    }
    assert!(seen >= 1, "no fixture in {}", fixtures().display());
}

/// The version fields of each file, read straight from the bytes, so a
/// fixture says which formats it stands for.
fn formats_of(state: &Path) -> serde_json::Value {
    let store = json(&std::fs::read_to_string(state.join("store/store.json")).unwrap());
    let bitmap = std::fs::read(state.join("cbt/vm.cbt")).unwrap();
    let mut manifests = Vec::new();
    for e in std::fs::read_dir(state.join("store/snapshots/vm")).unwrap() {
        let m = json(&std::fs::read_to_string(e.unwrap().path()).unwrap());
        manifests.push(m["format"].clone());
    }
    let mut packs = Vec::new();
    visit(&state.join("store/packs"), &mut |p| {
        let b = std::fs::read(p).unwrap();
        packs.push(u32::from_le_bytes(b[8..12].try_into().unwrap()));
    });
    packs.sort_unstable();
    serde_json::json!({
        "store": store["format"],
        "bitmap": u32::from_le_bytes(bitmap[8..12].try_into().unwrap()),
        "bitmap_magic": String::from_utf8_lossy(&bitmap[..8]),
        "manifests": manifests,
        "packs": packs,
    })
}

fn visit(dir: &Path, f: &mut dyn FnMut(&Path)) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            visit(&p, f);
        } else {
            f(&p);
        }
    }
}

fn reads_fixture(fixture: &Path) {
    let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
    let want: serde_json::Value =
        json(&std::fs::read_to_string(fixture.join("formats.json")).unwrap());
    assert_eq!(
        formats_of(&fixture.join("state")),
        want,
        "fixture {name}: its files carry other versions than formats.json says"
    );
    let snapshot = std::fs::read_to_string(fixture.join("snapshot"))
        .unwrap()
        .trim()
        .to_string();

    let t = tempdir();
    let state = t.path().join("a/state");
    copy_tree(&fixture.join("state"), &state);
    let img = t.path().join("disk.img");
    std::fs::write(&img, image_bytes(true)).unwrap();
    let disks = state.join("disks.json");
    let text = std::fs::read_to_string(&disks).unwrap();
    assert!(
        text.contains(IMAGE_MARK),
        "{name}: disks.json has no image mark"
    );
    std::fs::write(&disks, text.replace(IMAGE_MARK, img.to_str().unwrap())).unwrap();
    // Another boot than the fixture's: the bitmap is trusted only because
    // the old agent stopped cleanly, as after a package upgrade.
    std::fs::write(t.path().join("a/boot_id"), "boot-after-upgrade\n").unwrap();
    let a = Agent::start(&t.path().join("a"), "uring");

    let cbt = a.cbt("vm");
    assert_eq!(cbt["trusted"], true, "{name}: {cbt}");
    assert_eq!(cbt["dirty_bytes"], 128 * 1024, "{name}: {cbt}");
    let snaps = json(&a.ok(&["snapshots", "--json"]));
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [snapshot.as_str()], "{name}");
    let sched = json(&a.ok(&["schedule", "list", "--json"]));
    assert_eq!(sched[0]["id"], "nightly", "{name}: {sched}");
    assert_eq!(sched[0]["spec"]["cron"], "0 3 * * *", "{name}: {sched}");

    a.ok(&["verify", &snapshot]);
    let old = t.path().join("old.img");
    std::fs::write(t.path().join("want-old.img"), image_bytes(false)).unwrap();
    a.restore_and_compare(&snapshot, &old, &t.path().join("want-old.img"));

    let r = json(&a.ok(&["backup", "vm", "--json"]));
    assert_eq!(r["kind"], "incremental", "{name}: {r}");
    assert_eq!(r["parent"], snapshot.as_str(), "{name}: {r}");
    assert_eq!(r["stats"]["bytes_read"], 128 * 1024, "{name}: {r}");
    let new = t.path().join("new.img");
    a.restore_and_compare(r["snapshot"].as_str().unwrap(), &new, &img);
}
