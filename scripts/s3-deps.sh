#!/usr/bin/env bash
# A real S3 server for the backup tests and the demo's backup scene: Garage
# (https://garagehq.deuxfleurs.fr), built once from crates.io into /var/cache/attesta/garage
# (about 20 minutes on 2 cores; later runs find it there). Prints nothing else on success.
set -euo pipefail
bin=/var/cache/attesta/garage/bin/garage
version=2.5.0
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "[s3-deps] building Garage $version (S3 server for the backup tests; once per machine, ~20 min)" >&2
# Only the SQLite metadata engine: no LMDB, no K2V, no metrics exporter.
cargo install garage --version "$version" --locked --quiet \
  --no-default-features --features bundled-libs,sqlite \
  --root /var/cache/attesta/garage
