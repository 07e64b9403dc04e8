//! The libvirt domain XML of an SEV-SNP VM, as a pure function of a checked spec and the
//! platform's SEV parameters. Every value is escaped; nothing is read from the machine here.

use crate::spec::Checked;
use base64::Engine;
use std::fmt::Write;

/// The XML namespace of the agent's metadata element: how it finds its own domains again.
pub const METADATA_NS: &str = "urn:attesta:host:1";

/// Where the C-bit sits in a page-table entry and how many physical address bits SEV takes:
/// from the driver's domain capabilities, or configured where the driver cannot tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SevParams {
    pub cbitpos: u32,
    pub reduced_phys_bits: u32,
}

/// A VM without SEV-SNP hardware, for tests and demos (`[snp] mode = "simulated"` in
/// host.toml, never the default, refused where `/dev/sev` exists): no `<launchSecurity>`; the
/// guest's reports come from a simulated PSP outside it over a virtio-serial channel; its
/// console goes to a file the agent reads; a guest panic (every fail-closed path of the
/// image's `/init`) ends the domain through pvpanic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Simulated {
    /// `kvm` where KVM runs a stock guest kernel, else `qemu` (TCG).
    pub kvm: bool,
    /// The simulated PSP's Unix socket (it listens; QEMU connects).
    pub psp_socket: std::path::PathBuf,
    /// Where the guest's serial console is written.
    pub console_log: std::path::PathBuf,
}

/// The virtio-serial port name the guest looks for (as `simulator::psp::PORT_NAME`).
pub const PSP_PORT: &str = "org.attesta.psp.0";

/// How the VM is isolated.
enum Isolation<'a> {
    Snp(SevParams),
    Simulated(&'a Simulated),
}

/// Escapes text for XML element content and single- or double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn path(p: &std::path::Path) -> String {
    escape(&p.to_string_lossy())
}

/// The domain XML `attesta-host` defines for `c`.
pub fn domain_xml(c: &Checked, sev: SevParams) -> String {
    xml(c, Isolation::Snp(sev))
}

/// The domain XML of `c` on a host without SEV-SNP (see [`Simulated`]).
pub fn simulated_domain_xml(c: &Checked, sim: &Simulated) -> String {
    xml(c, Isolation::Simulated(sim))
}

