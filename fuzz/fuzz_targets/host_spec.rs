//! The host agent's decoders: VM specs and its configuration (TOML), libvirt domain capabilities
//! and domain metadata (XML), control-socket requests (JSON). Parsing never panics; an accepted
//! spec gives XML that parses and carries its id.
#![no_main]
use host_agent::domain::{SevParams, domain_xml, vm_id_from_metadata};
use host_agent::spec::VmSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = host_agent::control::parse_request(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = host_agent::config::HostConfig::parse(text, std::path::Path::new("/etc/attesta-host/host.toml"));
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
