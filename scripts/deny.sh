#!/usr/bin/env bash
# Licenses, banned and duplicate crates, and sources (deny.toml). cargo-deny comes from crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || cargo install --locked --quiet cargo-deny
# Duplicates print as warnings; a license, a wildcard or an unknown source fails.
cargo deny check licenses bans sources