fn xml(c: &Checked, iso: Isolation<'_>) -> String {
    let s = &c.spec;
    let snp = matches!(iso, Isolation::Snp(_));
    // virtio devices of an SEV guest DMA through bounce buffers: iommu='on'.
    let iommu = if snp { " iommu='on'" } else { "" };
    let mut x = String::new();
    // `write!` to a String cannot fail.
    let kind = match &iso {
        Isolation::Simulated(sim) if !sim.kvm => "qemu",
        _ => "kvm",
    };
    let _ = writeln!(x, "<domain type='{kind}'>");
    let _ = writeln!(x, "  <name>{}</name>", escape(&c.domain_name()));
    let _ = writeln!(x, "  <metadata>");
    // A simulated domain has no <launchSecurity>: what the simulated PSP launches it with
    // (policy, SEV features, HOST_DATA) is kept beside the id instead.
    let launch = match &iso {
        Isolation::Simulated(_) => format!(
            "<attesta:launch policy='0x{:x}' guest-features='0x{:x}' host-data='{}'/>",
            c.policy,
            c.guest_features,
            c.host_data.map(hex::encode).unwrap_or_default()
        ),
        Isolation::Snp(_) => String::new(),
    };
    let _ = writeln!(
        x,
        "    <attesta:vm xmlns:attesta='{METADATA_NS}'><attesta:id>{}</attesta:id>{launch}</attesta:vm>",
        escape(&s.vm_id)
    );
    let _ = writeln!(x, "  </metadata>");
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", s.memory_mib);
    // SEV-SNP guest memory comes from memfd (guest_memfd for the private part).
    let _ = writeln!(
        x,
        "  <memoryBacking>\n    <source type='memfd'/>\n  </memoryBacking>"
    );
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", s.vcpus);
    if let Some(p) = s.limits.cpu_percent {
        let period: u64 = 100_000;
        let _ = writeln!(
            x,
            "  <cputune>\n    <global_period>{period}</global_period>\n    <global_quota>{}</global_quota>\n  </cputune>",
            period * u64::from(p) / 100
        );
    }
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64' machine='q35'>hvm</type>");
    let _ = writeln!(
        x,
        "    <loader type='rom' stateless='yes'>{}</loader>",
        path(&s.boot.ovmf)
    );
    if let Some(k) = &s.boot.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", path(k));
        if let Some(i) = &s.boot.initrd {
            let _ = writeln!(x, "    <initrd>{}</initrd>", path(i));
        }
        if let Some(cmd) = &s.boot.cmdline {
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(cmd));
        }
    }
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features>\n    <acpi/>\n    <apic/>\n  </features>");
    let _ = writeln!(
        x,
        "  <cpu mode='custom' match='exact' check='none'>\n    <model fallback='forbid'>{}</model>\n  </cpu>",
        escape(&s.vcpu_type)
    );
    let _ = writeln!(x, "  <clock offset='utc'/>");
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(x, "  <devices>");
    let _ = writeln!(x, "    <disk type='file' device='disk'>");
    let _ = writeln!(
        x,
        "      <driver name='qemu' type='raw' cache='none'{iommu}/>"
    );
    let _ = writeln!(x, "      <source file='{}'/>", path(&s.disk.path));
    let _ = writeln!(x, "      <target dev='vda' bus='virtio'/>");
    if s.limits.disk_iops.is_some() || s.limits.disk_bytes_per_sec.is_some() {
        let _ = writeln!(x, "      <iotune>");
        if let Some(b) = s.limits.disk_bytes_per_sec {
            let _ = writeln!(x, "        <total_bytes_sec>{b}</total_bytes_sec>");
        }
        if let Some(i) = s.limits.disk_iops {
            let _ = writeln!(x, "        <total_iops_sec>{i}</total_iops_sec>");
        }
        let _ = writeln!(x, "      </iotune>");
    }
    let _ = writeln!(x, "    </disk>");
    if let Some(n) = &s.network {
        let _ = writeln!(x, "    <interface type='network'>");
        let _ = writeln!(x, "      <source network='{}'/>", escape(n));
        let _ = writeln!(x, "      <model type='virtio'/>");
        if snp {
            let _ = writeln!(x, "      <driver iommu='on'/>");
        }
        if let Some(k) = s.limits.net_kib_per_sec {
            let _ = writeln!(
                x,
                "      <bandwidth>\n        <inbound average='{k}'/>\n        <outbound average='{k}'/>\n      </bandwidth>"
            );
        }
        let _ = writeln!(x, "    </interface>");
    }
    if s.user_network {
        let _ = writeln!(
            x,
            "    <interface type='user'>\n      <model type='virtio'/>\n    </interface>"
        );
    }
    match &iso {
        Isolation::Simulated(sim) => {
            let log = path(&sim.console_log);
            let _ = writeln!(
                x,
                "    <serial type='file'>\n      <source path='{log}'/>\n      <target port='0'/>\n    </serial>"
            );
            let _ = writeln!(
                x,
                "    <console type='file'>\n      <source path='{log}'/>\n      <target type='serial' port='0'/>\n    </console>"
            );
            let _ = writeln!(
                x,
                "    <channel type='unix'>\n      <source mode='connect' path='{}'/>\n      <target type='virtio' name='{PSP_PORT}'/>\n    </channel>",
                path(&sim.psp_socket)
            );
            let _ = writeln!(x, "    <panic model='pvpanic'/>");
        }
        Isolation::Snp(_) => {
            let _ = writeln!(
                x,
                "    <serial type='pty'>\n      <target port='0'/>\n    </serial>"
            );
            let _ = writeln!(
                x,
                "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>"
            );
        }
    }
    if let Some(cid) = s.vsock_cid {
        let _ = writeln!(
            x,
            "    <vsock model='virtio'>\n      <cid auto='no' address='{cid}'/>\n      {}\n    </vsock>",
            if snp { "<driver iommu='on'/>" } else { "" }
        );
    }
    // No balloon: an SEV-SNP guest's memory cannot be shared back to the host that way.
    let _ = writeln!(x, "    <memballoon model='none'/>");
    let _ = writeln!(x, "  </devices>");
    let Isolation::Snp(sev) = iso else {
        let _ = writeln!(x, "</domain>");
        return x;
    };
    let _ = writeln!(
        x,
        "  <launchSecurity type='sev-snp'{}>",
        if s.boot.kernel.is_some() {
            " kernelHashes='yes'"
        } else {
            ""
        }
    );
    let _ = writeln!(x, "    <cbitpos>{}</cbitpos>", sev.cbitpos);
    let _ = writeln!(
        x,
        "    <reducedPhysBits>{}</reducedPhysBits>",
        sev.reduced_phys_bits
    );
    let _ = writeln!(x, "    <policy>0x{:08x}</policy>", c.policy);
    if let Some(h) = &c.host_data {
        let _ = writeln!(
            x,
            "    <hostData>{}</hostData>",
            base64::engine::general_purpose::STANDARD.encode(h)
        );
    }
    let _ = writeln!(x, "  </launchSecurity>");
    let _ = writeln!(x, "</domain>");
    x
}

