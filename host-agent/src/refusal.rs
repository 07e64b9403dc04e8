//! Why a create did not happen: a closed vocabulary ([`CreateError::code`]) that the chain's
//! answers carry, the text the control socket shows, and whether trying again later could
//! change the outcome (a broker or database out of reach) or not (anything the order, spec or
//! host decided).

/// Why a create was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("the order is not base64")]
    OrderEncoding,
    #[error("spec: {0}")]
    Spec(String),
    /// A task from the chain names files outside what `[chain]` allows.
    #[error("spec: {0}")]
    SpecPath(String),
    /// The order bills an account this agent keeps for its own records (`#…`).
    #[error("the order bills {0:?}, which is not an account")]
    BillingAccount(String),
    #[error("launch gate: {0}")]
    Gate(String),
    #[error(
        "this host's chip ({chip}) is not among the order's {count} chip id(s): the broker would deny every release"
    )]
    Chip { chip: String, count: usize },
    #[error("VM id {0} was used on this host before")]
    Duplicate(String),
    #[error("not created: {0}")]
    Capacity(#[from] crate::capacity::Refusal),
    /// The broker answered and refused the order.
    #[error("broker: refused ({code}): {detail}")]
    BrokerRefused { code: String, detail: String },
    /// The broker could not be reached (or its configuration read).
    #[error("broker: {0}")]
    BrokerUnreachable(String),
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// The agent's own database.
    #[error("{0}")]
    Store(String),
    /// Created and defined, but the start failed (credit, libvirt): the VM is there, stopped.
    #[error("{0}")]
    NotStarted(String),
}

impl CreateError {
    /// The code an answer on chain carries.
    pub fn code(&self) -> &'static str {
        match self {
            CreateError::OrderEncoding => "order_encoding",
            CreateError::Spec(_) => "spec",
            CreateError::SpecPath(_) => "spec_path",
            CreateError::BillingAccount(_) => "billing_account",
            CreateError::Gate(_) => "gate",
            CreateError::Chip { .. } => "chip",
            CreateError::Duplicate(_) => "duplicate",
            CreateError::Capacity(r) => r.code(),
            CreateError::BrokerRefused { .. } => "broker_refused",
            CreateError::BrokerUnreachable(_) => "broker_unreachable",
            CreateError::Libvirt(_) => "libvirt",
            CreateError::Store(_) => "store",
            CreateError::NotStarted(_) => "not_started",
        }
    }

    /// What an answer on chain says beside the code: a fixed text per code, so that nothing a
    /// task sent is echoed into a transaction and nothing of this host's files is told.
    pub fn public_reason(&self) -> &'static str {
        match self {
            CreateError::OrderEncoding => "the order is not base64",
            CreateError::Spec(_) => "the VM spec is not valid",
            CreateError::SpecPath(_) => {
                "the spec names files outside this host's image and disk folders"
            }
            CreateError::BillingAccount(_) => "the order bills no chain account",
            CreateError::Gate(_) => {
                "the launch gate refused: the operator's order does not allow this spec"
            }
            CreateError::Chip { .. } => "the order does not name this host's chip",
            CreateError::Duplicate(_) => "this VM id was used on this host before",
            CreateError::Capacity(r) => match r {
                crate::capacity::Refusal::Vcpus { .. } => "not enough vCPUs free on this host",
                crate::capacity::Refusal::Memory { .. } => "not enough memory free on this host",
                crate::capacity::Refusal::Disk { .. } => "not enough disk free on this host",
                crate::capacity::Refusal::TenantQuota { .. } => {
                    "the tenant's VM limit on this host is reached"
                }
            },
            CreateError::BrokerRefused { .. } => "the key broker refused the order",
            CreateError::BrokerUnreachable(_) => "the key broker could not be reached",
            CreateError::Libvirt(_) => "the hypervisor could not define the VM",
            CreateError::Store(_) => "the host agent's database failed",
            CreateError::NotStarted(_) => "created, but it could not be started",
        }
    }

    /// Whether the same create could succeed later (so a task from the chain is tried again,
    /// not answered): the broker or the agent's database out of reach.
    pub fn transient(&self) -> bool {
        matches!(
            self,
            CreateError::BrokerUnreachable(_) | CreateError::Store(_)
        )
    }
}

impl From<CreateError> for String {
    fn from(e: CreateError) -> String {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_what_is_tried_again() {
        let cap = CreateError::from(crate::capacity::Refusal::TenantQuota {
            tenant: "t".into(),
            used: 1,
            limit: 1,
        });
        assert_eq!(cap.code(), "tenant_quota");
        assert_eq!(
            cap.to_string(),
            "not created: tenant_quota: tenant t has 1 VM(s) here, its limit is 1"
        );
        assert!(!cap.transient());
        assert!(CreateError::BrokerUnreachable("timeout".into()).transient());
        assert!(CreateError::Store("locked".into()).transient());
        for e in [
            CreateError::OrderEncoding,
            CreateError::Spec("x".into()),
            CreateError::Gate("x".into()),
            CreateError::Duplicate("vm".into()),
            CreateError::BrokerRefused {
                code: "order_signature".into(),
                detail: "x".into(),
            },
            CreateError::Libvirt("x".into()),
        ] {
            assert!(!e.transient(), "{e}");
        }
    }
}
