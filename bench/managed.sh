#!/usr/bin/env bash
# Managed-mode scale benchmark (crates/relay/examples/managed_scale.rs): simulator + managed relay +
# receiver + passthrough relay in one process on 127.0.0.1. Builds it in release mode, runs
# it with the given arguments, and keeps the output in bench/out/managed-<UTC time>.txt.
#
#   bash bench/managed.sh                                   # 10,000 mailboxes, ~3-5 min
#   bash bench/managed.sh --mailboxes 2000 --notifications 5000
#   bash bench/managed.sh --help
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT"
cd "$REPO"
cargo build --release --example managed_scale
log="$OUT/managed-$(date -u +%Y%m%dT%H%M%SZ).txt"
./target/release/examples/managed_scale "$@" 2>&1 | tee "$log"
echo "output kept in $log"
