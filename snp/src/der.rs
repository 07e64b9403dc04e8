//! A minimal, panic-free DER TLV reader for the few places where we need the bytes exactly as
//! received (the TBS part a signature covers) or AMD's loosely encoded extension values.

/// One TLV: its tag, the value bytes, and the whole encoding (header + value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: u8,
    pub value: &'a [u8],
    pub whole: &'a [u8],
}

/// Reads one TLV at the start of `input`; returns it and the rest. Only definite lengths,
/// single-byte tags and minimal length encodings (DER) are accepted.
pub fn read_tlv(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in what we read
    }
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (lb, rest) = rest.split_at(n);
        if lb[0] == 0 {
            return None; // non-minimal
        }
        let len = lb
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        if len < 0x80 {
            return None; // non-minimal
        }
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    let (value, after) = rest.split_at(len);
    Some((
        Tlv {
            tag,
            value,
            whole: &input[..header + len],
        },
        after,
    ))
}

/// Reads exactly one TLV spanning all of `input`.
pub fn read_exact(input: &[u8]) -> Option<Tlv<'_>> {
    match read_tlv(input)? {
        (t, []) => Some(t),
        _ => None,
    }
}

/// A DER INTEGER that is non-negative and fits in a u64.
pub fn uint(tlv: &Tlv<'_>) -> Option<u64> {
    if tlv.tag != 0x02 || tlv.value.is_empty() {
        return None;
    }
    let v = tlv.value;
    if v[0] & 0x80 != 0 {
        return None; // negative
    }
    let v = if v.len() > 1 && v[0] == 0 {
        if v[1] & 0x80 == 0 {
            return None; // non-minimal
        }
        &v[1..]
    } else {
        v
    };
    if v.len() > 8 {
        return None;
    }
    Some(v.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_short_and_long_forms() {
        let (t, rest) = read_tlv(&[0x04, 0x02, 0xaa, 0xbb, 0x00]).unwrap();
        assert_eq!(
            (t.tag, t.value, rest),
            (0x04, &[0xaa, 0xbb][..], &[0x00][..])
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([7u8; 0x80]);
        assert_eq!(read_exact(&long).unwrap().value.len(), 0x80);
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(read_tlv(&[0x04, 0x05, 1, 2]).is_none());
        assert!(read_tlv(&[0x04, 0x81, 0x05, 1, 2, 3, 4, 5]).is_none()); // non-minimal
        assert!(read_tlv(&[0x04, 0x80]).is_none()); // indefinite
        assert!(read_tlv(&[]).is_none());
        assert!(read_exact(&[0x04, 0x00, 0x00]).is_none());
    }

    #[test]
    fn integers() {
        let t = read_exact(&[0x02, 0x02, 0x00, 0xdb]).unwrap();
        assert_eq!(uint(&t), Some(0xdb));
        assert_eq!(uint(&read_exact(&[0x02, 0x01, 0x05]).unwrap()), Some(5));
        assert_eq!(uint(&read_exact(&[0x02, 0x01, 0x85]).unwrap()), None);
        assert_eq!(uint(&read_exact(&[0x02, 0x02, 0x00, 0x05]).unwrap()), None);
    }
}
