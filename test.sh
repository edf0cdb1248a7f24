#!/usr/bin/env bash
# Runs every test of converge: formatting, lints, and the whole suite (unit, in-memory host,
# the real binaries in temporary roots, crash consistency). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v git >/dev/null; then
    apt-get install -y -o DPkg::Lock::Timeout=600 git   # the compiler's diff reads revisions with git
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo nextest run --locked --workspace --profile ci