/// The VM id in a domain's metadata element, if it is one of ours. `virDomainGetMetadata`
/// selects the element by [`METADATA_NS`] and returns it with the namespace stripped; an
/// element still carrying a namespace must carry ours.
pub fn vm_id_from_metadata(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    let ns = root.tag_name().namespace();
    if !matches!(ns, None | Some(METADATA_NS)) || root.tag_name().name() != "vm" {
        return None;
    }
    root.children()
        .find(|n| n.tag_name().name() == "id" && n.tag_name().namespace() == ns)
        .and_then(|n| n.text())
        .map(str::to_string)
        .filter(|id| crate::spec::valid_vm_id(id))
}

/// What a simulated domain launches, read back from its definition (libvirt's XML of the
/// defined domain, not the spec): the simulated PSP measures exactly this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedLaunch {
    pub vm_id: String,
    pub firmware: std::path::PathBuf,
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: u32,
    pub vcpu_type: String,
    pub policy: u64,
    pub guest_features: u64,
    pub host_data: [u8; 32],
    /// The PSP channel's socket, where the simulated PSP must listen.
    pub psp_socket: std::path::PathBuf,
    /// The QEMU binary the domain runs (`devices/emulator`), if it names one.
    pub emulator: Option<std::path::PathBuf>,
}

