//! A Garage S3 server (<https://garagehq.deuxfleurs.fr>) on loopback: one node, one bucket and
//! one access key, in a folder of its own; stopped (killed) when dropped.
//!
//! The binary is `$ATTESTA_GARAGE`, else `garage` on `PATH`, else the one `scripts/test.sh`
//! installs (`/var/cache/attesta/garage/bin/garage`).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/test.sh` and `scripts/demo.sh` install Garage.
pub const INSTALLED: &str = "/var/cache/attesta/garage/bin/garage";

/// A running Garage with a bucket and a key that may use it.
pub struct Garage {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    _dir: Option<Dir>,
}

/// A folder removed on drop.
pub(crate) struct Dir(pub(crate) PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Garage binary, if one can be found.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ATTESTA_GARAGE") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("garage");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    Path::new(INSTALLED)
        .is_file()
        .then(|| PathBuf::from(INSTALLED))
}

pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl Garage {
    /// Starts Garage in a new folder under `parent` (kept only while the value lives) and
    /// makes bucket `bucket` and a key for it. Takes a few seconds.
    pub fn start(parent: &Path, bucket: &str) -> Result<Garage, String> {
        let bin = binary().ok_or(
            "no Garage binary: set ATTESTA_GARAGE, or run scripts/test.sh (it installs one)",
        )?;
        let dir = parent.join(format!("garage-{}-{}", std::process::id(), free_port()?));
        // A new folder, the process's own (one already there is refused, not reused).
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let guard = Dir(dir.clone());
        let (rpc, s3, admin) = (free_port()?, free_port()?, free_port()?);
        let mut random = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|e| e.to_string())?,
            &mut random,
        )
        .map_err(|e| e.to_string())?;
        let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = spawn(&bin, &config)?;
        let mut g = Garage {
            child,
            bin,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: "garage".into(),
            bucket: bucket.into(),
            key_id: String::new(),
            secret: String::new(),
            _dir: Some(guard),
        };
        g.wait_for(s3)?;
        let id = g.cli(&["node", "id", "-q"])?;
        let id = id.trim().split('@').next().unwrap_or_default().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id])?;
        g.cli(&["layout", "apply", "--version", "1"])?;
        g.cli(&["bucket", "create", bucket])?;
        let key = g.cli(&["key", "create", "attesta-test"])?;
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .ok_or(format!("`garage key create` printed no {name:?}:\n{key}"))
        };
        g.key_id = field("Key ID:")?;
        g.secret = field("Secret key:")?;
        g.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            bucket,
            "--key",
            "attesta-test",
        ])?;
        Ok(g)
    }

    fn wait_for(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Err(format!("garage exited at start ({s}): {}", self.log()));
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("garage did not listen within 30 s: {}", self.log()))
    }

    fn log(&self) -> String {
        self.config
            .parent()
            .map(|d| std::fs::read_to_string(d.join("garage.log")).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Runs `garage -c CONFIG ARGS…` against this server (retrying while its RPC comes up).
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "garage {}: {}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server (what an outage looks like to a client); `resume` starts it again on
    /// the same folder and ports.
    pub fn pause(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again after `pause`.
    pub fn resume(&mut self) -> Result<(), String> {
        let port: u16 = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("endpoint without a port")?;
        self.child = spawn(&self.bin, &self.config)?;
        self.wait_for(port)
    }

    /// An S3 client of the bucket, with the key (what a test inspects or damages the bucket
    /// with, around the agent).
    pub fn client(&self) -> Result<object_store::aws::AmazonS3, String> {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
            .build()
            .map_err(|e| e.to_string())
    }

    /// A `[backup]` section for a host.toml using this server, its secret in `secret_file`.
    pub fn backup_toml(&self, secret_file: &Path, extra: &str) -> Result<String, String> {
        std::fs::write(secret_file, &self.secret).map_err(|e| e.to_string())?;
        Ok(format!(
            "[backup]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
             access_key_id = \"{}\"\nsecret_key_file = \"{}\"\n{extra}",
            self.endpoint,
            self.bucket,
            self.region,
            self.key_id,
            secret_file.display()
        ))
    }
}

/// `garage -c CONFIG server`, its output appended to `garage.log` beside the configuration.
fn spawn(bin: &Path, config: &Path) -> Result<Child, String> {
    let dir = config
        .parent()
        .ok_or("a configuration outside any folder")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("garage.log"))
        .map_err(|e| e.to_string())?;
    Command::new(bin)
        .arg("-c")
        .arg(config)
        .arg("server")
        .env("RUST_LOG", "garage=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
