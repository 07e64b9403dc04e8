//! A throwaway PostgreSQL cluster on loopback for a test binary: `initdb` and `pg_ctl` (as the
//! `postgres` user when the tests run as root) in a temporary folder, stopped and removed on
//! drop. Debian's packaged server (`apt-get install postgresql`, which `scripts/setup.sh` does).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest `/usr/lib/postgresql/<major>/bin`, where Debian puts the server's programs.
fn bin_dir() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A command of the server's, as the user that owns the cluster.
    fn pg(&self, program: &str) -> Command {
        as_owner(&self.bin.join(program))
    }

    /// Starts a cluster, or says why not (PostgreSQL not installed).
    pub fn start() -> Result<Cluster, String> {
        let bin = bin_dir().ok_or("PostgreSQL is not installed (apt-get install postgresql)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        if is_root() {
            // initdb refuses root: the cluster is the postgres user's.
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("cannot give the cluster's folder to the postgres user".into());
            }
        }
        let run = |c: &mut Command, what: &str| -> Result<(), String> {
            let out = c.output().map_err(|e| format!("{what}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        run(
            as_owner(&bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "attesta",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let c = Cluster {
            bin,
            data,
            port,
            _dir: dir,
        };
        run(
            c.pg("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&c.data)
                .arg("-l")
                .arg(c.data.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -c listen_addresses=127.0.0.1 -k {}",
                    c.data.display()
                ))
                .arg("start"),
            "pg_ctl start",
        )?;
        Ok(c)
    }

    /// A new, empty database on the cluster; its URL.
    pub fn database(&self, name: &str) -> String {
        let out = self
            .pg("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "attesta",
                name,
            ])
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://attesta@127.0.0.1:{}/{database}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

/// `program` run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }
}
