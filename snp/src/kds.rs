//! Names of things on AMD's Key Distribution Service and in offline VCEK stores, computed
//! without IO (the `snp-kds` crate does the fetching and file reading).

use crate::Product;
use crate::tcb::Tcb;

/// AMD's public key server.
pub const AMD_KDS_URL: &str = "https://kdsintf.amd.com";

/// Lowercase hex of the part of the chip id that identifies a chip to AMD (8 bytes on Turin).
pub fn hwid_hex(product: Product, chip_id: &[u8; 64]) -> String {
    hex::encode(&chip_id[..product.hwid_len()])
}

/// The query string of a VCEK request: `blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115`, with
/// `fmcSPL` first on Turin.
pub fn vcek_query(product: Product, tcb: &Tcb) -> String {
    let mut q = String::new();
    if product.has_fmc() {
        q.push_str(&format!("fmcSPL={:02}&", tcb.fmc.unwrap_or(0)));
    }
    q.push_str(&format!(
        "blSPL={:02}&teeSPL={:02}&snpSPL={:02}&ucodeSPL={:02}",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    ));
    q
}

/// Path (below the base URL) of the VCEK for a chip at a TCB.
pub fn vcek_path(product: Product, chip_id: &[u8; 64], tcb: &Tcb) -> String {
    format!(
        "/vcek/v1/{}/{}?{}",
        product.name(),
        hwid_hex(product, chip_id),
        vcek_query(product, tcb)
    )
}

/// Path of the ARK-signed CRL of a product.
pub fn crl_path(product: Product) -> String {
    format!("/vcek/v1/{}/crl", product.name())
}

/// Path of the ASK+ARK chain of a product.
pub fn cert_chain_path(product: Product) -> String {
    format!("/vcek/v1/{}/cert_chain", product.name())
}

/// File names an offline store may hold a VCEK under, most specific first, relative to the
/// store's root (layout compatible with trustee's):
/// `vcek/{hwid}/bl{n}_tee{n}_snp{n}_ucode{n}[_fmc{n}]_vcek.der` (2-digit zero-padded, then
/// unpadded), then `vcek/{hwid}/vcek.der`.
pub fn store_candidates(product: Product, chip_id: &[u8; 64], tcb: &Tcb) -> Vec<String> {
    let hw = hwid_hex(product, chip_id);
    let fmc_pad = tcb
        .fmc
        .filter(|_| product.has_fmc())
        .map(|f| format!("_fmc{f:02}"))
        .unwrap_or_default();
    let fmc_raw = tcb
        .fmc
        .filter(|_| product.has_fmc())
        .map(|f| format!("_fmc{f}"))
        .unwrap_or_default();
    let padded = format!(
        "vcek/{hw}/bl{:02}_tee{:02}_snp{:02}_ucode{:02}{fmc_pad}_vcek.der",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    );
    let raw = format!(
        "vcek/{hw}/bl{}_tee{}_snp{}_ucode{}{fmc_raw}_vcek.der",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    );
    let mut v = vec![padded];
    if raw != v[0] {
        v.push(raw);
    }
    v.push(format!("vcek/{hw}/vcek.der"));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milan_and_turin_names() {
        let mut chip = [0u8; 64];
        chip[0] = 0xab;
        chip[63] = 0xcd;
        let t = Tcb {
            fmc: None,
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
        };
        let p = vcek_path(Product::Milan, &chip, &t);
        assert!(p.starts_with("/vcek/v1/Milan/ab00"));
        assert!(p.ends_with("cd?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115"));
        let c = store_candidates(Product::Milan, &chip, &t);
        assert!(
            c[0].ends_with("/bl03_tee00_snp08_ucode115_vcek.der"),
            "{c:?}"
        );
        assert!(c[1].ends_with("/bl3_tee0_snp8_ucode115_vcek.der"));
        assert_eq!(c.len(), 3);

        let t = Tcb {
            fmc: Some(1),
            bootloader: 1,
            tee: 1,
            snp: 4,
            microcode: 81,
        };
        assert_eq!(hwid_hex(Product::Turin, &chip), "ab00000000000000");
        assert_eq!(
            vcek_path(Product::Turin, &chip, &t),
            "/vcek/v1/Turin/ab00000000000000?fmcSPL=01&blSPL=01&teeSPL=01&snpSPL=04&ucodeSPL=81"
        );
        assert_eq!(
            store_candidates(Product::Turin, &chip, &t)[0],
            "vcek/ab00000000000000/bl01_tee01_snp04_ucode81_fmc01_vcek.der"
        );
        assert_eq!(crl_path(Product::Genoa), "/vcek/v1/Genoa/crl");
    }
}
