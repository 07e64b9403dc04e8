//! Mesh identities for attested guests: the broker certifies the Ed25519 key a guest bound in
//! its report, for that VM's name, address and tenant, short-lived.

use proto::order::Order;
use zeroize::Zeroizing;

/// Issues an attested guest its mesh certificate: name = VM id, the order's `mesh_ip`, group
/// `tenant:<tenant>`, role guest, short-lived; for the key bound in the guest's report only.
pub struct GuestIssuer {
    ca: mesh::cert::MeshCert,
    /// `ca` and the certificates above it as `guest_ca/ca.crt` lists them (DER), sent with each
    /// certificate so that an intermediate works without the broker holding the root's key.
    chain: Vec<serde_bytes::ByteBuf>,
    /// The certificates above `ca`, parsed (empty when `ca` is the root).
    above: Vec<mesh::cert::MeshCert>,
    key: Zeroizing<String>,
    /// Validity of a guest certificate, seconds (each boot gets a new one).
    ttl: u64,
}

impl GuestIssuer {
    /// An issuer certifying with `ca` (whose key is `key`); `above` are the certificates over
    /// it up to the mesh's root, issuer first (empty when `ca` is the root).
    pub fn new(
        ca: mesh::cert::MeshCert,
        above: Vec<mesh::cert::MeshCert>,
        key: Zeroizing<String>,
        ttl: u64,
    ) -> GuestIssuer {
        let chain = std::iter::once(&ca)
            .chain(&above)
            .map(|c| serde_bytes::ByteBuf::from(c.der.clone()))
            .collect();
        GuestIssuer {
            ca,
            chain,
            above,
            key,
            ttl,
        }
    }

    /// Whether this CA can sign a revocation list of its own: an intermediate the root issued
    /// directly can (its list revokes only what it issued; nodes take lists from no deeper CA);
    /// a root's list would replace the mesh operator's.
    pub fn can_revoke(&self) -> bool {
        let root = |c: &mesh::cert::MeshCert| c.issued_by(c);
        !root(&self.ca) && self.above.iter().all(root)
    }

    /// Whether one of `roots` issued this CA itself (what nodes require of a list's signer).
    pub fn issued_by_one_of(&self, roots: &[mesh::cert::MeshCert]) -> bool {
        roots.iter().any(|r| self.ca.issued_by(r))
    }

    /// The CA's name (a delegated list's `ca`).
    pub fn ca_name(&self) -> &str {
        &self.ca.name
    }

    /// What nodes hold this CA's revocation list under.
    pub fn list_id(&self) -> String {
        mesh::revocation::delegated_id(&self.ca)
    }

    /// A guest certificate's lifetime, seconds.
    pub fn ttl(&self) -> u64 {
        self.ttl
    }

    /// `body` signed as this CA's delegated revocation list.
    pub fn sign_revocations(&self, body: &mesh::revocation::Body) -> Result<Vec<u8>, String> {
        if !self.can_revoke() {
            return Err(format!(
                "guest CA {} is a root: its list would replace the mesh operator's",
                self.ca.name
            ));
        }
        mesh::revocation::sign_delegated(&self.ca, &self.above, &self.key, body)
            .map_err(|e| e.to_string())
    }

    /// What goes with each certificate: the issuing CA and those above it (DER).
    pub fn chain(&self) -> &[serde_bytes::ByteBuf] {
        &self.chain
    }

    /// When a certificate issued at `now` ends: the lease it gives.
    pub fn not_after(&self, now: u64) -> u64 {
        now.saturating_add(self.ttl).min(self.ca.not_after)
    }

    /// The certificate (DER), or why none.
    pub fn issue(&self, order: &Order, mesh_key: &[u8; 32], now: u64) -> Result<Vec<u8>, String> {
        // The name is also the certificate's DNS name: a single label, so that a guest can never
        // hold a service's name (such as the broker's) under the mesh CA clients pin.
        if !mesh::cert::is_plain_name(&order.vm_id) {
            return Err(format!(
                "the VM id {:?} is not a single DNS label: no mesh certificate",
                order.vm_id
            ));
        }
        let ip = order
            .mesh_ip
            .as_deref()
            .ok_or("the order names no mesh_ip")?;
        let req = mesh::cert::Request {
            name: &order.vm_id,
            claims: mesh::cert::Claims {
                v: 1,
                ips: vec![ip.to_string()],
                groups: vec![format!("tenant:{}", order.tenant)],
                role: Some(mesh::cert::Role::Guest),
                // A leaf: no CA constraints (whatever fields the mesh adds for those).
                ..Default::default()
            },
            is_ca: false,
            not_before: now.saturating_sub(60).max(self.ca.not_before),
            not_after: self.not_after(now),
            curve: mesh::cert::Curve::Ed25519,
        };
        mesh::cert::sign_for_key(&self.ca, &self.key, &req, mesh_key).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::order;

    #[test]
    fn a_guest_mesh_name_is_one_dns_label() {
        let ca = mesh::cert::LocalCa::root("ca", &[], 1_000, 1_000_000).unwrap();
        let issuer = GuestIssuer::new(ca.cert.clone(), vec![], ca.key.clone(), 3600);
        let with = |vm: &str| Order {
            vm_id: vm.into(),
            mesh_ip: Some("10.42.2.1/16".into()),
            ..order("")
        };
        let der = issuer.issue(&with("vm-1"), &[7; 32], 5_000).unwrap();
        let cert = mesh::cert::MeshCert::parse(&der).unwrap();
        assert_eq!(cert.name, "vm-1");
        assert_eq!(cert.claims.groups, ["tenant:t"]);
        for bad in ["kbs.attesta.local", "", "vm 1", "vm/1"] {
            let e = issuer.issue(&with(bad), &[7; 32], 5_000).unwrap_err();
            assert!(e.contains("single DNS label"), "{bad}: {e}");
        }
        // No address in the order: no certificate.
        let e = issuer.issue(&order(""), &[7; 32], 5_000).unwrap_err();
        assert!(e.contains("mesh_ip"), "{e}");
    }
}