/// Reads a simulated domain's launch from its XML; errors name what is wrong.
///
/// Only the schema's own positions count (`/domain/os/loader|kernel|initrd|cmdline`,
/// `/domain/vcpu`, `/domain/cpu/model`, `/domain/devices/channel`), each at most once: a
/// decoy element elsewhere (a `<kernel>` inside the metadata, say) is not what QEMU boots.
/// Whatever else could make QEMU run or load something the measurement does not cover is
/// refused: namespaced elements outside `<metadata>` (`qemu:commandline`), firmware chosen by
/// libvirt or with variables, option ROMs, host devices, a CPU other than the named model, a
/// PSP channel that is not a plain client socket. Paths must be absolute and exactly as
/// written (libvirt does not trim them). Defence in depth: a simulated host's root holds the
/// simulated chip's keys anyway.
pub fn simulated_launch(xml: &str) -> Result<SimulatedLaunch, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let domain = doc.root_element();
    if domain.tag_name().name() != "domain" || domain.tag_name().namespace().is_some() {
        return Err("not a domain definition".into());
    }
    let metadata =
        only(domain, "metadata")?.ok_or("no metadata: not one of the agent's domains")?;
    if let Some(foreign) = domain.descendants().find(|n| {
        n.is_element()
            && n.tag_name().namespace().is_some()
            && !n.ancestors().any(|a| a == metadata)
    }) {
        return Err(format!(
            "the definition carries <{}> from namespace {}: a simulated domain launches only what its schema says",
            foreign.tag_name().name(),
            foreign.tag_name().namespace().unwrap_or_default()
        ));
    }
    let meta = metadata
        .children()
        .find(|n| n.tag_name().name() == "vm" && n.tag_name().namespace() == Some(METADATA_NS))
        .ok_or("no attesta metadata: not one of the agent's domains")?;
    let vm_id = meta
        .children()
        .find(|n| n.tag_name().name() == "id")
        .and_then(|n| n.text())
        .filter(|id| crate::spec::valid_vm_id(id))
        .ok_or("no valid VM id in the metadata")?
        .to_string();
    let launch = meta
        .children()
        .find(|n| n.tag_name().name() == "launch")
        .ok_or("no attesta:launch in the metadata: not a simulated domain")?;
    let hex_u64 = |what: &str| -> Result<u64, String> {
        let v = launch.attribute(what).ok_or(format!("no {what}"))?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(|e| format!("{what}: {e}"))
    };
    let mut host_data = [0u8; 32];
    match launch.attribute("host-data").unwrap_or("") {
        "" => {}
        h => hex::decode_to_slice(h, &mut host_data).map_err(|e| format!("host-data: {e}"))?,
    }
    let os = only(domain, "os")?.ok_or("no os element")?;
    if os.attribute("firmware").is_some() {
        return Err("os/@firmware: firmware chosen by libvirt is not the one measured".into());
    }
    if only(os, "nvram")?.is_some() {
        return Err("firmware variables (os/nvram) are outside the measurement".into());
    }
    let loader = only(os, "loader")?.ok_or("no firmware (os/loader)")?;
    if loader.attribute("type") != Some("rom") || loader.attribute("stateless") != Some("yes") {
        return Err("os/loader: only a stateless ROM is measured".into());
    }
    let devices = only(domain, "devices")?.ok_or("no devices")?;
    for (name, why) in [
        ("rom", "an option ROM runs in the firmware, unmeasured"),
        ("hostdev", "a host device is outside the measurement"),
    ] {
        if devices.descendants().any(|n| n.tag_name().name() == name) {
            return Err(format!("<{name}>: {why}"));
        }
    }
    // Host devices by other names: a passed-through or vDPA NIC, an NVMe controller.
    if let Some(d) = devices.children().find(|n| {
        matches!(
            (n.tag_name().name(), n.attribute("type")),
            ("interface", Some("hostdev" | "vdpa")) | ("disk", Some("nvme"))
        )
    }) {
        return Err(format!(
            "<{} type='{}'>: a host device is outside the measurement",
            d.tag_name().name(),
            d.attribute("type").unwrap_or_default()
        ));
    }
    let vcpu = only(domain, "vcpu")?.ok_or("no vcpu count")?;
    let vcpus: u32 = vcpu
        .text()
        .and_then(|v| v.trim().parse().ok())
        .ok_or("vcpu: not a count")?;
    if vcpu
        .attribute("current")
        .is_some_and(|c| c.trim().parse() != Ok(vcpus))
    {
        return Err("vcpu: fewer vCPUs at start than defined".into());
    }
    let cpu = only(domain, "cpu")?.ok_or("no cpu element")?;
    if cpu.attribute("mode") != Some("custom") {
        return Err("cpu: only a named model (mode='custom') is what is measured".into());
    }
    let vcpu_type = only(cpu, "model")?
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .ok_or("no cpu model")?
        .to_string();
    let mut psp = devices.children().filter(|n| {
        n.tag_name().name() == "channel"
            && n.children()
                .any(|t| t.tag_name().name() == "target" && t.attribute("name") == Some(PSP_PORT))
    });
    let channel = psp.next().ok_or("no PSP channel")?;
    if psp.next().is_some() {
        return Err("two PSP channels".into());
    }
    let source = only(channel, "source")?.ok_or("the PSP channel has no source")?;
    if channel.attribute("type") != Some("unix")
        || source.attribute("mode") != Some("connect")
        || source
            .children()
            .any(|n| n.tag_name().name() == "reconnect")
    {
        return Err("the PSP channel must be a plain client of a Unix socket".into());
    }
    let psp_socket = path_of("PSP socket", source.attribute("path"))?;
    let file = |name: &str| -> Result<Option<std::path::PathBuf>, String> {
        only(os, name)?
            .map(|n| path_of(name, Some(n.text().unwrap_or(""))))
            .transpose()
    };
    let cmdline = only(os, "cmdline")?
        .map(|n| n.text().unwrap_or("").to_string())
        .map(|c| match c.chars().any(char::is_control) {
            true => Err("cmdline: control characters".to_string()),
            false => Ok(c),
        })
        .transpose()?;
    let emulator = only(devices, "emulator")?
        .map(|n| path_of("emulator", n.text()))
        .transpose()?;
    Ok(SimulatedLaunch {
        vm_id,
        firmware: path_of("loader", loader.text())?,
        kernel: file("kernel")?,
        initrd: file("initrd")?,
        cmdline,
        vcpus,
        vcpu_type,
        policy: hex_u64("policy")?,
        guest_features: hex_u64("guest-features")?,
        host_data,
        psp_socket,
        emulator,
    })
}

