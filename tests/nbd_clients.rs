//! Real NBD clients against the real agent, on both data engines:
//! qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh and fio.

#[path = "harness.rs"]
mod harness;

use harness::*;

fn agent_with_disk(engine: &str, size: u64) -> (tempfile::TempDir, Agent, std::path::PathBuf) {
    let t = tempdir();
    let img = t.path().join("disk.img");
    sparse_file(&img, size);
    let a = Agent::start(&t.path().join(engine), engine);
    a.attach("vm", &img, &[]);
    (t, a, img)
}

#[test]
fn qemu_io_patterns_and_aio_bursts() {
    for engine in ENGINES {
        let (_t, a, img) = agent_with_disk(engine, 64 << 20);
        let uri = a.uri("vm");
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xa1 0 64k",
                "-c",
                "write -P 0xb2 1000 3000",
                "-c",
                "write -P 0xc3 63M 1M",
                "-c",
                "aio_write -P 0x11 8M 512k",
                "-c",
                "aio_write -P 0x22 9M 512k",
                "-c",
                "aio_write -P 0x33 10M 512k",
                "-c",
                "aio_write -P 0x44 11M 4k",
                "-c",
                "aio_flush",
                "-c",
                "read -P 0xa1 0 1000",
                "-c",
                "read -P 0xb2 1000 3000",
                "-c",
                "read -P 0xa1 4000 61536",
                "-c",
                "read -P 0xc3 63M 1M",
                "-c",
                "read -P 0x11 8M 512k",
                "-c",
                "read -P 0x22 9M 512k",
                "-c",
                "read -P 0x33 10M 512k",
                "-c",
                "read -P 0x44 11M 4k",
                "-c",
                "read -P 0 12M 1M",
                &uri,
            ],
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "{engine}: {out}"
        );
        // The bytes really are in the image.
        let data = std::fs::read(&img).unwrap();
        assert_eq!(data[1000], 0xb2);
        assert_eq!(data[(63 << 20) + 5], 0xc3);
        assert_eq!(data[(11 << 20) + 4095], 0x44);
        // A pattern check against wrong data fails: the check can fail.
        let bad = peer("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x99 0 4k", &uri])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"),
            "{engine}"
        );
    }
}

#[test]
fn qemu_img_convert_in_and_out() {
    for engine in ENGINES {
        let (t, a, _img) = agent_with_disk(engine, 32 << 20);
        let src = t.path().join("src.img");
        random_file(&src, 32 << 20, 7);
        let uri = a.uri("vm");
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                src.to_str().unwrap(),
                &uri,
            ],
        );
        let back = t.path().join("back.img");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &a.tcp_uri("vm"),
                back.to_str().unwrap(),
            ],
        );
        compare_images(&src, &back);
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src.to_str().unwrap(),
                &uri,
            ],
        );
    }
}

#[test]
fn nbdinfo_list_can_and_maps() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    sparse_file(&img, 8 << 20);
    let ro = t.path().join("ro.img");
    random_file(&ro, 1 << 20, 3);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &["--granularity", "64K"]);
    a.attach("golden", &ro, &["--read-only"]);
    let list = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", a.socket.display()),
        ],
    );
    assert!(
        list.contains("export=\"vm\"") && list.contains("export=\"golden\""),
        "{list}"
    );
    assert!(
        list.contains("qemu:dirty-bitmap:cbt") && list.contains("base:allocation"),
        "{list}"
    );
    let uri = a.uri("vm");
    for cap in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "multi-conn",
        "cache",
    ] {
        let ok = peer("nbdinfo").args(["--can", cap, &uri]).status().unwrap();
        assert!(ok.success(), "vm cannot {cap}");
    }
    let ro_uri = a.uri("golden");
    assert!(peer("nbdinfo")
        .args(["--is", "read-only", &ro_uri])
        .status()
        .unwrap()
        .success());
    assert!(!peer("nbdinfo")
        .args(["--can", "trim", &ro_uri])
        .status()
        .unwrap()
        .success());
    assert!(!peer("nbdinfo")
        .args(["--is", "read-only", &uri])
        .status()
        .unwrap()
        .success());
    // base:allocation: one written MiB in a sparse file.
    run("qemu-io", &["-f", "raw", "-c", "write -P 1 2M 1M", &uri]);
    let map = run("nbdinfo", &["--map", &uri]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "2097152", "3"], "{map}");
    assert_eq!(rows[1][..3], ["2097152", "1048576", "0"], "{map}");
    assert_eq!(rows[2][..3], ["3145728", "5242880", "3"], "{map}");
    let dirty = dirty_map(&uri);
    assert_eq!(
        dirty,
        vec![
            (0, 2 << 20, false),
            (2 << 20, 1 << 20, true),
            (3 << 20, 5 << 20, false)
        ]
    );
}

