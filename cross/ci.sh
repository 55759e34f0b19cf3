#!/usr/bin/env bash
# CI entry point for the cross part: build the device agents, run them under qemu-user against a
# native `drover serve`, package and check the .debs (the agents', and the control plane's amd64 one). Prints per-step timings; exits non-zero on
# the first failure.
#
#   cross/ci.sh
#
# Env: DROVER_CROSS_TARGETS (default "aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf";
#      add x86_64-unknown-linux-gnu for the amd64 package), DROVER_CROSS_FAST_LTO=1 (default) builds
#      release-size with thin LTO and 16 codegen units to fit the CI budget (0: fat LTO, cgu 1,
#      the shipped configuration), DROVER_CROSS_PROFILE (default release-size; .ci/run uses
#      cross-check, a dev-based profile that builds in minutes), DROVER_CROSS_E2E_TIMEOUT (seconds
#      per wait, default 240).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
read -r -a TARGETS <<<"${DROVER_CROSS_TARGETS:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf}"
if [ "${DROVER_CROSS_FAST_LTO:-1}" = 1 ]; then
  export CARGO_PROFILE_RELEASE_SIZE_LTO=thin CARGO_PROFILE_RELEASE_SIZE_CODEGEN_UNITS=16
fi

# The native control plane shares the main (debug) target dir; remember it before build.sh
# picks its own default for the cross builds.
NATIVE_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TIMINGS=()
T0=$(date +%s)
step() {
  local name="$1"; shift
  local s=$(date +%s)
  printf '\n== cross/ci: %s ==\n' "$name" >&2
  if "$@"; then
    TIMINGS+=("$(printf '%-28s %5ss ok' "$name" $(( $(date +%s) - s )))")
  else
    local rc=$?
    TIMINGS+=("$(printf '%-28s %5ss FAILED (rc=%s)' "$name" $(( $(date +%s) - s )) "$rc")")
    report
    exit "$rc"
  fi
}
report() {
  printf '\n== cross/ci timings ==\n' >&2
  printf '%s\n' "${TIMINGS[@]}" >&2
  printf '%-28s %5ss\n' total $(( $(date +%s) - T0 )) >&2
}

native_drover() {
  # The control plane runs natively: the normal toolchain and the main target dir (shared with the
  # debug test suite, so usually already built).
  cargo build -q -p drover-cli --bin drover
}

e2e() {
  local args=() t
  for t in "${TARGETS[@]}"; do args+=(--agent "$t=cross/out/$t/drover-agent"); done
  # Hard outer bound in case a wait inside hangs in a syscall.
  timeout --kill-after=10 900 python3 cross/qemu_e2e.py --drover "${NATIVE_TARGET_DIR}/debug/drover" "${args[@]}" \
    --timeout "${DROVER_CROSS_E2E_TIMEOUT:-240}" --json cross/out/e2e.json
}

step "build ${#TARGETS[@]} agents" cross/build.sh "${TARGETS[@]}"
step "native drover" native_drover
step "qemu e2e" e2e
debs() {
  rm -rf cross/out/deb # check exactly what this run built
  cross/deb.sh "${TARGETS[@]}"
}

step "deb" debs
step "deb check" cross/deb-check.sh
# The control plane's package, amd64, from the native binary built above (debug info stripped).
step "drover deb" cross/deb-server.sh "${NATIVE_TARGET_DIR}/debug/drover"
step "drover deb check" cross/deb-server-check.sh
report
{ column -t cross/out/build-summary.tsv 2>/dev/null || cat cross/out/build-summary.tsv; } >&2
