//! A tenant can recompute the usage hash: Python's `json.dumps(sort_keys=True,
//! separators=(",",":"), ensure_ascii=True)` of the parsed document gives the same bytes, and
//! `hashlib.sha256` the same hash.

use host_agent::usage::{Event, HOUR, Meter, Terms};
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn python_rebuilds_the_same_bytes_and_hash() {
    let mut m = Meter::new();
    let h = 493_000 * HOUR;
    for (vm, account, rate, at) in [
        (
            "vm-\"q\"",
            "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
            1_000_000_000_000u128,
            h + 17,
        ),
        (
            "vm-ü",
            "tenant-é😀",
            340_282_366_920_938_463_463_374_607_431_768u128,
            h + 1000,
        ),
    ] {
        m.record(&Event::Started {
            vm_id: vm.into(),
            terms: Terms {
                account: account.into(),
                rate_per_hour: rate,
            },
            at,
        })
        .unwrap();
    }
    let docs = m.close_hour();
    assert_eq!(docs.len(), 2);
    for d in docs {
        assert!(d.json.is_ascii());
        let mut py = Command::new("python3")
            .args([
                "-c",
                "import sys,json,hashlib;d=json.loads(sys.stdin.read());\
                 s=json.dumps(d,sort_keys=True,separators=(',',':'),ensure_ascii=True);\
                 print(s);print(hashlib.sha256(s.encode()).hexdigest())",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        py.stdin
            .take()
            .unwrap()
            .write_all(d.json.as_bytes())
            .unwrap();
        let out = py.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(d.json.as_str()));
        assert_eq!(lines.next(), Some(hex::encode(d.hash).as_str()));
    }
}