/// An absolute path exactly as written: libvirt hands the text to QEMU untrimmed, so a path
/// the agent would trim, resolve from its own folder or cut at a control character is not
/// the one QEMU opens.
fn path_of(what: &str, text: Option<&str>) -> Result<std::path::PathBuf, String> {
    let t = text.unwrap_or("");
    if !t.starts_with('/') || t.trim() != t || t.chars().any(char::is_control) {
        return Err(format!("{what}: {t:?} is not an absolute path as written"));
    }
    Ok(t.into())
}

/// `parent`'s child element `name` (without a namespace), refusing a second one.
fn only<'a, 'i>(
    parent: roxmltree::Node<'a, 'i>,
    name: &str,
) -> Result<Option<roxmltree::Node<'a, 'i>>, String> {
    let mut it = parent.children().filter(|n| {
        n.is_element() && n.tag_name().namespace().is_none() && n.tag_name().name() == name
    });
    let first = it.next();
    if it.next().is_some() {
        return Err(format!(
            "two <{name}> elements in <{}>",
            parent.tag_name().name()
        ));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSpec;
    use proptest::prelude::*;

    const SEV: SevParams = SevParams {
        cbitpos: 51,
        reduced_phys_bits: 1,
    };

    fn example() -> Checked {
        VmSpec::parse(include_str!("../../examples/vm.toml")).unwrap()
    }

    #[test]
    fn the_example_has_every_part() {
        let x = domain_xml(&example(), SEV);
        let doc = roxmltree::Document::parse(&x).unwrap();
        let find = |name: &str| {
            doc.descendants()
                .find(|n| n.tag_name().name() == name)
                .unwrap_or_else(|| panic!("no <{name}> in {x}"))
        };
        let ls = find("launchSecurity");
        assert_eq!(ls.attribute("type"), Some("sev-snp"));
        assert_eq!(ls.attribute("kernelHashes"), Some("yes"));
        assert_eq!(find("policy").text(), Some("0x00030000"));
        assert_eq!(find("cbitpos").text(), Some("51"));
        assert_eq!(
            find("hostData").text(),
            Some(
                base64::engine::general_purpose::STANDARD
                    .encode([0x4a; 32])
                    .as_str()
            )
        );
        assert_eq!(
            find("cmdline").text(),
            Some("console=ttyS0 root=/dev/mapper/attesta-root ro")
        );
        assert_eq!(find("source").attribute("type"), Some("memfd"));
        assert_eq!(find("global_quota").text(), Some("200000"));
        assert_eq!(find("total_iops_sec").text(), Some("5000"));
        assert_eq!(find("cid").attribute("address"), Some("107"));
        assert_eq!(find("memballoon").attribute("model"), Some("none"));
        assert_eq!(find("model").text(), Some("EPYC-Milan"));
    }

    /// The example spec on user networking, simulated: the spec, the parameters, the XML.
    fn simulated_example() -> (Checked, Simulated, String) {
        let mut s = example().spec;
        s.network = None;
        s.user_network = true;
        let c = s.check().unwrap();
        let sim = Simulated {
            kvm: false,
            psp_socket: "/run/attesta/psp/vm-1.sock".into(),
            console_log: "/var/log/attesta/vm-1.console".into(),
        };
        let x = simulated_domain_xml(&c, &sim);
        (c, sim, x)
    }

    #[test]
    fn a_simulated_vm_has_no_launch_security_and_a_psp_channel() {
        let (c, sim, x) = simulated_example();
        let doc = roxmltree::Document::parse(&x).unwrap();
        let find = |name: &str| doc.descendants().find(|n| n.tag_name().name() == name);
        assert_eq!(doc.root_element().attribute("type"), Some("qemu"));
        assert!(find("launchSecurity").is_none(), "{x}");
        assert!(!x.contains("iommu"), "no SEV, no bounce buffers: {x}");
        let channel = find("channel").unwrap();
        assert_eq!(channel.attribute("type"), Some("unix"));
        let target = channel
            .children()
            .find(|n| n.tag_name().name() == "target")
            .unwrap();
        assert_eq!(target.attribute("name"), Some(PSP_PORT));
        assert_eq!(find("panic").unwrap().attribute("model"), Some("pvpanic"));
        assert_eq!(find("interface").unwrap().attribute("type"), Some("user"));
        assert_eq!(find("serial").unwrap().attribute("type"), Some("file"));
        // What the simulated PSP will measure comes back from the XML.
        let l = simulated_launch(&x).unwrap();
        assert_eq!(l.vm_id, c.spec.vm_id);
        assert_eq!(l.firmware, c.spec.boot.ovmf);
        assert_eq!(l.kernel, c.spec.boot.kernel);
        assert_eq!(l.initrd, c.spec.boot.initrd);
        assert_eq!(l.cmdline, c.spec.boot.cmdline);
        assert_eq!(
            (l.vcpus, l.vcpu_type.as_str()),
            (c.spec.vcpus, "EPYC-Milan")
        );
        assert_eq!((l.policy, l.guest_features), (c.policy, c.guest_features));
        assert_eq!(Some(l.host_data), c.host_data.or(Some([0; 32])));
        assert_eq!(l.psp_socket, sim.psp_socket);
        // An SNP domain is not a simulated one; a broken one says what is missing.
        assert!(simulated_launch(&domain_xml(&c, SEV)).is_err());
        assert!(
            simulated_launch(
                &x.replace("<loader", "<notloader")
                    .replace("</loader", "</notloader")
            )
            .is_err()
        );
        // The same spec on SNP hardware: launch security, no simulated PSP, the console on a pty.
        let hw = domain_xml(&c, SEV);
        assert!(hw.contains("<launchSecurity type='sev-snp'") && !hw.contains("<channel"));
        assert!(
            simulated_domain_xml(&c, &Simulated { kvm: true, ..sim })
                .starts_with("<domain type='kvm'>")
        );
        // A spec naming both networks is refused.
        let mut both = example().spec;
        both.user_network = true;
        assert_eq!(
            both.check().unwrap_err(),
            crate::spec::SpecError::TwoNetworks
        );
    }

    #[test]
    fn a_simulated_launch_is_read_only_where_qemu_reads_it() {
        let (c, sim, x) = simulated_example();
        let good = simulated_launch(&x).unwrap();
        // A decoy kernel inside the metadata is not what QEMU boots: the real one is measured.
        let decoy = x.replace(
            "</attesta:vm>",
            "<kernel>/decoy/vmlinuz</kernel><os><initrd>/decoy/initrd</initrd></os></attesta:vm>",
        );
        assert_eq!(simulated_launch(&decoy).unwrap(), good);
        // QEMU arguments of libvirt's qemu namespace could load another initrd: refused.
        let qemu_ns = x
            .replace(
                "<domain type='qemu'>",
                "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            )
            .replace(
                "</devices>",
                "</devices><qemu:commandline><qemu:arg value='-initrd'/><qemu:arg value='/evil'/></qemu:commandline>",
            );
        let err = simulated_launch(&qemu_ns).unwrap_err();
        assert!(err.contains("commandline"), "{err}");
        // Two kernels, a second PSP channel, fewer vCPUs at start, firmware variables: refused.
        let k = c.spec.boot.kernel.as_ref().unwrap().display().to_string();
        let two_kernels = x.replace("</os>", &format!("<kernel>{k}</kernel></os>"));
        assert!(
            simulated_launch(&two_kernels)
                .unwrap_err()
                .contains("two <kernel>")
        );
        let a = x.find("<channel").unwrap();
        let b = x.find("</channel>").unwrap() + "</channel>".len();
        let two_psps = x.replace("</devices>", &format!("{}</devices>", &x[a..b]));
        assert!(simulated_launch(&two_psps).unwrap_err().contains("two PSP"));
        let current = x.replace(
            "<vcpu placement='static'>",
            "<vcpu placement='static' current='1'>",
        );
        assert!(
            simulated_launch(&current)
                .unwrap_err()
                .contains("fewer vCPUs")
        );
        let nvram = x.replace("</os>", "<nvram>/var/lib/vars.fd</nvram></os>");
        assert!(simulated_launch(&nvram).unwrap_err().contains("nvram"));
        // Whatever could run or load what the measurement does not cover is refused.
        let k_path = c.spec.boot.kernel.as_ref().unwrap().display().to_string();
        let loader = format!(
            "<loader type='rom' stateless='yes'>{}</loader>",
            c.spec.boot.ovmf.display()
        );
        assert!(x.contains(&loader), "{x}");
        for (what, edited) in [
            (
                "as written",
                x.replace(&format!(">{k_path}<"), &format!(">{k_path}&#10;<")),
            ),
            ("as written", x.replace(&format!(">{k_path}<"), ">vmlinuz<")),
            ("firmware", x.replace("<os>", "<os firmware='efi'>")),
            (
                "loader",
                x.replace(&loader, &loader.replace("type='rom'", "type='pflash'")),
            ),
            (
                "loader",
                x.replace(&loader, &loader.replace(" stateless='yes'", "")),
            ),
            (
                "rom",
                x.replace(
                    "<model type='virtio'/>",
                    "<model type='virtio'/><rom file='/evil.efirom'/>",
                ),
            ),
            (
                "hostdev",
                x.replace(
                    "</devices>",
                    "<hostdev mode='subsystem' type='pci'/></devices>",
                ),
            ),
            (
                "host device",
                x.replace("<interface type='user'>", "<interface type='hostdev'>"),
            ),
            (
                "host device",
                x.replace("</devices>", "<disk type='nvme' device='disk'/></devices>"),
            ),
            ("cpu", x.replace("mode='custom'", "mode='host-passthrough'")),
            (
                "plain client",
                x.replace("<source mode='connect'", "<source mode='bind'"),
            ),
            (
                "plain client",
                x.replace("<channel type='unix'>", "<channel type='file'>"),
            ),
            (
                "plain client",
                x.replace(
                    &format!("path='{}'/>", sim.psp_socket.display()),
                    &format!(
                        "path='{}'><reconnect enabled='yes' timeout='1'/></source>",
                        sim.psp_socket.display()
                    ),
                ),
            ),
            ("control", x.replace("</cmdline>", "&#10;evil=1</cmdline>")),
        ] {
            assert_ne!(edited, x, "{what}: the edit applies");
            let err = simulated_launch(&edited).unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
        // The emulator is read as written, for the host to compare with its driver's.
        let emu = x.replace(
            "<devices>",
            "<devices><emulator>/usr/local/bin/wrap</emulator>",
        );
        assert_eq!(
            simulated_launch(&emu).unwrap().emulator.as_deref(),
            Some(std::path::Path::new("/usr/local/bin/wrap"))
        );
        assert_eq!(good.emulator, None);
        // A root that is not a domain, or a domain without our metadata, is not ours.
        assert!(simulated_launch("<attesta/>").is_err());
        let a = x.find("<metadata>").unwrap();
        let b = x.find("</metadata>").unwrap() + "</metadata>".len();
        let no_meta = format!("{}{}", &x[..a], &x[b..]);
        assert!(simulated_launch(&no_meta).unwrap_err().contains("metadata"));
    }

    #[test]
    fn without_a_kernel_there_are_no_kernel_hashes() {
        let mut c = example();
        c.spec.boot.kernel = None;
        c.spec.boot.initrd = None;
        c.spec.boot.cmdline = None;
        let x = domain_xml(&c, SEV);
        assert!(
            !x.contains("kernelHashes") && !x.contains("<kernel>"),
            "{x}"
        );
    }

    #[test]
    fn metadata_is_found_only_in_our_namespace() {
        let ours = format!(
            "<attesta:vm xmlns:attesta='{METADATA_NS}'><attesta:id>vm-7</attesta:id></attesta:vm>"
        );
        assert_eq!(vm_id_from_metadata(&ours).as_deref(), Some("vm-7"));
        // As libvirt returns it: namespace stripped.
        assert_eq!(
            vm_id_from_metadata("<vm>\n  <id>vm-7</id>\n</vm>").as_deref(),
            Some("vm-7")
        );
        assert_eq!(vm_id_from_metadata("<other><id>vm-7</id></other>"), None);
        let theirs = "<x:vm xmlns:x='urn:other'><x:id>vm-7</x:id></x:vm>";
        assert_eq!(vm_id_from_metadata(theirs), None);
        let bad = format!(
            "<attesta:vm xmlns:attesta='{METADATA_NS}'><attesta:id>../x</attesta:id></attesta:vm>"
        );
        assert_eq!(vm_id_from_metadata(&bad), None);
        assert_eq!(vm_id_from_metadata("<not xml"), None);
    }

    proptest! {
        /// Whatever a command line, path or network name holds (XML metacharacters, quotes,
        /// any non-control text), the XML parses and carries it back unchanged.
        #[test]
        fn values_are_escaped(
            cmdline in "[^\\p{Cc}]{0,80}",
            net in "[^\\p{Cc}]{1,30}",
            file in "[^\\p{Cc}/]{1,30}",
        ) {
            let mut c = example();
            c.spec.boot.cmdline = Some(cmdline.clone());
            c.spec.network = Some(net.clone());
            c.spec.disk.path = std::path::PathBuf::from(format!("/d/{file}"));
            let c = c.spec.check().unwrap();
            let x = domain_xml(&c, SEV);
            let doc = roxmltree::Document::parse(&x).unwrap();
            let text = |name: &str| doc.descendants().find(|n| n.tag_name().name() == name).and_then(|n| n.text()).unwrap_or("").to_string();
            prop_assert_eq!(text("cmdline"), cmdline);
            let src = doc.descendants().filter(|n| n.tag_name().name() == "source").filter_map(|n| n.attribute("network")).next().unwrap_or("");
            prop_assert_eq!(src, net.as_str());
            let disk = doc.descendants().filter(|n| n.tag_name().name() == "source").filter_map(|n| n.attribute("file")).next().unwrap_or("");
            prop_assert_eq!(disk, format!("/d/{file}"));
        }
    }
}
