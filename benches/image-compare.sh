#!/usr/bin/env bash
# The image store's push and pull throughput on loopback next to cp and curl from a plain HTTP
# file server, one run. Usage: benches/image-compare.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/imagebench --size-mib "${1:-1024}"
