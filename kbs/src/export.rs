//! One VM's evidence bundle ([`proto::bundle`]), as the broker exports it for the VM's tenant,
//! who checks it offline with `attesta-verify bundle`.

use crate::service::Kbs;
use crate::store::Store;
use proto::bundle::{BUNDLE_VERSION, Bundle, STATEMENT_KIND, cut, sha256, statement};

impl Kbs {
    /// Signs a checkpoint now (so the segment reaches the end of the log), cuts the VM's
    /// segment out of the log, and signs the statement with the response key. `audit_key` is
    /// the public key of the store's audit key (the one that signs its checkpoints).
    pub async fn evidence_bundle(
        &self,
        vm_id: &str,
        audit_key: &[u8],
        now: u64,
    ) -> Result<Bundle, String> {
        let record = self
            .store
            .vm(vm_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no VM {vm_id} in this broker's store"))?;
        self.store
            .checkpoint()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the store signs no checkpoints (no audit key): nothing could be verified")?;
        let log = self.store.audit_log().await.map_err(|e| e.to_string())?;
        let mut bundle = Bundle {
            v: BUNDLE_VERSION,
            vm_id: vm_id.into(),
            exported_at: now,
            order: hex::encode(&record.order),
            audit_key: hex::encode(audit_key),
            log: cut(&log, vm_id).map_err(|e| e.to_string())?,
            signature: String::new(),
        };
        let closing = bundle
            .closing_checkpoint()
            .ok_or("the segment does not end with a checkpoint")?;
        let message = statement(vm_id, now, &sha256(&record.order), audit_key, closing);
        bundle.signature = hex::encode(self.response_key.sign(STATEMENT_KIND, &message));
        Ok(bundle)
    }
}
