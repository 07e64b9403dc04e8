//! A throwaway PostgreSQL cluster for a test: `initdb` and `pg_ctl` (as the `postgres` user when
//! the tests run as root) in a private temporary folder, reached only through a Unix socket in
//! that folder (no TCP: no port to race for, nobody else on this machine can connect), stopped
//! and removed on drop. Debian's packaged server (`apt-get install postgresql`, which
//! `scripts/setup.sh` does).

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
    socket_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A command of the server's, as the user that owns the cluster.
    fn pg(&self, program: &str) -> Command {
        as_owner(&self.bin.join(program))
    }

    /// Starts a cluster. `None` (skipped with a message; a failure when CI=true) only where
    /// PostgreSQL is not installed; any other failure fails the test.
    pub fn start() -> Option<Cluster> {
        let Some(bin) = bin_dir() else {
            super::missing("PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        match Self::start_in(bin) {
            Ok(c) => Some(c),
            Err(why) => panic!("a PostgreSQL cluster for the test: {why}"),
        }
    }

    fn start_in(bin: PathBuf) -> Result<Cluster, String> {
        let dir = owned_tempdir()?;
        let data = dir.path().join("data");
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
        let c = Cluster {
            bin,
            data,
            socket_dir: dir.path().to_path_buf(),
            _dir: dir,
        };
        c.start_again()?;
        Ok(c)
    }

    /// Starts the server (again, after [`Cluster::stop`]); returns once it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        run(
            self.pg("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(self.data.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-c listen_addresses='' -k {}",
                    self.socket_dir.display()
                ))
                .arg("start"),
            "pg_ctl start",
        )
    }

    /// A synchronous-replication standby of this cluster, named `name` (its
    /// `application_name`), from `pg_basebackup`, started and streaming; this cluster then
    /// waits for it on every commit (`synchronous_standby_names`). Returns once it is in sync.
    pub fn sync_standby(&self, name: &str) -> Cluster {
        let dir = owned_tempdir().unwrap();
        let data = dir.path().join("data");
        let conninfo = format!(
            "host={} user=attesta application_name={name}",
            self.socket_dir.display()
        );
        run(
            self.pg("pg_basebackup")
                .args(["-X", "stream", "-R", "--no-sync", "-d", &conninfo, "-D"])
                .arg(&data),
            "pg_basebackup",
        )
        .unwrap();
        append(
            &data.join("postgresql.auto.conf"),
            &format!("primary_conninfo = '{conninfo}'\n"),
        );
        let standby = Cluster {
            bin: self.bin.clone(),
            data,
            socket_dir: dir.path().to_path_buf(),
            _dir: dir,
        };
        standby.start_again().unwrap();
        append(
            &self.data.join("postgresql.conf"),
            &format!("synchronous_standby_names = '{name}'\n"),
        );
        run(
            self.pg("pg_ctl").args(["reload", "-D"]).arg(&self.data),
            "pg_ctl reload",
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let state = self.psql("SELECT sync_state FROM pg_stat_replication");
            if state.trim() == "sync" {
                return standby;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the standby never reached sync: {state:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Makes this standby the primary (`pg_ctl promote`, waiting until it takes writes).
    pub fn promote(&self) {
        run(
            self.pg("pg_ctl")
                .args(["promote", "-w", "-t", "60", "-D"])
                .arg(&self.data),
            "pg_ctl promote",
        )
        .unwrap();
    }

    /// One query's rows, unaligned (`psql -Atc`), on database `postgres`.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-Atc", sql])
            .arg(self.url("postgres"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server as a crash would (`-m immediate`: no shutdown checkpoint, every client
    /// cut off at once); [`Cluster::start_again`] recovers it from its WAL.
    pub fn crash(&self) {
        let ok = self
            .pg("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "pg_ctl stop -m immediate");
    }

    /// The URL of `database` on the cluster (through its socket).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://attesta@localhost/{database}?host={}",
            self.socket_dir.display()
        )
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

/// Runs `c`; its output in the error when it fails.
fn run(c: &mut Command, what: &str) -> Result<(), String> {
    let out = c.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A temporary folder for a cluster, the postgres user's when we are root (initdb refuses root).
fn owned_tempdir() -> Result<tempfile::TempDir, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    if is_root() {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("cannot give the cluster's folder to the postgres user".into());
        }
    }
    Ok(dir)
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

/// Appends `text` to a file of the cluster's (owned by postgres; its owner is kept).
fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}
