#!/usr/bin/env bash
# Runs every test of converge: formatting, lints, the whole suite (unit, in-memory host, the
# real binaries in temporary roots, crash consistency, end to end over TLS, and as root the
# container suite against real apt, shadow-utils and systemd), and a bounded fuzzing run.
# Installs what it needs.
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

# The container suite (real apt, useradd and systemd in disposable nspawn containers; dnf into
# an install root) runs as root, on a testbed prepared once and cached under /var/cache. Not as
# root it is skipped, and says so; CONVERGE_REQUIRE_CONTAINERS=1 (set by .ci/run) makes that a
# failure instead.
if [ "$(id -u)" = 0 ]; then
    if ! command -v chromium >/dev/null; then # the fleet page is tested in a real browser
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 chromium >/dev/null
    fi
    # Certificates and keys are tested over simulated years: libfaketime shifts the binaries'
    # clock (never the machine's).
    if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 libfaketime >/dev/null
    fi
    # Several servers share PostgreSQL: its tests make a cluster of their own in a temporary
    # directory from Debian's package (never using or changing the machine's clusters).
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 postgresql >/dev/null
    fi
    CONVERGE_TESTBED="$(tests/testbed/prepare)"
    export CONVERGE_TESTBED CONVERGE_CONTAINER_TESTS=1
    echo "container suite: on (testbed $CONVERGE_TESTBED)"
elif [ "${CONVERGE_REQUIRE_CONTAINERS:-0}" = 1 ]; then
    echo "the container suite needs root, and CONVERGE_REQUIRE_CONTAINERS=1 demands it" >&2
    exit 1
else
    echo "container suite: SKIPPED (not root); run ./test.sh as root to include it"
fi
cargo nextest run --locked --workspace --profile ci
if [ "$(id -u)" = 0 ]; then
    # Every system test again on Debian 13 (trixie); the run above booted Debian 12.
    CONVERGE_TESTBED="$(tests/testbed/prepare trixie)"
    echo "container suite on Debian 13: testbed $CONVERGE_TESTBED"
    cargo nextest run --locked --workspace --profile ci -E 'binary(system) or binary(services) or binary(kinds)'
fi

# Fuzz every parser that reads the network, a catalog or a repository, for a bounded time in
# all (FUZZ_SECONDS, 0 to skip; run them for hours as the README says). cargo-fuzz wants
# nightly flags; RUSTC_BOOTSTRAP lets this stable toolchain take them.
FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
FUZZ_TARGETS=(envelope catalog wire repository time)
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        cargo install --locked cargo-fuzz
    fi
    fuzz_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build --target-dir "$fuzz_dir") >/dev/null 2>&1 ||
        (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build --target-dir "$fuzz_dir")
    each=$(( FUZZ_SECONDS / ${#FUZZ_TARGETS[@]} ))
    [ "$each" -gt 0 ] || each=1
    for target in "${FUZZ_TARGETS[@]}"; do
        mkdir -p "fuzz/corpus/$target"
        log="$(mktemp)"
        if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir "$fuzz_dir" \
            "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$each" -rss_limit_mb=2048) >"$log" 2>&1; then
            tail -40 "$log" >&2
            echo "fuzzing $target failed (crashes are kept in fuzz/artifacts/$target/)" >&2
            exit 1
        fi
        echo "fuzz $target: $(grep -E '^Done [0-9]+ runs' "$log")"
        rm -f "$log"
    done
else
    echo "fuzzing skipped: FUZZ_SECONDS=0"
fi
