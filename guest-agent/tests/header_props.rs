//! Properties of the header check on a header the agent really wrote: it never panics, any byte
//! changed without fixing the checksums is refused, and an edit of the JSON with the checksums
//! fixed passes only if it leaves the metadata's meaning exactly as the agent wrote it.

use guest_agent::header::{self, Expect};
use guest_agent::luks::{self, DiskLabel, VolumeKey};
use proptest::prelude::*;
use std::sync::OnceLock;

const KEY: [u8; 64] = [0x33; 64];
const EXPECT: Expect<'static> = Expect {
    vm_id: "vm-p",
    generation: 4,
};

/// The two header copies of a disk the agent formatted (made once).
fn genuine() -> &'static [u8] {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let label = DiskLabel {
            vm_id: EXPECT.vm_id.into(),
            generation: EXPECT.generation,
        };
        luks::format(&img, &VolumeKey::from_bytes(&KEY).unwrap(), &label).unwrap();
        luks::read_metadata(&img).unwrap()[..2 * header::HDR_SIZE].to_vec()
    })
}

fn judge(meta: &[u8]) -> Result<(), header::HeaderError> {
    header::check(meta, &EXPECT)?.verify_mac(&KEY)
}

fn fix_checksums(meta: &mut [u8]) {
    for copy in meta.chunks_mut(header::HDR_SIZE) {
        copy[448..512].fill(0);
        let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, copy);
        copy[448..480].copy_from_slice(sum.as_ref());
    }
}

#[test]
fn the_genuine_header_passes() {
    judge(genuine()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_byte_changed_without_fixing_checksums_is_refused(
        edits in prop::collection::vec((0..2 * header::HDR_SIZE, 1u8..=255), 1..8),
    ) {
        let mut m = genuine().to_vec();
        for (at, x) in edits {
            m[at] ^= x;
        }
        prop_assert!(judge(&m).is_err());
    }

    #[test]
    fn a_json_edit_passes_only_if_it_keeps_the_meaning(
        edits in prop::collection::vec((0usize..4000, any::<u8>()), 1..4),
    ) {
        let mut m = genuine().to_vec();
        let text_len = m[4096..header::HDR_SIZE].iter().position(|&b| b == 0).unwrap();
        for (at, b) in edits {
            let at = 4096 + at % text_len;
            m[at] = b;
            m[header::HDR_SIZE + at] = b;
        }
        fix_checksums(&mut m);
        let same = matches!(
            (header::json_of(&m), header::json_of(genuine())),
            (Ok(a), Ok(b)) if a == b
        );
        prop_assert_eq!(judge(&m).is_ok(), same);
    }

    #[test]
    fn arbitrary_input_never_panics(data in prop::collection::vec(any::<u8>(), 0..40_000)) {
        let _ = judge(&data);
        let _ = header::is_blank(&data);
        let _ = header::json_of(&data);
    }
}
