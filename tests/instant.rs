//! Restores that do not wait: `novabackup mount` serves a snapshot over
//! NBD straight from the store (read-only, or writable into a local
//! overlay; `mount promote` makes it a real image), and `restore --live`
//! attaches the target at once while a job fills it. Checked with real
//! clients: qemu-img compare against the full restore, qemu-io writes and
//! reads, and a kill -9 of the agent in the middle of a live restore.

#[path = "harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

use harness::*;

const MIB: u64 = 1 << 20;

/// An image with data, zeroes and a hole, backed up; returns the agent,
/// the snapshot id and the image.
fn backed_up(t: &Path, size: u64, extra: &[&str]) -> (Agent, String, PathBuf) {
    let img = t.join("vm.img");
    random_file(&img, size as usize, 7);
    // A zero run the store keeps as zero chunks.
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", img.display()),
            "bs=1M",
            "seek=2",
            "count=3",
            "conv=notrunc",
            "status=none",
        ],
    );
    let faults = t.join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    let a = Agent::start_env(
        &t.join("agent"),
        extra,
        &[("NOVABACKUP_TEST_FAULTS", faults.to_str().unwrap())],
    );
    a.attach("vm", &img, &[]);
    let r: serde_json::Value = serde_json::from_str(&a.ok(&["backup", "vm", "--json"])).unwrap();
    let id = r["snapshot"].as_str().unwrap().to_string();
    (a, id, img)
}

/// [`backed_up`] with a restore folder `dest` the agent may write into.
fn with_dest(t: &Path, size: u64) -> (Agent, String, PathBuf, PathBuf) {
    let dest = t.join("dest");
    std::fs::create_dir(&dest).unwrap();
    let (a, id, img) = backed_up(t, size, &["--restore-dir", dest.to_str().unwrap()]);
    (a, id, img, dest)
}

fn qemu_io(uri: &str, cmd: &str) -> std::process::Output {
    peer("qemu-io")
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .unwrap()
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let o = qemu_io(uri, cmd);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmd} on {uri}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes through NBD with libnbd and disconnects without a flush (unlike
/// qemu-io, which flushes on exit): only what the proxy does before each
/// write keeps it.
fn nbd_write_unflushed(uri: &str, off: u64, len: u64, pattern: u8) {
    run(
        "nbdsh",
        &[
            "-u",
            uri,
            "-c",
            &format!("h.pwrite(bytes([{pattern}]) * {len}, {off})"),
        ],
    );
}

/// Writes `len` bytes of `pattern` at `off` into a plain file, as the
/// qemu-io write did through NBD.
fn apply(img: &Path, off: u64, len: u64, pattern: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&vec![pattern; len as usize], off).unwrap();
}

