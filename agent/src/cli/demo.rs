//! `novabackup demo`: the whole product in one command, on a temporary
//! data folder. It starts an agent, builds a realistic disk image (an ext4
//! filesystem with text, random data and free space when mke2fs is there,
//! a synthetic image otherwise), attaches it, writes through NBD as a guest
//! would, takes a full and an incremental backup, restores both, checks
//! them byte for byte against the disk as it was at each backup, and prints
//! throughput and ratios.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nbd_proxy::client::Client as NbdClient;
use novabackup_api::types::{AttachRequest, BackupRequest, RestoreRequest};
use novabackup_api::Client;
use novabackup_engine::size::{format_size, parse_size};
use sha2::{Digest, Sha256};

use super::job;

/// `novabackup demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the demo disk.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Keep the demo folder (printed at the end) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("novabackup-demo.")
        .tempdir()
        .context("cannot make a temporary folder")?;
    let root = dir.path().to_path_buf();
    let result = demo(&root, a.size);
    if a.keep {
        let kept = dir.keep();
        eprintln!("demo folder kept: {}", kept.display());
    }
    result
}

fn demo(root: &Path, size: u64) -> anyhow::Result<()> {
    let state = root.join("state");
    let image = root.join("vm.img");
    step(&format!("building a {} disk image", format_size(size)));
    let how = build_image(root, &image, size)?;
    eprintln!("    {how}");

    step("starting an agent");
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(root.join("agent.log"))?;
    let child = Command::new(exe)
        .arg("--data-dir")
        .arg(&state)
        .args([
            "agent",
            "--nbd-listen",
            "none",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start the agent")?;
    let agent = AgentProc(child);
    let info = wait_ready(&state, agent.0.id())?;
    let token = std::fs::read_to_string(state.join("api.token"))?
        .trim()
        .to_string();
    let api = Client::new(&format!("http://{}", info.api), Some(token));
    let socket = info.nbd_socket.context("the agent has no NBD socket")?;

    let d = api.attach(&AttachRequest {
        name: "demo".into(),
        image: image.display().to_string(),
        granularity: None,
        read_only: false,
        allow: Vec::new(),
    })?;
    eprintln!("    attached as {}", d.uris.join(" "));

    step("the guest writes through NBD");
    let mut nbd = NbdClient::connect(&socket, "demo")?;
    let first = guest_writes(&mut nbd, size, 1, 0.02)?;
    nbd.flush()?;
    eprintln!("    {} written", format_size(first));
    let at_full = hash_file(&image)?;

    step("full backup");
    let full = backup(&api)?;
    step("the guest writes more (1% of the disk, scattered)");
    let second = guest_writes(&mut nbd, size, 2, 0.01)?;
    nbd.flush()?;
    eprintln!("    {} written", format_size(second));
    let cbt = api.cbt("demo")?;
    eprintln!(
        "    change tracking: {} dirty blocks ({})",
        cbt.dirty_blocks,
        format_size(cbt.dirty_bytes)
    );
    let at_inc = hash_file(&image)?;
    step("incremental backup");
    let inc = backup(&api)?;
    nbd.disconnect()?;

    let mut restored = Vec::new();
    for (name, snap, want) in [("full", &full, &at_full), ("incremental", &inc, &at_inc)] {
        step(&format!("restoring the {name} snapshot"));
        let target = root.join(format!("restore-{name}.img"));
        let started = Instant::now();
        let j = api.restore(&RestoreRequest {
            snapshot: snap["snapshot"].as_str().unwrap_or_default().to_string(),
            target: target.display().to_string(),
            force: false,
            live: false,
            attach: None,
        })?;
        job::result(&job::wait(&api, j, false, "bytes")?)?;
        let secs = started.elapsed().as_secs_f64();
        let got = hash_file(&target)?;
        if &got != want {
            bail!("the restored {name} snapshot differs from the disk at its backup");
        }
        eprintln!("    identical to the disk at the {name} backup");
        restored.push(secs);
        std::fs::remove_file(&target)?;
    }
    let store_bytes = dir_size(&state.join("store"));

    let n = |v: &serde_json::Value, k: &str| v["stats"][k].as_u64().unwrap_or(0);
    let rate = |v: &serde_json::Value| {
        n(v, "bytes_read") as f64 / (n(v, "duration_ms").max(1) as f64 / 1000.0) / 1e6
    };
    println!();
    println!(
        "novabackup demo: {} disk, everything verified byte for byte",
        format_size(size)
    );
    println!("| step | read | stored | time | rate |");
    println!("|---|---|---|---|---|");
    for (name, v) in [("full backup", &full), ("incremental backup", &inc)] {
        println!(
            "| {name} | {} | {} | {:.2} s | {:.0} MB/s |",
            format_size(n(v, "bytes_read")),
            format_size(n(v, "bytes_stored")),
            n(v, "duration_ms") as f64 / 1000.0,
            rate(v)
        );
    }
    for (name, secs) in ["restore full", "restore incremental"]
        .iter()
        .zip(&restored)
    {
        println!(
            "| {name} | | | {secs:.2} s | {:.0} MB/s |",
            size as f64 / secs / 1e6
        );
    }
    println!();
    println!(
        "store: {} for two complete points in time of a {} disk ({:.1}x smaller than two raw copies)",
        format_size(store_bytes),
        format_size(size),
        (2 * size) as f64 / store_bytes.max(1) as f64
    );
    println!(
        "incremental: {} of guest writes, {} read, {} stored",
        format_size(second),
        format_size(n(&inc, "bytes_read")),
        format_size(n(&inc, "bytes_stored"))
    );
    Ok(())
}

fn backup(api: &Client) -> anyhow::Result<serde_json::Value> {
    let j = api.backup(&BackupRequest {
        audit: false,
        disk: "demo".into(),
        full: false,
    })?;
    let j = job::wait(api, j, false, "bytes")?;
    let r = job::result(&j)?.clone();
    eprintln!(
        "    {} ({}): read {}, stored {}, in {:.2} s",
        r["snapshot"].as_str().unwrap_or("?"),
        r["kind"].as_str().unwrap_or("?"),
        format_size(r["stats"]["bytes_read"].as_u64().unwrap_or(0)),
        format_size(r["stats"]["bytes_stored"].as_u64().unwrap_or(0)),
        r["stats"]["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    Ok(r)
}

fn wait_ready(state: &Path, pid: u32) -> anyhow::Result<crate::daemon::RuntimeInfo> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(i) = crate::daemon::runtime_info(state) {
            if i.pid == pid {
                return Ok(i);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not start; see {}",
                state.parent().unwrap_or(state).join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), fast enough to make
/// hundreds of MiB.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    }

    fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 16] = [
            "kernel:",
            "sshd[812]:",
            "accepted",
            "publickey",
            "for",
            "root",
            "from",
            "10.0.4.17",
            "port",
            "eth0",
            "link",
            "up",
            "GET",
            "/api/v1/health",
            "200",
            "ms",
        ];
        let mut v = Vec::with_capacity(n + 64);
        let mut line = 0u64;
        while v.len() < n {
            line += 1;
            write!(
                v,
                "Nov 26 09:{:02}:{:02} host{} ",
                line % 60,
                (line * 7) % 60,
                line % 9
            )
            .unwrap();
            let mut r = [0u8; 8];
            self.fill(&mut r);
            for i in 0..6 {
                v.extend_from_slice(WORDS[(r[i] % 16) as usize].as_bytes());
                v.push(b' ');
            }
            writeln!(v, "id={:016x}", u64::from_le_bytes(r)).unwrap();
        }
        v.truncate(n);
        v
    }
}

fn build_image(root: &Path, image: &Path, size: u64) -> anyhow::Result<String> {
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let text_bytes = (size / 4) as usize;
    let random_bytes = (size / 8) as usize;
    let stage = root.join("stage");
    std::fs::create_dir_all(stage.join("var/log"))?;
    std::fs::create_dir_all(stage.join("home/media"))?;
    let mut written = 0;
    let mut i = 0;
    while written < text_bytes {
        let n = (text_bytes - written).min(16 << 20);
        std::fs::write(stage.join(format!("var/log/syslog.{i}")), noise.text(n))?;
        written += n;
        i += 1;
    }
    let mut buf = vec![0u8; 8 << 20];
    let mut written = 0;
    let mut i = 0;
    while written < random_bytes {
        let n = (random_bytes - written).min(buf.len());
        noise.fill(&mut buf[..n]);
        std::fs::write(stage.join(format!("home/media/clip{i}.bin")), &buf[..n])?;
        written += n;
        i += 1;
    }
    let f = std::fs::File::create(image)?;
    f.set_len(size)?;
    drop(f);
    let mkfs = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&stage)
        .arg(image)
        .output();
    let how = match mkfs {
        Ok(o) if o.status.success() => format!(
            "ext4 with {} of text logs and {} of random files, the rest free",
            format_size(text_bytes as u64),
            format_size(random_bytes as u64)
        ),
        _ => {
            // No mke2fs: lay the same contents out raw, with zeroes between.
            let mut f = std::fs::OpenOptions::new().write(true).open(image)?;
            let mut off = 0u64;
            for e in std::fs::read_dir(stage.join("var/log"))?
                .chain(std::fs::read_dir(stage.join("home/media"))?)
            {
                let mut data = Vec::new();
                std::fs::File::open(e?.path())?.read_to_end(&mut data)?;
                std::os::unix::fs::FileExt::write_all_at(&f, &data, off)?;
                off += data.len() as u64 + (1 << 20);
            }
            f.flush()?;
            "raw text and random regions with zeroes between (mke2fs not found)".to_string()
        }
    };
    std::fs::remove_dir_all(&stage)?;
    Ok(how)
}

/// Writes `share` of the disk's 64 KiB blocks (chosen by `seed`), half
/// text, half random, through NBD. Returns the bytes written.
fn guest_writes(nbd: &mut NbdClient, size: u64, seed: u64, share: f64) -> anyhow::Result<u64> {
    let mut noise = Noise(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let blocks = size / 65536;
    let n = ((blocks as f64) * share).max(1.0) as u64;
    let mut buf = vec![0u8; 65536];
    for i in 0..n {
        let mut r = [0u8; 8];
        noise.fill(&mut r);
        let b = u64::from_le_bytes(r) % blocks;
        if i % 2 == 0 {
            noise.fill(&mut buf);
        } else {
            buf.copy_from_slice(&noise.text(65536));
        }
        nbd.write(b * 65536, &buf)?;
    }
    Ok(n * 65536)
}

fn hash_file(p: &Path) -> anyhow::Result<Vec<u8>> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_vec())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![PathBuf::from(p)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
