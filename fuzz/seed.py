#!/usr/bin/env python3
"""Seeds the fuzz corpora (fuzz/corpus/<target>/, not committed) from the SNP corpus and the
repository's examples, so the fuzzers start from real reports, certificates and tables."""
import base64, os, pathlib, re, struct, sys, uuid

root = pathlib.Path(__file__).resolve().parent
snp = pathlib.Path(os.environ.get("ATTESTA_SNP_CORPUS", root.parent.parent / "shared" / "snp-corpus"))
out = root / "corpus"

def der(data: bytes) -> bytes:
    if data[:1] == b"\x30":
        return data
    m = re.search(rb"-----BEGIN [^-]+-----(.*?)-----END", data, re.S)
    return base64.b64decode(b"".join(m.group(1).split())) if m else data

def put(target: str, name: str, data: bytes) -> None:
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)

GUIDS = {"vcek": "63da758d-e664-4564-adc5-f4b93be8accd", "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
         "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae"}

def table(certs):
    off = 24 * (len(certs) + 1)
    head, body = b"", b""
    for kind, data in certs:
        head += uuid.UUID(GUIDS[kind]).bytes + struct.pack("<II", off, len(data))
        off += len(data)
        body += data
    return head + b"\0" * 24 + body

# A LUKS2 header as the guest agent formats it (cryptsetup CLI, same parameters).
import subprocess, tempfile
with tempfile.TemporaryDirectory() as t:
    img, kf = pathlib.Path(t) / "disk.img", pathlib.Path(t) / "key"
    kf.write_bytes(b"\x5a" * 64)
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    r = subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--cipher", "aes-xts-plain64",
                        "--key-size", "512", "--sector-size", "4096", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", "--key-file", str(kf), str(img)],
                       capture_output=True)
    if r.returncode == 0:
        put("luks_header", "agent-format", img.read_bytes()[:32768])
put("policy", "example.toml", (root.parent / "examples" / "policy.toml").read_bytes())
put("cert_table", "empty", b"\0" * 24)
put("host_spec", "vm.toml", (root.parent / "examples" / "vm.toml").read_bytes())
put("host_spec", "host.toml", (root.parent / "examples" / "host.toml").read_bytes())
put("host_spec", "control-create.json", b'{"op":"create","spec":"vm_id = \\"a\\"","order":"AAAA","start":true}')
put("host_spec", "control-list.json", b'{"op":"list"}')
ovmf = pathlib.Path("/usr/share/ovmf/OVMF.fd")
if ovmf.is_file():
    # The last pages carry the footer table and SEV metadata the parser reads.
    put("ovmf", "debian-ovmf-tail", ovmf.read_bytes()[-8192:])
if not snp.is_dir():
    print(f"seed: no SNP corpus at {snp}; seeded from examples only", file=sys.stderr)
    sys.exit(0)
n = 0
for item in sorted(p for p in snp.iterdir() if (p / "report.bin").is_file()):
    report = (item / "report.bin").read_bytes()
    vcek = next((der((item / f).read_bytes()) for f in ("vcek.der", "vcek.pem", "vlek.der") if (item / f).exists()), b"")
    put("report", item.name, report)
    put("verify", item.name, report + vcek)
    put("certificate", item.name + "-vcek", vcek)
    for f in ("ask.pem", "ark.pem", "cert_chain.pem"):
        if (item / f).exists():
            put("certificate", f"{item.name}-{f}", (item / f).read_bytes())
    if (item / "ask.pem").exists():
        ask, ark = der((item / "ask.pem").read_bytes()), der((item / "ark.pem").read_bytes())
        put("cert_table", item.name, table([("vcek", vcek), ("ask", ask), ("ark", ark)]))
    n += 1
print(f"seed: {n} evidence bundles from {snp}")
