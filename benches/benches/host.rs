//! Lifecycle operations per second of the host agent on libvirt's test driver, against the raw
//! libvirt calls they make, in the same run: the agent's overhead (lifecycle check, metadata
//! lookup, state read; for create, the spec's XML and a blank disk by qemu-img).
//!
//! Run: `cargo bench -p attesta-benches --bench host`

use criterion::{Criterion, criterion_group, criterion_main};
use host_agent::domain::{SevParams, domain_xml};
use host_agent::host::Host;
use host_agent::lifecycle::Action;
use host_agent::spec::VmSpec;

const SEV: SevParams = SevParams {
    cbitpos: 51,
    reduced_phys_bits: 1,
};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = |id: &str| {
        let mut s: VmSpec =
            toml::from_str(include_str!("../../examples/vm.toml")).expect("example spec");
        s.vm_id = id.into();
        s.disk.path = dir.path().join(format!("{id}.img"));
        s.disk.size_gib = 1;
        s.check().expect("valid spec")
    };
    let host = Host::open("test:///default", Some(SEV)).expect("test driver");
    host.create(&spec("bench-agent")).expect("create");
    // The baseline's domain: the same XML, defined directly.
    let raw = virt::connect::Connect::open(Some("test:///default")).expect("connect");
    let raw_dom = raw
        .define_domain_xml(&domain_xml(&spec("bench-raw"), SEV))
        .expect("define");

    let mut g = c.benchmark_group("lifecycle");
    g.bench_function("agent_start_stop", |b| {
        b.iter(|| {
            host.act("bench-agent", Action::Start).expect("start");
            host.act("bench-agent", Action::Stop).expect("stop");
        })
    });
    g.bench_function("libvirt_start_destroy (baseline)", |b| {
        b.iter(|| {
            let d = raw
                .lookup_domain_by_name("attesta-bench-raw")
                .expect("lookup");
            d.create().expect("start");
            d.destroy().expect("destroy");
        })
    });
    host.act("bench-agent", Action::Start).expect("start");
    raw_dom.create().expect("start");
    g.bench_function("agent_reboot", |b| {
        b.iter(|| host.act("bench-agent", Action::Reboot).expect("reboot"))
    });
    g.bench_function("libvirt_reboot (baseline)", |b| {
        b.iter(|| {
            let d = raw
                .lookup_domain_by_name("attesta-bench-raw")
                .expect("lookup");
            d.reboot(0).expect("reboot");
        })
    });
    let mut n = 0u64;
    g.bench_function("agent_create_terminate", |b| {
        b.iter(|| {
            n += 1;
            let s = spec(&format!("bench-ct-{n}"));
            host.create(&s).expect("create");
            host.act(&s.spec.vm_id, Action::Terminate)
                .expect("terminate");
        })
    });
    let xml = domain_xml(&spec("bench-def"), SEV);
    g.bench_function("libvirt_define_undefine (baseline)", |b| {
        b.iter(|| {
            let d = raw.define_domain_xml(&xml).expect("define");
            d.undefine().expect("undefine");
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
