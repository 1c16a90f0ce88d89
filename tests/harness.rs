//! Test harness: starts the real `novabackup` binary as an agent in a
//! temporary folder, runs its CLI, and runs real NBD clients against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_novabackup");
pub const ENGINES: [&str; 2] = ["uring", "pread"];

pub struct Agent {
    pub dir: PathBuf,
    pub engine: String,
    pub boot_file: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    pub env: Vec<(String, String)>,
    pub api: String,
    pub socket: PathBuf,
    pub tcp: String,
}

#[derive(serde::Deserialize)]
struct Runtime {
    pid: u32,
    api: String,
    nbd_tcp: Option<String>,
    nbd_socket: Option<PathBuf>,
}

impl Agent {
    /// Starts an agent with its state in `dir` (created if needed).
    pub fn start(dir: &Path, engine: &str) -> Agent {
        Self::start_with(dir, engine, &[])
    }

    /// Starts an agent with extra `agent` options.
    pub fn start_with(dir: &Path, engine: &str, extra: &[&str]) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let boot_file = dir.join("boot_id");
        if !boot_file.exists() {
            std::fs::write(&boot_file, "boot-1\n").unwrap();
        }
        let mut a = Agent {
            dir: dir.to_path_buf(),
            engine: engine.into(),
            boot_file,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            api: String::new(),
            socket: PathBuf::new(),
            tcp: String::new(),
        };
        a.spawn();
        a
    }

    /// Starts an agent with extra options and environment variables.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let boot_file = dir.join("boot_id");
        std::fs::write(&boot_file, "boot-1\n").unwrap();
        let mut a = Agent {
            dir: dir.to_path_buf(),
            engine: "pread".into(),
            boot_file,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            api: String::new(),
            socket: PathBuf::new(),
            tcp: String::new(),
        };
        a.spawn();
        a
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.state().join("agent.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["--data-dir"])
            .arg(self.state())
            .args([
                "agent",
                "--nbd-listen",
                "127.0.0.1:0",
                "--nbd-insecure-tcp",
                "--api-listen",
                "127.0.0.1:0",
                "--io-engine",
                &self.engine,
                "--boot-id-file",
            ])
            .arg(&self.boot_file)
            .args(&self.extra)
            .env("NOVABACKUP_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(b) = std::fs::read(self.state().join("agent.json")) {
                if let Ok(r) = serde_json::from_slice::<Runtime>(&b) {
                    if r.pid == pid {
                        self.api = r.api;
                        self.socket = r.nbd_socket.unwrap();
                        self.tcp = r.nbd_tcp.unwrap();
                        return;
                    }
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited at start ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs `novabackup --data-dir STATE ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--data-dir")
            .arg(self.state())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the CLI and returns stdout, panicking with stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "novabackup {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Restores snapshot `id` to `out` and checks it equals `want`.
    pub fn restore_and_compare(&self, id: &str, out: &Path, want: &Path) {
        self.ok(&["restore", id, "--to", out.to_str().unwrap()]);
        compare_images(out, want);
    }

    pub fn attach(&self, name: &str, image: &Path, extra: &[&str]) {
        let img = image.to_str().unwrap();
        let mut args = vec!["disk", "attach", name, "--image", img];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    pub fn cbt(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["disk", "cbt", name, "--json"])).unwrap()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "agent exited with {st}:\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /metrics` with the admin token.
    pub fn metrics(&self) -> String {
        let token = std::fs::read_to_string(self.state().join("api.token")).unwrap();
        ureq::get(&format!("http://{}/metrics", self.api))
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// Waits for the agent to exit on its own (a crash point) and returns
    /// how it ended.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        c.wait().unwrap()
    }

    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tmpfs mounted for a test (a small, fillable disk); unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`6m`) on `dir`, created if needed.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A loop device over a file, detached when dropped.
pub struct LoopDev(pub PathBuf);

impl LoopDev {
    pub fn attach(backing: &Path) -> LoopDev {
        let dev = run("losetup", &["-f", "--show", backing.to_str().unwrap()]);
        LoopDev(PathBuf::from(dev.trim()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Asserts two raw images are equal, with qemu-img compare.
pub fn compare_images(a: &Path, b: &Path) {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
}

/// Runs a peer tool, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = peer(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}; run .ci/run or install it"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command for a peer tool; nbdsh needs Debian's python first on PATH.
pub fn peer(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    if cmd == "nbdsh" || cmd == "nbd_raw" {
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("/usr/bin:{path}"));
    }
    c
}

/// A file of `size` bytes of deterministic pseudo-random data.
pub fn random_file(path: &Path, size: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    std::fs::write(path, v).unwrap();
}

/// Lays out `script` with sfdisk on a new sparse image of `size` bytes.
pub fn sfdisk_table(img: &Path, size: u64, script: &str) {
    use std::io::Write;
    sparse_file(img, size);
    let mut c = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (apt-get install fdisk)");
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk failed on {script}");
}

/// An empty (sparse) image.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nbtest")
        .tempdir_in(std::env::var("NB_TEST_TMP").unwrap_or("/tmp".into()))
        .unwrap()
}

/// Dirty extents from `nbdinfo --map=qemu:dirty-bitmap:cbt --json`.
pub fn dirty_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run("nbdinfo", &["--json", "--map=qemu:dirty-bitmap:cbt", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() & 1 == 1,
            )
        })
        .collect()
}

/// The dirty block indexes of a map.
pub fn dirty_blocks(map: &[(u64, u64, bool)], g: u64) -> Vec<u64> {
    let mut v = Vec::new();
    for &(o, l, d) in map {
        if d {
            v.extend((o / g)..(o + l).div_ceil(g));
        }
    }
    v
}
