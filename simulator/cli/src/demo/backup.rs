//! The real-VM scene's backup: S3 storage (Garage, started on loopback when installed), the
//! first VM's disk backed up there by its host agent after two boots, then restored by a
//! second host agent (another chip, which the VM's order also allows), where the VM boots and
//! its guest unlocks the restored volume; its terminate there deletes every object. What
//! `backup` in the summary says is what the bucket and the console showed.

use object_store::aws::AmazonS3;
use object_store::path::Path as ObjPath;
use std::path::Path;
use testkit::garage::Garage;

/// The bucket of the scene.
pub struct Storage {
    garage: Garage,
    s3: AmazonS3,
}

impl Storage {
    /// Starts Garage in `dir`; `None` (with the reason printed) where it is not installed.
    pub fn start(dir: &Path) -> Result<Option<Storage>, String> {
        if testkit::garage::binary().is_none() {
            eprintln!(
                "\rattesta-sim demo: no backup scene: Garage is not installed (scripts/s3-deps.sh)"
            );
            return Ok(None);
        }
        let garage = Garage::start(dir, "attesta-backups")?;
        let s3 = garage.client()?;
        Ok(Some(Storage { garage, s3 }))
    }

    /// The `[backup]` section of a host agent in `home`.
    pub fn toml(&self, home: &Path) -> Result<String, String> {
        self.garage.backup_toml(&home.join("s3.secret"), "")
    }

    /// Objects of the VM's in the bucket, as the store lists them (not as the agent does),
    /// but the marker terminate leaves.
    pub async fn objects(&self, vm: &str) -> Result<usize, String> {
        use futures::TryStreamExt as _;
        use object_store::ObjectStore as _;
        let all: Vec<_> = self
            .s3
            .list(Some(&ObjPath::from(format!("attesta/{vm}"))))
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let marker = format!("attesta/{vm}/terminated");
        Ok(all.iter().filter(|o| o.location.as_ref() != marker).count())
    }
}

/// What the backup showed.
#[derive(Debug, Default)]
pub struct BackupRun {
    /// Ciphertext bytes the backup uploaded.
    pub bytes: u64,
    pub restored_on_other_host: bool,
    pub unlocked_after_restore: bool,
    pub deleted_on_terminate: bool,
}

impl BackupRun {
    pub fn as_expected(&self) -> bool {
        self.bytes > 0
            && self.restored_on_other_host
            && self.unlocked_after_restore
            && self.deleted_on_terminate
    }

    /// `backup` in the JSON summary.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "bytes": self.bytes,
            "restored_on_other_host": self.restored_on_other_host,
            "unlocked_after_restore": self.unlocked_after_restore,
            "deleted_on_terminate": self.deleted_on_terminate,
        })
    }

    pub fn print(&self) {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "  backup (Garage S3 on loopback): {} bytes of ciphertext uploaded; restored on the other host: {}; unlocked there: {}; every object deleted on terminate: {}",
            self.bytes,
            yes(self.restored_on_other_host),
            yes(self.unlocked_after_restore),
            yes(self.deleted_on_terminate)
        );
    }
}
