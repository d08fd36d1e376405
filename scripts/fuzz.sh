#!/usr/bin/env bash
# Fuzzes the decoders that take untrusted bytes (saga payloads, bearer tokens, addresses and
# money) for FUZZ_SECONDS each (default 10). cargo-fuzz needs nightly features: stable rustc is
# asked for them with RUSTC_BOOTSTRAP=1, without the sanitizer (which needs a nightly std).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
seconds=${FUZZ_SECONDS:-10}
export RUSTC_BOOTSTRAP=1
for target in event_decode bearer_token address_and_money; do
  cargo fuzz run --sanitizer none -O "$target" -- -max_total_time="$seconds" -max_len=4096 2>&1 \
    | grep -E "^Done|ERROR|panicked|crash" || true
  # cargo fuzz exits non-zero on a crash; the pipe above hides it, so check the artifacts.
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz target $target crashed: see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
