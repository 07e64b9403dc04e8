//! AMD's root (ARK) and intermediate (ASK for VCEKs, ASVK for VLEKs) certificates, built in and
//! pinned by their exact bytes. Retrieved from AMD's key server (`/vcek/v1/{product}/cert_chain`,
//! `/vlek/v1/{product}/cert_chain`); the SHA-256 of each DER is checked by a test against
//! independently published values.

use crate::Product;
use crate::certs::{AmdCert, to_der};
use std::sync::OnceLock;

/// PEM of a built-in certificate.
pub fn pem(product: Product, which: Builtin) -> &'static str {
    use Builtin::*;
    use Product::*;
    match (product, which) {
        (Milan, Ark) => include_str!("../roots/milan/ark.pem"),
        (Milan, Ask) => include_str!("../roots/milan/ask.pem"),
        (Milan, Asvk) => include_str!("../roots/milan/asvk.pem"),
        (Genoa, Ark) => include_str!("../roots/genoa/ark.pem"),
        (Genoa, Ask) => include_str!("../roots/genoa/ask.pem"),
        (Genoa, Asvk) => include_str!("../roots/genoa/asvk.pem"),
        (Turin, Ark) => include_str!("../roots/turin/ark.pem"),
        (Turin, Ask) => include_str!("../roots/turin/ask.pem"),
        (Turin, Asvk) => include_str!("../roots/turin/asvk.pem"),
    }
}

/// Which built-in certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    Ark,
    Ask,
    Asvk,
}

/// The DER of a built-in certificate (decoded once).
pub fn der(product: Product, which: Builtin) -> &'static [u8] {
    static DERS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let all = DERS.get_or_init(|| {
        let mut v = Vec::new();
        for p in Product::ALL {
            for w in [Builtin::Ark, Builtin::Ask, Builtin::Asvk] {
                // The embedded files are tested to parse; empty can only mean a broken build.
                v.push(to_der(pem(p, w).as_bytes()).unwrap_or_default());
            }
        }
        v
    });
    let i = Product::ALL.iter().position(|&p| p == product).unwrap_or(0) * 3
        + match which {
            Builtin::Ark => 0,
            Builtin::Ask => 1,
            Builtin::Asvk => 2,
        };
    all.get(i).map(Vec::as_slice).unwrap_or(&[])
}

/// Parsed built-in certificate.
pub fn cert(product: Product, which: Builtin) -> Option<AmdCert> {
    AmdCert::from_der(der(product, which).to_vec()).ok()
}

/// The product whose built-in ARK has exactly these bytes.
pub fn amd_ark_product(ark_der: &[u8]) -> Option<Product> {
    Product::ALL
        .into_iter()
        .find(|&p| der(p, Builtin::Ark) == ark_der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::sha256;

    // Published SHA-256 fingerprints of AMD's certificates (agreeing across virtee/sev,
    // go-sev-guest, trustee and AMD's key server).
    const PINS: [(Product, Builtin, &str); 9] = [
        (
            Product::Milan,
            Builtin::Ark,
            "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        ),
        (
            Product::Milan,
            Builtin::Ask,
            "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        ),
        (
            Product::Milan,
            Builtin::Asvk,
            "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
        ),
        (
            Product::Genoa,
            Builtin::Ark,
            "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        ),
        (
            Product::Genoa,
            Builtin::Ask,
            "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        ),
        (
            Product::Genoa,
            Builtin::Asvk,
            "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
        ),
        (
            Product::Turin,
            Builtin::Ark,
            "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        ),
        (
            Product::Turin,
            Builtin::Ask,
            "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        ),
        (
            Product::Turin,
            Builtin::Asvk,
            "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
        ),
    ];

    #[test]
    fn builtins_are_pinned_and_chain() {
        for (p, which, fp) in PINS {
            assert_eq!(hex::encode(sha256(der(p, which))), fp, "{p} {which:?}");
            let c = cert(p, which).expect("parses");
            let ark = cert(p, Builtin::Ark).expect("ark parses");
            assert!(c.signature_valid(&ark), "{p} {which:?} signed by ARK");
            let want = match which {
                Builtin::Ark => format!("ARK-{p}"),
                Builtin::Ask => format!("SEV-{p}"),
                Builtin::Asvk => format!("SEV-VLEK-{p}"),
            };
            assert_eq!(c.subject_cn.as_deref(), Some(want.as_str()));
            assert!(c.is_ca);
        }
        assert_eq!(
            amd_ark_product(der(Product::Genoa, Builtin::Ark)),
            Some(Product::Genoa)
        );
        assert_eq!(amd_ark_product(der(Product::Genoa, Builtin::Ask)), None);
    }
}
