//! What changes the broker's VMs and their keys: registration from an operator-signed order
//! (checked against the allowlist and the policy floor, a fresh volume key wrapped under the
//! KEK), crypto-shredding on a terminate order, and KEK binding and rotation.

use crate::keys::{Kek, VolumeKey};
use crate::release;
use crate::service::Kbs;
use crate::store::{Store, StoreError, VmRecord};
use proto::order::{DocumentError, Order, OrderKind};
use std::sync::atomic::Ordering;

impl RegisterError {
    /// Stable code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            RegisterError::Order(DocumentError::BadSignature) => "order_signature",
            RegisterError::Order(DocumentError::Expired { .. }) => "order_expired",
            RegisterError::Order(_) => "order_invalid",
            RegisterError::NotRegister | RegisterError::NotTerminate => "order_kind",
            RegisterError::NotAllowlisted(_) => "not_allowlisted",
            RegisterError::Policy(_) => "order_policy",
            RegisterError::BelowFloor(_) => "policy_below_floor",
            RegisterError::Store(StoreError::Exists(_)) => "vm_exists",
            RegisterError::Store(StoreError::NoSuchVm(_)) => "no_such_vm",
            RegisterError::Store(StoreError::KekRotated) => "kek_rotated",
            RegisterError::Store(_) => "unavailable",
            RegisterError::Key(_) => "key_unavailable",
        }
    }
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("order: {0}")]
    Order(#[from] DocumentError),
    #[error("the order is not a register order")]
    NotRegister,
    #[error("the order is not a terminate order")]
    NotTerminate,
    #[error("measurements not in the allowlist: {0:?}")]
    NotAllowlisted(Vec<String>),
    #[error("the order's policy: {0}")]
    Policy(String),
    #[error("the order's policy asks for less than the broker's floor: {}", .0.join("; "))]
    BelowFloor(Vec<String>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] crate::keys::KeyError),
}

impl Kbs {
    /// Checks that this broker's KEK is the one the store's keys are wrapped under (recording
    /// it in a new store), and from then on registers only while it still is: a broker left
    /// running across `kek rotate` cannot wrap a new key under the retired KEK.
    pub async fn bind_kek(&self) -> Result<(), RegisterError> {
        let stored = self
            .store
            .init_kek_check(&crate::keys::kek_check(&*self.kek)?)
            .await?;
        if !crate::keys::opens_check(&*self.kek, &stored) {
            return Err(crate::keys::KeyError::WrongKek.into());
        }
        self.store.bind_kek(Some(stored));
        Ok(())
    }

    /// Re-wraps every live volume key under `new` in one transaction (the volume keys stay
    /// the same) and makes `new` the store's KEK; returns how many. The old KEK then wraps
    /// nothing live: once destroyed, every key it wrapped — in old backups too, terminated
    /// VMs' among them — is gone. Needs [`Kbs::bind_kek`] first.
    pub async fn rotate_kek(&self, new: &dyn Kek, now: u64) -> Result<usize, RegisterError> {
        let expect = self
            .store
            .bound_kek()
            .ok_or(crate::keys::KeyError::WrongKek)?;
        let check = crate::keys::kek_check(new)?;
        if crate::keys::opens_check(&*self.kek, &check) {
            return Err(crate::keys::KeyError::SameKek.into());
        }
        let mut keys = Vec::new();
        for (vm_id, generation, old) in self.store.live_keys().await? {
            let key = self.kek.unwrap_key(&vm_id, generation, &old)?;
            let wrapped = new.wrap(&vm_id, generation, &key)?;
            // Never store what the new KEK would not give back.
            if new.unwrap_key(&vm_id, generation, &wrapped)?.0[..] != key.0[..] {
                return Err(crate::keys::KeyError::Wrap.into());
            }
            keys.push((vm_id, generation, old, wrapped));
        }
        let n = self.store.rekey(&expect, &check, keys, now).await?;
        self.store.bind_kek(Some(check));
        tracing::info!(keys = n, "KEK rotated: every live key re-wrapped");
        Ok(n)
    }

    /// Registers a VM from a signed order: checks signature, expiry, allowlist and policy, then
    /// generates the VM's volume key and stores it wrapped.
    pub async fn register(&self, order_doc: &[u8], now: u64) -> Result<String, RegisterError> {
        let order = Order::verify(order_doc, &self.operator_keys, now)?;
        if order.kind != OrderKind::Register {
            return Err(RegisterError::NotRegister);
        }
        {
            let guard = self.allowlist.read().await;
            let outside = match guard.as_ref() {
                Some(a) => order.outside(a),
                None => order.measurements.iter().map(|m| m.to_vec()).collect(),
            };
            if !outside.is_empty() {
                return Err(RegisterError::NotAllowlisted(
                    outside.iter().map(hex::encode).collect(),
                ));
            }
        }
        crate::floor::check_order(&self.floor(), &order)?;
        let key = VolumeKey::generate()?;
        let wrapped = self.kek.wrap(&order.vm_id, 1, &key)?;
        let rec = VmRecord {
            state: release::VmState {
                vm_id: order.vm_id.clone(),
                generation: 1,
                boot_counter: 0,
                terminated: false,
            },
            tenant: order.tenant.clone(),
            order: order_doc.to_vec(),
            wrapped_key: Some(wrapped),
        };
        self.store
            .register(
                &rec,
                now,
                // The tenant checks their order against this hash (`attesta-verify`).
                serde_json::json!({"tenant": order.tenant,
                    "order_sha256": hex::encode(proto::bundle::sha256(order_doc)),
                    "split": order.split.as_ref().map(|s| s.label())}),
            )
            .await?;
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm_id = %order.vm_id, tenant = %order.tenant, "VM registered");
        Ok(order.vm_id)
    }

    /// Crypto-shreds a VM on an operator-signed terminate order: the wrapped key is destroyed,
    /// the tombstone stays, and every later release is denied.
    pub async fn terminate(&self, order_doc: &[u8], now: u64) -> Result<String, RegisterError> {
        let order = Order::verify(order_doc, &self.operator_keys, now)?;
        if order.kind != OrderKind::Terminate {
            return Err(RegisterError::NotTerminate);
        }
        self.store
            .terminate(
                &order.vm_id,
                now,
                serde_json::json!({"order": "terminate", "tenant": order.tenant}),
            )
            .await?;
        self.metrics.terminations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm_id = %order.vm_id, "VM terminated: key crypto-shredded");
        Ok(order.vm_id)
    }
}
