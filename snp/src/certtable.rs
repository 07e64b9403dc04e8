//! The certificate table of an extended report (SNP_GET_EXT_REPORT / GHCB): 24-byte entries
//! `{guid[16], offset u32 LE, length u32 LE}` ended by an all-zero entry; offsets count from
//! the start of the table. GUIDs are stored in RFC 4122 byte order.

/// AMD Root Key.
pub const GUID_ARK: [u8; 16] = guid("c0b406a4-a803-4952-9743-3fb6014cd0ae");
/// AMD SEV Key (also used for the ASVK).
pub const GUID_ASK: [u8; 16] = guid("4ab7b379-bbac-4fe4-a02f-05aef327c782");
/// Versioned Chip Endorsement Key.
pub const GUID_VCEK: [u8; 16] = guid("63da758d-e664-4564-adc5-f4b93be8accd");
/// Versioned Loaded Endorsement Key.
pub const GUID_VLEK: [u8; 16] = guid("a8074bc2-a25a-483e-aae6-39c045a0b8a1");
/// A CRL (virtee's extension of the table).
pub const GUID_CRL: [u8; 16] = guid("92f81bc3-5811-4d3d-97ff-d19f88dc67ea");

/// Largest table accepted (the kernel's limit on extended-report certificate buffers is far lower).
pub const MAX_TABLE_LEN: usize = 1 << 20;
/// Most entries accepted.
pub const MAX_ENTRIES: usize = 64;
const ENTRY: usize = 24;

const fn hexval(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    }
}

const fn guid(s: &str) -> [u8; 16] {
    let b = s.as_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    let mut j = 0;
    while i < b.len() {
        if b[i] == b'-' {
            i += 1;
            continue;
        }
        out[j] = hexval(b[i]) << 4 | hexval(b[i + 1]);
        j += 1;
        i += 2;
    }
    out
}

/// Why a certificate table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertTableError {
    #[error("certificate table is {0} bytes, more than the {MAX_TABLE_LEN} accepted")]
    TooLarge(usize),
    #[error("certificate table ends before its terminating all-zero entry")]
    Unterminated,
    #[error("certificate table has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error(
        "entry {index} points outside the table (offset {offset}, length {length}, table {table} bytes)"
    )]
    OutOfBounds {
        index: usize,
        offset: u32,
        length: u32,
        table: usize,
    },
    #[error("entry {index} overlaps the entry headers")]
    OverlapsHeaders { index: usize },
    #[error("entry {index} has a zero GUID but is not the terminator")]
    ZeroGuid { index: usize },
    #[error("GUID {0} appears more than once")]
    Duplicate(String),
}

/// A parsed table: (GUID, certificate bytes) in table order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertTable {
    pub entries: Vec<([u8; 16], Vec<u8>)>,
}