/// Every byte of the store's packs: what a mount must never change.
fn packs(state: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in walk(&state.join("store").join("packs")) {
        v.push((e.clone(), std::fs::read(&e).unwrap()));
    }
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn snapshot(a: &Agent, id: &str) -> serde_json::Value {
    serde_json::from_str(&a.ok(&["snapshot", "show", id])).unwrap()
}

#[test]
fn mounts_read_like_the_full_restore_and_writes_never_reach_the_store() {
    let t = tempdir();
    let (a, id, _img) = backed_up(t.path(), 24 * MIB + 4096, &[]);
    let full = t.path().join("full.img");
    a.ok(&["restore", &id, "--to", full.to_str().unwrap()]);
    let before = packs(&a.state());
    let snaps_before = a.ok(&["snapshots", "--json"]);

    let ro: serde_json::Value =
        serde_json::from_str(&a.ok(&["mount", &id, "--name", "ro", "--json"])).unwrap();
    assert_eq!(ro["writable"], false);
    assert_eq!(
        snapshot(&a, &id)["protected"],
        true,
        "a mounted snapshot is protected"
    );
    // The whole export equals the full restore (qemu-img reads every
    // byte: the mount reports unfetched blocks as data, not holes).
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            full.to_str().unwrap(),
            &a.uri("ro"),
        ],
    );
    let o = qemu_io(&a.uri("ro"), "write -P 0x11 0 4096");
    assert!(
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"),
        "a read-only mount took a write"
    );

    a.ok(&["mount", &id, "--name", "rw", "--writable"]);
    qemu_io_ok(&a.uri("rw"), "write -P 0x5a 1048576 65536");
    qemu_io_ok(&a.uri("rw"), "write -P 0xa5 20971000 5000");
    qemu_io_ok(&a.uri("rw"), "read -P 0x5a 1048576 65536");
    // The rest still reads as the snapshot.
    let want = full.clone();
    let mut expect = std::fs::read(&want).unwrap();
    expect[1048576..1048576 + 65536].fill(0x5a);
    expect[20971000..20971000 + 5000].fill(0xa5);
    let copy = t.path().join("rw-copy.img");
    run("nbdcopy", &[&a.uri("rw"), copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "the writable mount reads as snapshot + writes"
    );

    // Listed as mounts, not as disks; a mount is not a disk to back up.
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["mounts", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ro", "rw"]);
    assert!(!a.ok(&["disk", "list"]).contains("rw"));
    let o = a.cli(&["backup", "rw"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is a mount"));

    // The store is untouched: same packs byte for byte, same snapshots,
    // and the snapshot still restores to what it was.
    assert!(
        packs(&a.state()) == before,
        "a mount changed the store's packs"
    );
    a.ok(&["unmount", "rw"]);
    a.ok(&["unmount", "ro"]);
    assert_eq!(a.ok(&["snapshots", "--json"]), snaps_before);
    assert_eq!(
        snapshot(&a, &id)["protected"],
        false,
        "unmount lifts the protection"
    );
    a.ok(&["verify", &id]);
    a.restore_and_compare(&id, &t.path().join("again.img"), &full);
    assert!(
        walk(&a.state().join("mounts")).is_empty(),
        "overlays are removed at unmount"
    );
}

#[test]
fn mounts_survive_a_restart_and_promote_to_a_real_image() {
    let t = tempdir();
    let (mut a, id, img, dest) = with_dest(t.path(), 16 * MIB);
    a.ok(&["mount", &id, "--name", "boot", "--writable"]);
    qemu_io_ok(&a.uri("boot"), "write -P 0x33 4096 8192");
    a.stop();
    a.restart();
    // The overlay kept the write across the restart.
    qemu_io_ok(&a.uri("boot"), "read -P 0x33 4096 8192");
    let to = dest.join("promoted.img");
    a.ok(&["mount", "promote", "boot", "--to", to.to_str().unwrap()]);
    // Still served, from the new place, while and after it was filled.
    qemu_io_ok(&a.uri("boot"), "read -P 0x33 4096 8192");
    let expect = t.path().join("expect.img");
    std::fs::copy(&img, &expect).unwrap();
    apply(&expect, 4096, 8192, 0x33);
    compare_images(&to, &expect);
    a.ok(&["unmount", "boot"]);
    assert!(to.exists(), "a promoted image stays after unmount");
    compare_images(&to, &expect);
    // Promotion outside the restore folders is refused.
    a.ok(&["mount", &id, "--name", "m2"]);
    let o = a.cli(&[
        "mount",
        "promote",
        "m2",
        "--to",
        t.path().join("x.img").to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "promote outside the restore folders");
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside the restore folders"));
}

/// Writes a client makes during a live restore: (offset, length, pattern).
const WRITES: [(u64, u64, u8); 4] = [
    (0, 4096, 0x41),
    (3 * MIB + 100, 70_000, 0x42),
    (40 * MIB - 4096, 4096, 0x43),
    (63 * MIB, MIB, 0x44),
];

#[test]
fn a_live_restore_serves_at_once_and_keeps_every_guest_write() {
    let t = tempdir();
    let (a, id, img, dest) = with_dest(t.path(), 64 * MIB);
    std::fs::write(t.path().join("faults").join("fill-slow"), b"").unwrap();
    let target = dest.join("live.img");
    let job = a.ok(&[
        "restore",
        &id,
        "--to",
        target.to_str().unwrap(),
        "--live",
        "--attach",
        "vm2",
        "--no-wait",
    ]);
    let job = job.trim().to_string();
    let vm2 = disk(&a, "vm2");
    let r = &vm2["restoring"];
    assert!(
        r["filled"].as_u64().unwrap() < r["chunks"].as_u64().unwrap(),
        "the fill is still running: {vm2}"
    );
    for &(off, len, p) in &WRITES {
        qemu_io_ok(&a.uri("vm2"), &format!("write -P {p} {off} {len}"));
    }
    let o = a.cli(&["backup", "vm2"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("being live-restored"),
        "no backup of a disk still being filled"
    );
    let copy = t.path().join("read.bin");
    run("nbdcopy", &[&a.uri("vm2"), copy.to_str().unwrap()]);
    std::fs::remove_file(t.path().join("faults").join("fill-slow")).unwrap();
    let expect = t.path().join("expect.img");
    std::fs::copy(&img, &expect).unwrap();
    for &(off, len, p) in &WRITES {
        apply(&expect, off, len, p);
    }
    compare_images(&copy, &expect);
    let done: serde_json::Value =
        serde_json::from_str(&a.ok(&["job", "wait", &job, "--json"])).unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    compare_images(&target, &expect);
    // A plain disk now: change tracking has exactly the guest's writes,
    // and it backs up.
    let vm2 = disk(&a, "vm2");
    assert!(vm2.get("restoring").is_none(), "{vm2}");
    assert_eq!(snapshot(&a, &id)["protected"], false);
    a.ok(&["backup", "vm2"]);
}

#[test]
fn a_live_restore_killed_midway_resumes_without_losing_guest_writes() {
    let t = tempdir();
    let (mut a, id, img, dest) = with_dest(t.path(), 64 * MIB);
    std::fs::write(t.path().join("faults").join("fill-pause"), b"").unwrap();
    let target = dest.join("live.img");
    // The VM's disk is lost: its name comes back on the restored image.
    a.ok(&["disk", "detach", "vm"]);
    a.ok(&[
        "restore",
        &id,
        "--to",
        target.to_str().unwrap(),
        "--live",
        "--no-wait",
    ]);
    for &(off, len, p) in &WRITES[..2] {
        nbd_write_unflushed(&a.uri("vm"), off, len, p);
    }
    // Reads fill chunks whose bits are not on disk yet at the kill.
    run(
        "nbdsh",
        &["-u", &a.uri("vm"), "-c", "h.pread(1048576, 50331648)"],
    );
    let d: serde_json::Value = serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
    let r = d[0]["restoring"].clone();
    assert!(
        r["filled"].as_u64().unwrap() < r["chunks"].as_u64().unwrap(),
        "killed mid-fill: {d}"
    );
    a.kill9();
    std::fs::remove_file(t.path().join("faults").join("fill-pause")).unwrap();
    a.restart();
    for &(off, len, p) in &WRITES[2..] {
        qemu_io_ok(&a.uri("vm"), &format!("write -P {p} {off} {len}"));
    }
    let jobs: serde_json::Value = serde_json::from_str(&a.ok(&["jobs", "--json"])).unwrap();
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "live-restore")
        .expect("the live restore resumed as a job")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done: serde_json::Value =
        serde_json::from_str(&a.ok(&["job", "wait", &job, "--json"])).unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    let expect = t.path().join("expect.img");
    std::fs::copy(&img, &expect).unwrap();
    for &(off, len, p) in &WRITES {
        apply(&expect, off, len, p);
    }
    compare_images(&target, &expect);
}

/// Disk `name` of `disk list --json`.
fn disk(a: &Agent, name: &str) -> serde_json::Value {
    let d: serde_json::Value = serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
    d.as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap()
        .clone()
}

#[test]
fn a_cancelled_live_restore_pauses_keeps_serving_and_resumes_on_demand() {
    let t = tempdir();
    let (a, id, img, dest) = with_dest(t.path(), 16 * MIB);
    let pause = t.path().join("faults").join("fill-pause");
    std::fs::write(&pause, b"").unwrap();
    let target = dest.join("live.img");
    let job = a.ok(&[
        "restore",
        &id,
        "--to",
        target.to_str().unwrap(),
        "--live",
        "--attach",
        "vm2",
        "--no-wait",
    ]);
    let job = job.trim().to_string();
    let o = a.cli(&["job", "resume", &job]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("already"), "{err}");
    a.ok(&["job", "cancel", &job]);
    let done: serde_json::Value =
        serde_json::from_str(&a.ok(&["job", "wait", &job, "--json"])).unwrap();
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("job resume"),
        "{done}"
    );
    // Paused, not abandoned: the disk serves and takes writes, and no
    // job is named as filling it.
    let (off, len, p) = WRITES[0];
    qemu_io_ok(&a.uri("vm2"), &format!("write -P {p} {off} {len}"));
    let vm2 = disk(&a, "vm2");
    let r = &vm2["restoring"];
    assert!(r["filled"].as_u64() < r["chunks"].as_u64(), "{vm2}");
    assert!(r["job"].is_null(), "a paused fill names no job: {vm2}");
    // Resuming needs an admin, and a fill to resume.
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["token", "create", "ops", "--role", "backup", "--json"]))
            .unwrap();
    let (s, body) = call(
        &a,
        v["token"].as_str().unwrap(),
        "POST",
        &format!("/api/v1/jobs/{job}/resume"),
        "",
    );
    assert_eq!(s, 403, "{body}");
    let backup_job = a.ok(&["backup", "vm", "--no-wait"]);
    let o = a.cli(&["job", "resume", backup_job.trim()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("only a live restore or a promotion"), "{err}");
    std::fs::remove_file(&pause).unwrap();
    let out = a.ok(&["job", "resume", &job]);
    assert!(out.contains("succeeded"), "{out}");
    let expect = t.path().join("expect.img");
    std::fs::copy(&img, &expect).unwrap();
    apply(&expect, off, len, p);
    compare_images(&target, &expect);
    assert!(disk(&a, "vm2").get("restoring").is_none());
    let o = a.cli(&["job", "resume", &job]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nothing left to fill"), "{err}");
}

/// A call to the API with `token`: (status, error code or body).
fn call(a: &Agent, token: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let r = ureq::request(method, &format!("http://{}{path}", a.api))
        .set("Authorization", &format!("Bearer {token}"))
        .set("Content-Type", "application/json")
        .send_string(body);
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

#[test]
fn mounts_and_live_restores_need_an_admin_and_overlays_are_private() {
    let t = tempdir();
    let (a, id, _img, dest) = with_dest(t.path(), 4 * MIB);
    let token = |role: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&a.ok(&["token", "create", role, "--role", role, "--json"]))
                .unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let backup = token("backup");
    let ro = token("read-only");
    let live = format!(
        r#"{{"snapshot":"{id}","target":"{}","live":true,"attach":"x"}}"#,
        dest.join("l.img").display()
    );
    for t in [&backup, &ro] {
        let (s, body) = call(&a, t, "POST", "/api/v1/restores", &live);
        assert_eq!(s, 403, "{body}");
        let (s, body) = call(
            &a,
            t,
            "POST",
            "/api/v1/mounts",
            &format!(r#"{{"snapshot":"{id}"}}"#),
        );
        assert_eq!(s, 403, "{body}");
    }
    assert!(
        !dest.join("l.img").exists(),
        "a refused live restore wrote nothing"
    );
    // A live restore outside the restore folders is refused, as a restore is.
    let out = t.path().join("out.img");
    let o = a.cli(&[
        "restore",
        &id,
        "--to",
        out.to_str().unwrap(),
        "--live",
        "--attach",
        "y",
    ]);
    assert!(
        !o.status.success() && !out.exists(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // `attach` without `live` is a clear 400.
    let admin = std::fs::read_to_string(a.state().join("api.token")).unwrap();
    let body = format!(
        r#"{{"snapshot":"{id}","target":"{}","attach":"x"}}"#,
        dest.join("n.img").display()
    );
    let (s, text) = call(&a, admin.trim(), "POST", "/api/v1/restores", &body);
    assert!(s == 400 && text.contains("add `live`"), "{s} {text}");
    let (s, text) = call(&a, &ro, "GET", "/api/v1/mounts", "");
    assert_eq!(s, 200, "{text}");

    a.ok(&["mount", &id, "--name", "m", "--writable"]);
    qemu_io_ok(&a.uri("m"), "write -P 0x77 0 4096");
    let overlay = a.state().join("mounts").join("m.img");
    assert!(overlay.exists());
    // nobody can neither read the overlay nor list the folder it is in.
    for target in [overlay.clone(), a.state().join("mounts")] {
        let o = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
            .arg(&target)
            .output()
            .unwrap();
        assert!(!o.status.success(), "nobody read {}", target.display());
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&overlay).unwrap().permissions().mode() & 0o077,
        0
    );
    // Unmounting by a name that is a disk, or detaching a mount, is refused.
    let o = a.cli(&["disk", "detach", "m"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a mount"));
    let o = a.cli(&["unmount", "vm"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no mount named"));
}

#[test]
fn a_live_restore_onto_a_block_device_writes_zeroes_too() {
    let t = tempdir();
    // The device holds old data everywhere: zero chunks of the snapshot
    // must be written, not skipped as on a new sparse file.
    let backing = t.path().join("dev.img");
    random_file(&backing, 16 * MIB as usize, 99);
    let dev = LoopDev::attach(&backing);
    let devs = dev.0.to_str().unwrap().to_string();
    let (a, id, img) = backed_up(t.path(), 16 * MIB, &["--restore-device", &devs]);
    a.ok(&[
        "restore", &id, "--to", &devs, "--live", "--attach", "blk", "--force",
    ]);
    qemu_io_ok(&a.uri("blk"), "write -P 0x5e 2097152 4096");
    let expect = t.path().join("expect.img");
    std::fs::copy(&img, &expect).unwrap();
    apply(&expect, 2 * MIB, 4096, 0x5e);
    a.ok(&["disk", "detach", "blk"]);
    compare_images(&dev.0, &expect);
}
