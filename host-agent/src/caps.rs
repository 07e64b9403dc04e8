//! The platform's SEV parameters from libvirt's domain capabilities.

use crate::domain::SevParams;

/// Why the SEV parameters could not be settled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    #[error("domain capabilities are not XML: {0}")]
    Xml(String),
    #[error(
        "the driver does not report SEV (no <sev supported='yes'>) and no cbitpos/reduced_phys_bits are configured"
    )]
    Unknown,
    #[error("configured {field} = {configured} but the driver reports {reported}")]
    Mismatch {
        field: &'static str,
        configured: u32,
        reported: u32,
    },
}

/// The emulator the driver uses for new domains (`/domainCapabilities/path`).
pub fn emulator(domcaps_xml: &str) -> Result<Option<String>, CapsError> {
    let doc = roxmltree::Document::parse(domcaps_xml).map_err(|e| CapsError::Xml(e.to_string()))?;
    Ok(doc
        .root_element()
        .children()
        .find(|n| n.tag_name().name() == "path")
        .and_then(|n| n.text())
        .map(str::to_string))
}

/// What the driver says (`None` when it reports no SEV support or no values).
pub fn reported(domcaps_xml: &str) -> Result<Option<SevParams>, CapsError> {
    let doc = roxmltree::Document::parse(domcaps_xml).map_err(|e| CapsError::Xml(e.to_string()))?;
    let Some(sev) = doc.descendants().find(|n| {
        n.tag_name().name() == "sev"
            && n.parent()
                .is_some_and(|p| p.tag_name().name() == "features")
    }) else {
        return Ok(None);
    };
    if sev.attribute("supported") != Some("yes") {
        return Ok(None);
    }
    let num = |name: &str| {
        sev.children()
            .find(|n| n.tag_name().name() == name)
            .and_then(|n| n.text())
            .and_then(|t| t.trim().parse::<u32>().ok())
    };
    Ok(match (num("cbitpos"), num("reducedPhysBits")) {
        (Some(cbitpos), Some(reduced_phys_bits)) => Some(SevParams {
            cbitpos,
            reduced_phys_bits,
        }),
        _ => None,
    })
}

/// The parameters to use: the driver's; where it cannot tell, the configured ones; a
/// configured value the driver contradicts is an error, not silently overridden.
pub fn settle(
    reported: Option<SevParams>,
    configured: Option<SevParams>,
) -> Result<SevParams, CapsError> {
    match (reported, configured) {
        (Some(r), Some(c)) => {
            if r.cbitpos != c.cbitpos {
                return Err(CapsError::Mismatch {
                    field: "cbitpos",
                    configured: c.cbitpos,
                    reported: r.cbitpos,
                });
            }
            if r.reduced_phys_bits != c.reduced_phys_bits {
                return Err(CapsError::Mismatch {
                    field: "reduced_phys_bits",
                    configured: c.reduced_phys_bits,
                    reported: r.reduced_phys_bits,
                });
            }
            Ok(r)
        }
        (Some(r), None) => Ok(r),
        (None, Some(c)) => Ok(c),
        (None, None) => Err(CapsError::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM: &str = "<domainCapabilities><domain>kvm</domain><features>\
        <sev supported='yes'><cbitpos>51</cbitpos><reducedPhysBits>1</reducedPhysBits>\
        <maxGuests>509</maxGuests></sev></features></domainCapabilities>";
    const TEST: &str = "<domainCapabilities><domain>test</domain><features>\
        <sev supported='no'/></features></domainCapabilities>";
    const P: SevParams = SevParams {
        cbitpos: 51,
        reduced_phys_bits: 1,
    };

    #[test]
    fn reads_the_driver_and_settles() {
        assert_eq!(reported(KVM), Ok(Some(P)));
        assert_eq!(reported(TEST), Ok(None));
        assert!(matches!(reported("<x"), Err(CapsError::Xml(_))));
        assert_eq!(settle(Some(P), None), Ok(P));
        assert_eq!(settle(None, Some(P)), Ok(P));
        assert_eq!(settle(None, None), Err(CapsError::Unknown));
        let other = SevParams { cbitpos: 47, ..P };
        assert!(matches!(
            settle(Some(P), Some(other)),
            Err(CapsError::Mismatch {
                field: "cbitpos",
                ..
            })
        ));
    }
}
