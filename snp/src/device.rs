//! The interface of the SEV-SNP guest device (`/dev/sev-guest`), as the guest agent uses it.
//! The real device and the simulator implement the same trait, so the guest agent's code is
//! the same in simulation and on hardware.

/// Which fields a derived key mixes in (MSG_KEY_REQ's GUEST_FIELD_SELECT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldSelect {
    pub guest_policy: bool,
    pub image_id: bool,
    pub family_id: bool,
    pub measurement: bool,
    pub guest_svn: bool,
    pub tcb_version: bool,
}

/// A request for a key derived by the firmware from the chip's secrets and the guest's identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DerivedKeyRequest {
    /// Derive from the VMRK (true) or the VCEK (false) root.
    pub use_vmrk: bool,
    pub fields: FieldSelect,
    pub vmpl: u32,
    pub guest_svn: u32,
    pub tcb_version: u64,
}

/// Why the device refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("the guest device is not available: {0}")]
    Unavailable(String),
    #[error("VMPL {0} is not allowed (the guest runs at a higher-numbered VMPL or 4+)")]
    InvalidVmpl(u32),
    #[error("the firmware refused the request: {0}")]
    Firmware(String),
}

/// `/dev/sev-guest`: reports, extended reports and derived keys.
pub trait GuestDevice {
    /// A raw 1184-byte report binding `report_data`, requested at `vmpl`.
    fn get_report(&self, report_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, DeviceError>;
    /// A report and the host-supplied certificate table (AMD's GUIDs).
    fn get_ext_report(
        &self,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), DeviceError>;
    /// A 32-byte key derived from the chip's root key and the selected guest fields.
    fn get_derived_key(
        &self,
        req: &DerivedKeyRequest,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, DeviceError>;
}
