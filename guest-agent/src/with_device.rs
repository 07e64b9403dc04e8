//! The configured guest device (`[device]` in `guest.toml`), opened for one use: the boot's
//! unlock, or a keepalive's renewal. A macro, because each device is a different type (the
//! simulator's borrows its chip) and the use is an `async` expression over it.

/// Evaluates `$use` (an expression over `$dev: &impl GuestDevice`) with the device `$cfg`
/// names; an unusable device is an [`crate::unlock::UnlockError::Device`].
#[macro_export]
macro_rules! with_device {
    ($cfg:expr, $dev:ident => $use:expr) => {{
        use $crate::config::DeviceConfig;
        use $crate::unlock::UnlockError;
        match &$cfg.device {
            DeviceConfig::SevGuest => {
                let opened = $crate::device::SevGuest::open()
                    .map_err(|e| UnlockError::Device(e.to_string()))?;
                let $dev = &opened;
                $use
            }
            #[cfg(feature = "simulator")]
            DeviceConfig::Simulator {
                seed,
                product,
                chip,
                measurement,
                policy,
                state_dir,
            } => {
                let d = |e: String| UnlockError::Device(format!("simulator: {e}"));
                let product: snp::Product = product.parse().map_err(|e| d(format!("{e}")))?;
                let m = hex::decode(measurement.trim())
                    .ok()
                    .and_then(|v| <[u8; 48]>::try_from(v.as_slice()).ok())
                    .ok_or_else(|| d("measurement: expected 96 hex digits".into()))?;
                let (pki, config) = simulator::ChipConfig::typical_cached(
                    product,
                    seed,
                    *chip,
                    state_dir.as_deref(),
                    |n| tracing::info!("{n}"),
                )
                .map_err(d)?;
                let chip = simulator::Chip::new(pki, config).map_err(|e| d(e.to_string()))?;
                let mut launch = simulator::GuestLaunch {
                    measurement: m,
                    ..Default::default()
                };
                if let Some(p) = policy {
                    launch.policy = *p;
                }
                let guest = chip.launch(launch);
                let $dev = &guest;
                $use
            }
            #[cfg(feature = "simulator")]
            DeviceConfig::VirtioPsp { port } => {
                let opened = $crate::psp::VirtioPsp::open(port)
                    .map_err(|e| UnlockError::Device(e.to_string()))?;
                let $dev = &opened;
                $use
            }
            #[cfg(not(feature = "simulator"))]
            DeviceConfig::Simulator { .. } | DeviceConfig::VirtioPsp { .. } => {
                Err(UnlockError::Device(
                    "this build has no simulator (built without the `simulator` feature)".into(),
                ))
            }
        }
    }};
}