/// Formats a GUID in its usual text form.
pub fn guid_string(g: &[u8; 16]) -> String {
    let h = hex::encode(g);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl CertTable {
    /// Parses a table. Never panics; rejects ambiguity (duplicate GUIDs) and anything out of bounds.
    pub fn parse(buf: &[u8]) -> Result<CertTable, CertTableError> {
        if buf.len() > MAX_TABLE_LEN {
            return Err(CertTableError::TooLarge(buf.len()));
        }
        let mut entries: Vec<([u8; 16], Vec<u8>)> = Vec::new();
        let mut index = 0usize;
        loop {
            let start = index * ENTRY;
            let Some(e) = buf.get(start..start + ENTRY) else {
                return Err(CertTableError::Unterminated);
            };
            let mut g = [0u8; 16];
            g.copy_from_slice(&e[..16]);
            let offset = u32::from_le_bytes([e[16], e[17], e[18], e[19]]);
            let length = u32::from_le_bytes([e[20], e[21], e[22], e[23]]);
            if g == [0; 16] {
                if offset == 0 && length == 0 {
                    break;
                }
                return Err(CertTableError::ZeroGuid { index });
            }
            if index >= MAX_ENTRIES {
                return Err(CertTableError::TooManyEntries);
            }
            let (o, l) = (offset as usize, length as usize);
            let end = o.checked_add(l).filter(|&end| end <= buf.len());
            let Some(end) = end else {
                return Err(CertTableError::OutOfBounds {
                    index,
                    offset,
                    length,
                    table: buf.len(),
                });
            };
            entries.push((g, buf[o..end].to_vec()));
            index += 1;
        }
        let headers_end = (index + 1) * ENTRY;
        for (i, (g, bytes)) in entries.iter().enumerate() {
            let e = &buf[i * ENTRY..i * ENTRY + ENTRY];
            let o = u32::from_le_bytes([e[16], e[17], e[18], e[19]]) as usize;
            if !bytes.is_empty() && o < headers_end {
                return Err(CertTableError::OverlapsHeaders { index: i });
            }
            if entries[..i].iter().any(|(h, _)| h == g) {
                return Err(CertTableError::Duplicate(guid_string(g)));
            }
        }
        Ok(CertTable { entries })
    }

    /// Encodes the table: headers, terminator, then each certificate in order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offset = (self.entries.len() + 1) * ENTRY;
        for (g, bytes) in &self.entries {
            out.extend_from_slice(g);
            out.extend_from_slice(&(offset as u32).to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            offset += bytes.len();
        }
        out.extend_from_slice(&[0u8; ENTRY]);
        for (_, bytes) in &self.entries {
            out.extend_from_slice(bytes);
        }
        out
    }

    /// The bytes stored under `guid`.
    pub fn get(&self, guid: &[u8; 16]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(g, _)| g == guid)
            .map(|(_, b)| b.as_slice())
    }

    /// The VLEK if present, else the VCEK.
    pub fn signing_cert(&self) -> Option<&[u8]> {
        self.get(&GUID_VLEK).or_else(|| self.get(&GUID_VCEK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_bytes_are_rfc4122_order() {
        assert_eq!(&GUID_VCEK[..4], &[0x63, 0xda, 0x75, 0x8d]);
        assert_eq!(
            guid_string(&GUID_ARK),
            "c0b406a4-a803-4952-9743-3fb6014cd0ae"
        );
    }

    #[test]
    fn round_trip_and_lookup() {
        let t = CertTable {
            entries: vec![
                (GUID_VCEK, vec![1, 2, 3]),
                (GUID_ASK, vec![4]),
                (GUID_ARK, vec![]),
            ],
        };
        let enc = t.encode();
        assert_eq!(CertTable::parse(&enc), Ok(t.clone()));
        assert_eq!(t.signing_cert(), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn rejects_bad_tables() {
        assert_eq!(CertTable::parse(&[]), Err(CertTableError::Unterminated));
        let mut t = CertTable {
            entries: vec![(GUID_VCEK, vec![1, 2, 3])],
        }
        .encode();
        t[20] = 0xff; // length beyond the buffer
        assert!(matches!(
            CertTable::parse(&t),
            Err(CertTableError::OutOfBounds { .. })
        ));
        let dup = CertTable {
            entries: vec![(GUID_VCEK, vec![1]), (GUID_VCEK, vec![2])],
        }
        .encode();
        assert!(matches!(
            CertTable::parse(&dup),
            Err(CertTableError::Duplicate(_))
        ));
        let mut overlap = CertTable {
            entries: vec![(GUID_VCEK, vec![1; 30])],
        }
        .encode();
        overlap[16] = 0; // offset 0: the certificate "is" the header
        assert_eq!(
            CertTable::parse(&overlap),
            Err(CertTableError::OverlapsHeaders { index: 0 })
        );
        let mut zero = vec![0u8; 48];
        zero[16] = 48;
        assert_eq!(
            CertTable::parse(&zero),
            Err(CertTableError::ZeroGuid { index: 0 })
        );
    }
}