#[test]
fn dirty_map_is_exactly_the_written_blocks() {
    const G: u64 = 64 * 1024;
    let (_t, a, _img) = agent_with_disk("uring", 64 << 20);
    // Writes, zeroes and a trim; ranges straddle block edges on purpose.
    let ranges: [(u64, u64); 8] = [
        (0, 1),
        (G - 1, 2),
        (5 * G, G),
        (7 * G + 100, 3 * G),
        (100 * G + 4095, 1),
        (300 * G, 64 * G),
        (1023 * G - 1, 1),
        (1023 * G, 512),
    ];
    let script = format!(
        "h.pwrite(b'x'*1, 0)\nh.pwrite(b'x'*2, {})\nh.pwrite(b'x'*{G}, {})\nh.zero({}, {})\nh.pwrite(b'x', {})\nh.trim({}, {})\nh.pwrite(b'y', {})\nh.pwrite(b'z'*512, {})\nh.flush()\n",
        ranges[1].0, ranges[2].0, ranges[3].1, ranges[3].0, ranges[4].0, ranges[5].1, ranges[5].0, ranges[6].0, ranges[7].0
    );
    run("nbdsh", &["-u", &a.uri("vm"), "-c", &script]);
    let mut expected: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| (o / G)..(o + l).div_ceil(G))
        .collect();
    expected.sort();
    expected.dedup();
    assert_eq!(dirty_blocks(&dirty_map(&a.uri("vm")), G), expected);
    let cbt = a.cbt("vm");
    assert_eq!(cbt["dirty_blocks"].as_u64().unwrap(), expected.len() as u64);
    assert_eq!(
        cbt["dirty_bytes"].as_u64().unwrap(),
        expected.len() as u64 * G
    );
    // Reads never dirty anything; a reset clears the map.
    run("qemu-io", &["-f", "raw", "-c", "read 20M 1M", &a.uri("vm")]);
    assert_eq!(dirty_blocks(&dirty_map(&a.uri("vm")), G), expected);
    a.ok(&["disk", "cbt", "vm", "--reset"]);
    assert!(dirty_blocks(&dirty_map(&a.uri("vm")), G).is_empty());
}

