//! Malformed and edge-case NBD traffic from a raw-socket client
//! (tests/nbd_raw.py), on both engines: each gets the error the NBD spec
//! names or a clean disconnect, and the agent keeps serving.

#[path = "harness.rs"]
mod harness;

use harness::*;

const SCENARIOS: [&str; 7] = [
    "options",
    "simple-errors",
    "structured",
    "bad-magic",
    "oversized-write",
    "garbage-handshake",
    "spec-divergences",
];

fn raw(a: &Agent, export: &str, scenario: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/nbd_raw.py");
    let o = peer("python3")
        .args([script, a.socket.to_str().unwrap(), export, scenario])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{scenario} on {}: {}\n{}",
        a.engine,
        String::from_utf8_lossy(&o.stderr),
        a.log()
    );
}

#[test]
fn malformed_requests_get_spec_errors() {
    for engine in ENGINES {
        let t = tempdir();
        let img = t.path().join("disk.img");
        sparse_file(&img, 1 << 20);
        let ro = t.path().join("ro.img");
        sparse_file(&ro, 1 << 20);
        let a = Agent::start(&t.path().join("a"), engine);
        a.attach("vm", &img, &[]);
        a.attach("ro", &ro, &["--read-only"]);
        for s in SCENARIOS {
            raw(&a, "vm", s);
        }
        raw(&a, "ro", "read-only");
        // Nothing outside the image was touched and the agent still serves.
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
        assert_eq!(std::fs::metadata(&ro).unwrap().len(), 1 << 20);
        run(
            "qemu-io",
            &["-f", "raw", "-c", "read -P 0x77 4096 1", &a.uri("vm")],
        );
        let h: serde_json::Value =
            serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
        assert_eq!(h.as_array().unwrap().len(), 2);
    }
}

#[test]
fn nbdsh_edge_requests_with_strict_mode_off() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    sparse_file(&img, 1 << 20);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let script = r#"
import errno
h.set_strict_mode(0)
def expect(f, err):
    try:
        f()
    except nbd.Error as e:
        assert e.errno == errno.errorcode[err], (e.errno, err)
        return
    raise AssertionError("no error")
size = h.get_size()
expect(lambda: h.pread(2, size - 1), errno.EINVAL)
expect(lambda: h.pwrite(b"ab", size - 1), errno.ENOSPC)
expect(lambda: h.trim(4096, size), errno.EINVAL)
expect(lambda: h.zero(4096, size), errno.ENOSPC)
expect(lambda: h.cache(4096, size), errno.EINVAL)
h.pwrite(b"ok", 0)
assert h.pread(2, 0) == b"ok"
h.cache(4096, 0)
print("edge ok")
"#;
    let out = run("nbdsh", &["-u", &a.uri("vm"), "-c", script]);
    assert!(out.contains("edge ok"), "{out}");
}
