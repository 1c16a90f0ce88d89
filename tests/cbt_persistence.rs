//! The bitmap across agent restarts: clean stop, kill -9, and a host crash
//! simulated by a changed boot id. Plus graceful SIGTERM with clients.

#[path = "harness.rs"]
mod harness;

use harness::*;

const G: u64 = 65536;

fn setup() -> (tempfile::TempDir, Agent) {
    let t = tempdir();
    let img = t.path().join("disk.img");
    sparse_file(&img, 32 << 20);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    (t, a)
}

fn write(a: &Agent, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let uri = a.uri("vm");
    args.push(&uri);
    run("qemu-io", &args);
}

#[test]
fn kill_9_then_restart_keeps_the_bitmap() {
    let (_t, mut a) = setup();
    write(&a, &["write 0 4k", "write 10M 200k", "write 31M 1"]);
    let before = dirty_blocks(&dirty_map(&a.uri("vm")), G);
    assert_eq!(before.len(), 1 + 4 + 1);
    a.kill9();
    a.restart();
    assert_eq!(dirty_blocks(&dirty_map(&a.uri("vm")), G), before);
    let cbt = a.cbt("vm");
    assert_eq!(cbt["trusted"], true, "{cbt}");
    // Tracking goes on after the restart.
    write(&a, &["write 20M 4k"]);
    assert_eq!(a.cbt("vm")["dirty_blocks"], 7);
}

#[test]
fn clean_restart_keeps_the_bitmap_even_after_a_reboot() {
    let (_t, mut a) = setup();
    write(&a, &["write 1M 64k", "write 2M 1"]);
    a.stop();
    std::fs::write(&a.boot_file, "boot-2\n").unwrap();
    a.restart();
    assert_eq!(dirty_blocks(&dirty_map(&a.uri("vm")), G), vec![16, 32]);
    assert_eq!(a.cbt("vm")["trusted"], true);
    let disks: serde_json::Value =
        serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
    assert_eq!(disks[0]["name"], "vm");
}

#[test]
fn host_crash_makes_the_bitmap_untrusted_until_reset() {
    let (_t, mut a) = setup();
    write(&a, &["write 1M 64k"]);
    a.kill9();
    std::fs::write(&a.boot_file, "boot-after-crash\n").unwrap();
    a.restart();
    let cbt = a.cbt("vm");
    assert_eq!(cbt["trusted"], false, "{cbt}");
    let reason = cbt["reason"].as_str().unwrap();
    assert!(
        reason.contains("boot id") && reason.contains("whole disk"),
        "{reason}"
    );
    let text = a.ok(&["disk", "cbt", "vm"]);
    assert!(text.contains("trusted:      no"), "{text}");
    // Still untrusted after another clean restart: nothing proved it since.
    a.stop();
    a.restart();
    assert_eq!(a.cbt("vm")["trusted"], false);
    a.ok(&["disk", "cbt", "vm", "--reset"]);
    let cbt = a.cbt("vm");
    assert_eq!(cbt["trusted"], true);
    assert_eq!(cbt["dirty_blocks"], 0);
}

#[test]
fn sigterm_with_connected_clients_stops_cleanly() {
    let (_t, mut a) = setup();
    // A client that stays connected and idle.
    let mut idle = peer("nbdsh")
        .args([
            "-u",
            &a.uri("vm"),
            "-c",
            "import time\nh.pwrite(b'q', 5*1024*1024)\ntime.sleep(30)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.cbt("vm")["dirty_blocks"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "client write never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.stop();
    let _ = idle.kill();
    let _ = idle.wait();
    assert!(a.log().contains("bitmap saved"), "{}", a.log());
    std::fs::write(&a.boot_file, "boot-3\n").unwrap();
    a.restart();
    assert_eq!(dirty_blocks(&dirty_map(&a.uri("vm")), G), vec![80]);
    assert_eq!(a.cbt("vm")["trusted"], true);
}