#[test]
fn nbdcopy_multi_conn_and_concurrent_clients() {
    for engine in ENGINES {
        let (t, a, img) = agent_with_disk(engine, 48 << 20);
        let src = t.path().join("src.img");
        random_file(&src, 48 << 20, 11);
        // nbdcopy opens several connections when CAN_MULTI_CONN is set.
        run(
            "nbdcopy",
            &[
                "--connections=4",
                "--flush",
                src.to_str().unwrap(),
                &a.uri("vm"),
            ],
        );
        let out = t.path().join("out.img");
        run(
            "nbdcopy",
            &["--connections=4", &a.tcp_uri("vm"), out.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap(),
            "{engine}: nbdcopy round trip differs"
        );
        // Several clients at once, each on its own 8 MiB region.
        let children: Vec<_> = (0..6u8)
            .map(|i| {
                let cmd = format!("write -P {} {}M 8M", 0x10 + i, i as u64 * 8);
                let uri = if i % 2 == 0 {
                    a.uri("vm")
                } else {
                    a.tcp_uri("vm")
                };
                peer("qemu-io")
                    .args(["-f", "raw", "-c", &cmd, "-c", "flush", &uri])
                    .output()
                    .unwrap()
            })
            .collect();
        for c in children {
            assert!(c.status.success());
        }
        let data = std::fs::read(&img).unwrap();
        for i in 0..6u8 {
            let region = &data[(i as usize * 8) << 20..((i as usize + 1) * 8) << 20];
            assert!(
                region.iter().all(|b| *b == 0x10 + i),
                "{engine}: region {i} wrong"
            );
        }
    }
}

#[test]
fn threads_of_clients_in_parallel() {
    let (_t, a, img) = agent_with_disk("uring", 16 << 20);
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let uri = a.uri("vm");
            std::thread::spawn(move || {
                let cmd = format!("write -P {} {}M 4M", 0x60 + i, i as u64 * 4);
                run(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &cmd,
                        "-c",
                        &format!("read -P {} {}M 4M", 0x60 + i, i as u64 * 4),
                        &uri,
                    ],
                )
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data[(3 << 20) + 5], 0x60);
    assert_eq!(data[(15 << 20) + 5], 0x63);
}

#[test]
fn trim_punches_holes_and_zero_reads_back() {
    for engine in ENGINES {
        let t = tempdir();
        let img = t.path().join("disk.img");
        random_file(&img, 8 << 20, 5);
        let a = Agent::start(&t.path().join("a"), engine);
        a.attach("vm", &img, &[]);
        use std::os::unix::fs::MetadataExt;
        let before = std::fs::metadata(&img).unwrap().blocks();
        run("nbdsh", &["-u", &a.uri("vm"), "-c", "h.trim(2*1024*1024, 4*1024*1024)\nh.zero(1024*1024, 0, nbd.CMD_FLAG_NO_HOLE)\nh.zero(65536, 7*1024*1024, nbd.CMD_FLAG_FAST_ZERO)\nh.flush()"]);
        let after = std::fs::metadata(&img).unwrap().blocks();
        assert!(
            after < before - 2 * 2048 + 64,
            "{engine}: trim did not punch a hole ({before} -> {after} blocks)"
        );
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0 4M 2M",
                "-c",
                "read -P 0 0 1M",
                "-c",
                "read -P 0 7M 64k",
                &a.uri("vm"),
            ],
        );
        let map = run("nbdinfo", &["--map", &a.uri("vm")]);
        assert!(map.contains("4194304     2097152    3"), "{engine}: {map}");
    }
}

#[test]
fn fio_nbd_engine_many_in_flight() {
    for engine in ENGINES {
        let (_t, a, _img) = agent_with_disk(engine, 64 << 20);
        let uri = a.uri("vm");
        let out = run(
            "fio",
            &[
                "--name=smoke",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=32",
                "--size=64m",
                "--io_size=16m",
                "--verify=crc32c",
                "--do_verify=1",
                "--output-format=terse",
            ],
        );
        assert!(!out.contains("verify:"), "{engine}: {out}");
    }
}

#[test]
fn block_device_export_through_a_loop_device() {
    let t = tempdir();
    let backing = t.path().join("backing.img");
    random_file(&backing, 16 << 20, 9);
    let lo = LoopDev::attach(&backing);
    let dev = &lo.0;
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("blk", dev, &[]);
    let d: serde_json::Value = serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
    assert_eq!(d[0]["backing"], "block_device");
    assert_eq!(d[0]["size"], 16 << 20);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5e 1M 256k",
            "-c",
            "flush",
            "-c",
            "read -P 0x5e 1M 256k",
            &a.uri("blk"),
        ],
    );
    run(
        "nbdsh",
        &[
            "-u",
            &a.uri("blk"),
            "-c",
            "h.zero(65536, 4*1024*1024)\nh.trim(65536, 8*1024*1024)\nh.flush()",
        ],
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0 4M 64k", &a.uri("blk")],
    );
    let data = std::fs::read(dev).unwrap();
    assert_eq!(data[(1 << 20) + 10], 0x5e);
    assert_eq!(
        dirty_blocks(&dirty_map(&a.uri("blk")), 65536),
        vec![16, 17, 18, 19, 64, 128]
    );
}
