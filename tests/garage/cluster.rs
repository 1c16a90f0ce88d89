//! A 3-node Garage cluster for a test: `cluster.sh` starts it in a
//! temporary folder; dropping the handle stops it. Shared by the api
//! crate's store tests and the agent's end-to-end tests.

use std::path::PathBuf;
use std::process::Command;

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    base: u16,
    /// The network namespace its nodes run in, and their S3 address there.
    netns: Option<(String, String)>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("tests/garage/cluster.sh").exists())
        .expect("the workspace holds tests/garage/cluster.sh")
        .join("tests/garage/cluster.sh")
}

#[allow(dead_code)]
impl Cluster {
    /// A cluster whose node N serves S3 on `base + 10(N-1)` and RPC on
    /// the port after (each test its own `base`).
    pub fn start(base: u16) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster {
            dir,
            base,
            netns: None,
        };
        c.run(&["start"]);
        c
    }

    /// A cluster in network namespace `ns`, serving S3 on `addr` there
    /// (the namespace's end of a veth pair).
    pub fn start_in(ns: &str, addr: &str, base: u16) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster {
            dir,
            base,
            netns: Some((ns.to_string(), addr.to_string())),
        };
        c.run(&["start"]);
        c
    }

    /// Runs `cluster.sh ARGS[0] DIR ARGS[1..]`.
    pub fn run(&self, args: &[&str]) {
        let mut cmd = match &self.netns {
            Some((ns, addr)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "bash"]).env("S3_ADDR", addr);
                c
            }
            None => Command::new("bash"),
        };
        let out = cmd
            .arg(script())
            .arg(args[0])
            .arg(self.dir.path())
            .args(&args[1..])
            .env("BASE_PORT", self.base.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// kill -9 node `n` (1-3).
    pub fn kill(&self, n: u8) {
        self.run(&["kill", &n.to_string()]);
    }

    /// Starts node `n` again on its data.
    pub fn revive(&self, n: u8) {
        self.run(&["revive", &n.to_string()]);
    }

    /// The credentials file (`NAME=value` lines, mode 0600).
    pub fn env(&self) -> PathBuf {
        self.dir.path().join("env")
    }

    /// The cluster's folder (its nodes' data lie under n1..n3).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.run(&["stop"]);
    }
}
