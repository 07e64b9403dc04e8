//! The real `/dev/sev-guest`, through virtee's `sev` crate, behind the same [`GuestDevice`] trait
//! the simulator implements. Reports come back as the firmware's raw bytes; the host-supplied
//! certificate table is re-encoded with AMD's GUIDs (it is not signed, the verifier judges it).

use snp::certtable::{CertTable, GUID_ARK, GUID_ASK, GUID_CRL, GUID_VCEK, GUID_VLEK};
use snp::device::{DerivedKeyRequest, DeviceError, GuestDevice};
use std::sync::Mutex;
use zeroize::Zeroizing;

/// The SEV-SNP guest device of this VM.
pub struct SevGuest(Mutex<sev::firmware::guest::Firmware>);

impl SevGuest {
    /// Opens `/dev/sev-guest`; outside an SNP guest this fails with a clear error.
    pub fn open() -> Result<SevGuest, DeviceError> {
        sev::firmware::guest::Firmware::open()
            .map(|f| SevGuest(Mutex::new(f)))
            .map_err(|e| DeviceError::Unavailable(format!("/dev/sev-guest: {e} (is this an SEV-SNP guest with the sev-guest driver loaded?)")))
    }
}

fn fw(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Firmware(e.to_string())
}

impl GuestDevice for SevGuest {
    fn get_report(&self, report_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, DeviceError> {
        if vmpl > 3 {
            return Err(DeviceError::InvalidVmpl(vmpl));
        }
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.get_report(None, Some(*report_data), Some(vmpl))
            .map_err(fw)
    }

    fn get_ext_report(
        &self,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), DeviceError> {
        use sev::firmware::host::CertType;
        if vmpl > 3 {
            return Err(DeviceError::InvalidVmpl(vmpl));
        }
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (report, certs) = f
            .get_ext_report(None, Some(*report_data), Some(vmpl))
            .map_err(fw)?;
        let mut table = CertTable::default();
        for c in certs.unwrap_or_default() {
            let guid = match c.cert_type {
                CertType::ARK => GUID_ARK,
                CertType::ASK => GUID_ASK,
                CertType::VCEK => GUID_VCEK,
                CertType::VLEK => GUID_VLEK,
                CertType::CRL => GUID_CRL,
                CertType::OTHER(u) => *u.as_bytes(),
                CertType::Empty => continue,
            };
            table.entries.push((guid, c.data));
        }
        Ok((report, table.encode()))
    }

    fn get_derived_key(&self, req: &DerivedKeyRequest) -> Result<Zeroizing<[u8; 32]>, DeviceError> {
        use sev::firmware::guest::{DerivedKey, GuestFieldSelect};
        let mut sel = GuestFieldSelect::default();
        let f = req.fields;
        sel.set_guest_policy(f.guest_policy);
        sel.set_image_id(f.image_id);
        sel.set_family_id(f.family_id);
        sel.set_measurement(f.measurement);
        sel.set_svn(f.guest_svn);
        sel.set_tcb_version(f.tcb_version);
        let dk = DerivedKey::new(
            req.use_vmrk,
            sel,
            req.vmpl,
            req.guest_svn,
            req.tcb_version,
            None,
        );
        let mut fwh = self.0.lock().unwrap_or_else(|e| e.into_inner());
        fwh.get_derived_key(None, dk)
            .map(Zeroizing::new)
            .map_err(fw)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn outside_an_snp_guest_the_error_says_so() {
        if std::path::Path::new("/dev/sev-guest").exists() {
            return; // on real hardware this test has nothing to show
        }
        let e = super::SevGuest::open().err().expect("no device here");
        assert!(e.to_string().contains("/dev/sev-guest"), "{e}");
    }
}
