//! The host agent against the real libvirt: its domain XML validates against libvirt's own
//! schema (`virt-xml-validate`), and the lifecycle runs on libvirt's built-in test driver
//! (`test:///default`, no daemon), including re-adoption by a fresh agent.

use host_agent::caps::CapsError;
use host_agent::domain::{SevParams, domain_xml};
use host_agent::host::{Host, HostError};
use host_agent::lifecycle::{Action, State};
use host_agent::spec::{Checked, VmSpec};
use std::path::Path;
use std::process::Command;

const SEV: SevParams = SevParams {
    cbitpos: 51,
    reduced_phys_bits: 1,
};

fn example() -> VmSpec {
    toml::from_str(include_str!("../../examples/vm.toml")).unwrap()
}

fn spec_in(dir: &Path, vm_id: &str) -> Checked {
    let mut s = example();
    s.vm_id = vm_id.into();
    s.disk.path = dir.join(format!("{vm_id}.img"));
    s.disk.size_gib = 1;
    s.check().unwrap()
}

fn validate(xml: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
        .expect("virt-xml-validate (apt-get install libxml2-utils libvirt-clients)");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn domain_xml_validates_against_libvirts_schema() {
    let base = example().check().unwrap();
    validate(&domain_xml(&base, SEV)).unwrap();
    // A simulated host's domain (no SEV-SNP hardware): user networking, the PSP's channel.
    let mut sim = example();
    sim.network = None;
    sim.user_network = true;
    validate(&host_agent::domain::simulated_domain_xml(
        &sim.check().unwrap(),
        &host_agent::domain::Simulated {
            kvm: false,
            psp_socket: "/run/attesta/psp/vm.sock".into(),
            console_log: "/var/log/attesta/vm.console".into(),
        },
    ))
    .unwrap();
    // Without direct boot, limits, network or vsock.
    let mut bare = example();
    bare.boot.kernel = None;
    bare.boot.initrd = None;
    bare.boot.cmdline = None;
    bare.network = None;
    bare.vsock_cid = None;
    bare.limits = Default::default();
    bare.snp.host_data = None;
    validate(&domain_xml(&bare.check().unwrap(), SEV)).unwrap();
    // Hostile values stay values.
    let mut hostile = example();
    hostile.boot.cmdline = Some("a'b\"c<d>&e </cmdline><kernel>/x</kernel>".into());
    hostile.network = Some("n'et<&>\"".into());
    hostile.disk.path = "/var/lib/x'<y>&\"z.img".into();
    let x = domain_xml(&hostile.check().unwrap(), SEV);
    validate(&x).unwrap();
    assert_eq!(x.matches("<kernel>").count(), 1, "{x}");
    // The schema check is real: a broken document fails it.
    assert!(validate(&x.replace("<vcpu placement='static'>", "<vcpu placement='x'>")).is_err());
}

#[test]
fn test_driver_reports_no_sev_so_parameters_must_be_configured() {
    match Host::open("test:///default", None) {
        Err(HostError::Caps(CapsError::Unknown)) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("the test driver reports no SEV: parameters must be configured"),
    }
}

#[test]
fn lifecycle_on_the_test_driver() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open("test:///default", Some(SEV)).unwrap();
    assert_eq!(host.sev(), Some(SEV));
    let c = spec_in(dir.path(), "vm-life");
    let vm = host.create(&c).unwrap();
    assert_eq!(
        (vm.state, vm.domain.as_str()),
        (State::Stopped, "attesta-vm-life")
    );
    let disk = &c.spec.disk.path;
    assert_eq!(
        std::fs::metadata(disk).unwrap().len(),
        1 << 30,
        "blank 1 GiB image"
    );
    assert!(matches!(host.create(&c), Err(HostError::Exists(_))));

    // Invalid transitions are refused before libvirt is touched.
    let e = host.act("vm-life", Action::Reboot).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot reboot a VM that is stopped (start it instead)"
    );
    assert!(matches!(
        host.act("vm-life", Action::Stop),
        Err(HostError::Transition(_))
    ));

    assert_eq!(host.act("vm-life", Action::Start).unwrap(), State::Running);
    assert_eq!(host.state("vm-life").unwrap(), State::Running);
    assert!(matches!(
        host.act("vm-life", Action::Start),
        Err(HostError::Transition(_))
    ));
    assert_eq!(host.act("vm-life", Action::Reboot).unwrap(), State::Running);
    assert_eq!(host.act("vm-life", Action::Stop).unwrap(), State::Stopped);
    assert_eq!(host.state("vm-life").unwrap(), State::Stopped);
    assert_eq!(host.act("vm-life", Action::Start).unwrap(), State::Running);

    // Terminate while running: destroyed, undefined, disk wiped and removed.
    assert_eq!(
        host.act("vm-life", Action::Terminate).unwrap(),
        State::Terminated
    );
    assert!(!disk.exists(), "the disk is removed");
    assert!(host.list().unwrap().iter().all(|v| v.vm_id != "vm-life"));
    assert!(matches!(
        host.act("vm-life", Action::Start),
        Err(HostError::Unknown(_))
    ));

    // A disk file that already exists is never reused for a new VM.
    let c2 = spec_in(dir.path(), "vm-reuse");
    std::fs::write(&c2.spec.disk.path, b"someone else's data").unwrap();
    assert!(matches!(host.create(&c2), Err(HostError::Disk { .. })));
    assert_eq!(
        std::fs::read(&c2.spec.disk.path).unwrap(),
        b"someone else's data"
    );
}

#[test]
fn a_restarted_agent_adopts_its_domains_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let first = Host::open("test:///default", Some(SEV)).unwrap();
    first.create(&spec_in(dir.path(), "vm-a")).unwrap();
    first.create(&spec_in(dir.path(), "vm-b")).unwrap();
    first.act("vm-b", Action::Start).unwrap();
    // A fresh agent (a new connection to the same driver state): no state of its own, it
    // finds its VMs by the metadata it wrote. The driver's own "test" domain is not ours.
    let second = Host::open("test:///default", Some(SEV)).unwrap();
    drop(first);
    let vms = second.list().unwrap();
    let mine: Vec<(&str, State)> = vms
        .iter()
        .filter(|v| v.vm_id == "vm-a" || v.vm_id == "vm-b")
        .map(|v| (v.vm_id.as_str(), v.state))
        .collect();
    assert_eq!(
        mine,
        vec![("vm-a", State::Stopped), ("vm-b", State::Running)]
    );
    assert!(
        vms.iter().all(|v| v.domain.starts_with("attesta-")),
        "{vms:?}"
    );
    assert!(matches!(
        second.act("test", Action::Stop),
        Err(HostError::Unknown(_))
    ));
    second.act("vm-a", Action::Terminate).unwrap();
    second.act("vm-b", Action::Terminate).unwrap();
}
