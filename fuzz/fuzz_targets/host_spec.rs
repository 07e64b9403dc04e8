//! The host agent's decoders: VM specs and its configuration (TOML), libvirt domain capabilities
//! and domain metadata (XML), control-socket requests (JSON), chain remarks (a validator's
//! assignment), backup manifests read from a bucket (JSON). Parsing never panics; an accepted
//! spec gives XML that parses and carries its id; an accepted manifest round-trips.
#![no_main]
use host_agent::domain::{SevParams, domain_xml, vm_id_from_metadata};
use host_agent::spec::VmSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = host_agent::control::parse_request(data);
    // A remark as if signed by the one validator, naming this miner (all-zero accounts).
    let me = [0u8; 32];
    let mut remark = b"attesta/v1 assign ".to_vec();
    remark.extend_from_slice(data);
    let _ = host_agent::intake::parse(&remark, Some(&me), &[me], &me, |_| Ok(me), |_| [1; 32]);
    // An accepted manifest writes back to JSON that reads as the same manifest.
    if let Ok(m) = host_agent::backup::plan::Manifest::parse(data, "vm") {
        let again = serde_json::to_vec(&m).expect("a manifest serializes");
        assert_eq!(
            host_agent::backup::plan::Manifest::parse(&again, "vm").ok(),
            Some(m)
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = host_agent::config::HostConfig::parse(
        text,
        std::path::Path::new("/etc/attesta-host/host.toml"),
    );
    let _ = host_agent::caps::reported(text);
    let _ = vm_id_from_metadata(text);
    if let Ok(c) = VmSpec::parse(text) {
        let x = domain_xml(
            &c,
            SevParams {
                cbitpos: 51,
                reduced_phys_bits: 1,
            },
        );
        let doc = roxmltree::Document::parse(&x).expect("the agent's XML parses");
        let id = doc
            .descendants()
            .find(|n| n.tag_name().name() == "id")
            .and_then(|n| n.text());
        assert_eq!(id, Some(c.spec.vm_id.as_str()));
    }
});
