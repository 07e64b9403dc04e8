//! An offline VCEK store: `{root}/vcek/{hwid}/bl{n}_tee{n}_snp{n}_ucode{n}[_fmc{n}]_vcek.der`.

use snp::kds::store_candidates;
use snp::{Product, Tcb};
use std::io;
use std::path::{Path, PathBuf};

/// A directory of VCEKs (and cached CRLs under `crl/{Product}.crl`).
#[derive(Clone, Debug)]
pub struct OfflineStore {
    root: PathBuf,
}

/// Largest certificate or CRL file read (AMD's are a few KiB; CRLs stay well below this).
const MAX_FILE: u64 = 4 << 20;

fn read_limited(p: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::metadata(p) {
        Ok(m) if m.len() > MAX_FILE => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {} bytes, larger than any certificate",
                p.display(),
                m.len()
            ),
        )),
        Ok(_) => std::fs::read(p).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes atomically: a temporary file in the same directory, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl OfflineStore {
    pub fn new(root: impl Into<PathBuf>) -> OfflineStore {
        OfflineStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VCEK for a chip at a TCB, and the file it came from; `None` if the store has none.
    pub fn lookup(
        &self,
        product: Product,
        chip_id: &[u8; 64],
        tcb: &Tcb,
    ) -> io::Result<Option<(PathBuf, Vec<u8>)>> {
        self.first_of(store_candidates(product, chip_id, tcb))
    }

    /// Like [`lookup`](Self::lookup) but only under TCB-specific names (never the generic
    /// `vcek.der`), as a cache must: a VCEK for another TCB would only be rejected.
    pub fn lookup_exact(
        &self,
        product: Product,
        chip_id: &[u8; 64],
        tcb: &Tcb,
    ) -> io::Result<Option<(PathBuf, Vec<u8>)>> {
        let names = store_candidates(product, chip_id, tcb)
            .into_iter()
            .filter(|r| !r.ends_with("/vcek.der"));
        self.first_of(names)
    }

    fn first_of(
        &self,
        names: impl IntoIterator<Item = String>,
    ) -> io::Result<Option<(PathBuf, Vec<u8>)>> {
        for rel in names {
            let p = self.root.join(&rel);
            if let Some(bytes) = read_limited(&p)? {
                return Ok(Some((p, bytes)));
            }
        }
        Ok(None)
    }

    /// Stores a VCEK under its most specific name.
    pub fn put(
        &self,
        product: Product,
        chip_id: &[u8; 64],
        tcb: &Tcb,
        der: &[u8],
    ) -> io::Result<PathBuf> {
        let rel = store_candidates(product, chip_id, tcb)
            .into_iter()
            .next()
            .unwrap_or_default();
        let p = self.root.join(rel);
        write_atomic(&p, der)?;
        Ok(p)
    }

    fn crl_path(&self, product: Product) -> PathBuf {
        self.root
            .join("crl")
            .join(format!("{}.crl", product.name()))
    }

    /// The cached CRL of a product, if any.
    pub fn crl(&self, product: Product) -> io::Result<Option<Vec<u8>>> {
        read_limited(&self.crl_path(product))
    }

    /// Caches a product's CRL.
    pub fn put_crl(&self, product: Product, der: &[u8]) -> io::Result<()> {
        write_atomic(&self.crl_path(product), der)
    }

    fn cert_chain_path(&self, product: Product) -> PathBuf {
        self.root
            .join("cert_chain")
            .join(format!("{}.pem", product.name()))
    }

    /// The product's ASK+ARK chain (PEM, as the key server's `cert_chain`), if any.
    pub fn cert_chain(&self, product: Product) -> io::Result<Option<Vec<u8>>> {
        read_limited(&self.cert_chain_path(product))
    }

    /// Keeps a product's ASK+ARK chain.
    pub fn put_cert_chain(&self, product: Product, pem: &[u8]) -> io::Result<()> {
        write_atomic(&self.cert_chain_path(product), pem)
    }
}
