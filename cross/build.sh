#!/usr/bin/env bash
# Cross-build release `drover-agent` for device targets with Debian's toolchain (rustup cannot add
# targets here): rustc-web + multiarch libstd-rust-web-dev, Debian cross gcc as linker.
#
#   cross/build.sh [TARGET...]      default: aarch64, armv7 and x86_64 (all *-linux-gnu)
#
# Env: DROVER_CROSS_PROFILE (default release-size), CARGO_TARGET_DIR (default target/cross),
#      DROVER_CROSS_NO_APT=1 to never touch apt, CARGO_PROFILE_RELEASE_SIZE_* to override the profile
#      (cross/ci.sh uses thin LTO for speed),
#      DROVER_CROSS_GLIBC (default 2.17): link against this glibc version's symbols with zig
#      (cargo-zigbuild, `<target>.<glibc>`), so the binary runs on distributions as old as that;
#      "host" links with the Debian cross gcc against the build machine's glibc instead,
#      DROVER_CROSS_TOOLS (default ~/.cache/drover-cross): where ziglang (PyPI) and
#      cargo-zigbuild (crates.io) are installed.
# Out: cross/out/<target>/drover-agent and cross/out/build-summary.tsv
#      (target, build seconds, bytes, newest GLIBC_ version the binary requires).
# Idempotent: installs only what is missing, cargo rebuilds only what changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/cross/out"
PROFILE="${DROVER_CROSS_PROFILE:-release-size}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
DEFAULT_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-gnu)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${DEFAULT_TARGETS[@]}"); fi

log() { printf '[cross/build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# target -> Debian arch, GNU triple (cross gcc prefix), qemu runner. qemu runs against the
# multiarch libc6:<arch>, not `-L /usr/<triple>`: that cross libc (2.36-8cross1) hangs (aarch64) or
# segfaults (armhf) in the first pthread_create under qemu 7.2.
deb_arch() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    x86_64-unknown-linux-gnu) echo amd64 ;;
    *) die "unsupported target $1" ;;
  esac
}
gnu_triple() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
    x86_64-unknown-linux-gnu) echo x86_64-linux-gnu ;;
  esac
}
qemu_runner() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo "qemu-aarch64-static" ;;
    armv7-unknown-linux-gnueabihf) echo "qemu-arm-static" ;;
    *) echo "" ;;
  esac
}
host_arch() { dpkg --print-architecture; }

apt_install() {
  [ "${DROVER_CROSS_NO_APT:-0}" = 1 ] && die "missing packages ($*) and DROVER_CROSS_NO_APT=1"
  [ "$(id -u)" = 0 ] || die "missing packages ($*): run as root or install them"
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

APT_UPDATED=0
apt_update() {
  [ "$APT_UPDATED" = 1 ] && return 0
  APT_UPDATED=1
  # A half-synced mirror index for one foreign arch must not stop the others: warn and go on.
  apt-get update -qq || log "warning: apt-get update reported errors (continuing with what loaded)"
}

# The std rlibs for a target must come from exactly the rustc-web version that is installed.
ensure_std() {
  local target="$1" arch ver
  [ -d "/usr/lib/rustlib/$target/lib" ] && return 0
  arch="$(deb_arch "$target")"
  ver="$(dpkg-query -W -f='${Version}' rustc-web)"
  add_arch "$target"
  apt_update
  if apt-cache madison "libstd-rust-web-dev:$arch" 2>/dev/null | grep -qF "$ver"; then
    apt_install "libstd-rust-web-dev:$arch=$ver"
  else
    # Seen on bookworm-security: the armhf index failed its size check ("Mirror sync in progress?"),
    # so apt only offers an older version. The rlibs are arch-independent data for the host rustc;
    # fetch the same-version .deb from the pool and unpack only /usr/lib/rustlib/<target>.
    # rustc itself rejects rlibs built by another compiler version.
    local src file tmp
    src="$(apt-cache show "rustc-web=$ver" | awk '/^Filename:/{print $2; exit}')"
    file="$(dirname "$src")/libstd-rust-web-dev_${ver/*:/}_${arch}.deb"
    tmp="$(mktemp -d)"
    log "warning: apt has no libstd-rust-web-dev:$arch=$ver; fetching $file from the pool"
    for base in http://deb.debian.org/debian-security http://deb.debian.org/debian; do
      /usr/lib/apt/apt-helper download-file "$base/$file" "$tmp/std.deb" >/dev/null 2>&1 && break
    done
    [ -s "$tmp/std.deb" ] || die "could not fetch libstd-rust-web-dev for $arch ($ver)"
    dpkg-deb -x "$tmp/std.deb" "$tmp/x"
    cp -a "$tmp/x/usr/lib/rustlib/$target" /usr/lib/rustlib/
    rm -rf "$tmp"
  fi
  [ -d "/usr/lib/rustlib/$target/lib" ] || die "no std for $target after install"
}

add_arch() {
  local arch
  arch="$(deb_arch "$1")"
  if [ "$arch" != "$(host_arch)" ] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    [ "$(id -u)" = 0 ] && [ "${DROVER_CROSS_NO_APT:-0}" != 1 ] || die "dpkg architecture $arch not enabled"
    dpkg --add-architecture "$arch"
    APT_UPDATED=0
  fi
}

GLIBC_FLOOR="${DROVER_CROSS_GLIBC:-2.17}"
TOOLS="${DROVER_CROSS_TOOLS:-${HOME:-/root}/.cache/drover-cross}"
ZIG_VERSION=0.17.1          # PyPI `ziglang`
ZIGBUILD_VERSION=0.24.1     # crates.io `cargo-zigbuild`
use_zig() { [ "$GLIBC_FLOOR" != host ]; }

# zig (from the Python registry: ziglang ships the zig toolchain with glibc stubs for every
# version) and cargo-zigbuild (drives zig as cc and linker for cargo). Both pinned, both under
# $TOOLS, installed only when missing.
ensure_zig() {
  export PATH="$TOOLS/bin:$TOOLS/py/ziglang:$PATH"
  if ! [ -x "$TOOLS/py/ziglang/zig" ] || [ "$("$TOOLS/py/ziglang/zig" version)" != "$ZIG_VERSION" ]; then
    python3 -m pip --version >/dev/null 2>&1 || { apt_update; apt_install python3-pip; }
    log "pip install ziglang==$ZIG_VERSION into $TOOLS/py"
    # --target: outside the system site-packages, so PEP 668 does not apply.
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --upgrade --target "$TOOLS/py" "ziglang==$ZIG_VERSION"
  fi
  if ! [ -x "$TOOLS/bin/cargo-zigbuild" ]; then
    log "cargo install cargo-zigbuild@$ZIGBUILD_VERSION into $TOOLS"
    RUSTC="$RUSTC" "$CARGO" install -q --locked --root "$TOOLS" cargo-zigbuild --version "=$ZIGBUILD_VERSION"
  fi
  zig version >/dev/null || die "zig does not run"
}

ensure_tools() {
  local need=()
  dpkg -s rustc-web >/dev/null 2>&1 || need+=(rustc-web)
  dpkg -s cargo-web >/dev/null 2>&1 || need+=(cargo-web)
  command -v readelf >/dev/null || need+=(binutils)
  command -v python3 >/dev/null || need+=(python3) # cross/qemu_e2e.py
  local t
  for t in "${TARGETS[@]}"; do
    case "$t" in
      aarch64-*) use_zig || command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
                 command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
                 [ -e /lib/ld-linux-aarch64.so.1 ] || need+=(libc6:arm64) ;;
      armv7-*) use_zig || command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
               command -v qemu-arm-static >/dev/null || need+=(qemu-user-static)
               [ -e /lib/ld-linux-armhf.so.3 ] || need+=(libc6:armhf) ;;
      x86_64-*) command -v cc >/dev/null || need+=(gcc libc6-dev) ;;
    esac
  done
  if [ ${#need[@]} -gt 0 ]; then
    for t in "${TARGETS[@]}"; do add_arch "$t"; done
    apt_update
    # shellcheck disable=SC2046
    apt_install $(printf '%s\n' "${need[@]}" | sort -u)
  fi
  for t in "${TARGETS[@]}"; do ensure_std "$t"; done
}

# Newest GLIBC_x.y symbol version the binary depends on = oldest glibc it runs on.
min_glibc() {
  readelf -W --version-info "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -uV | tail -1
}

ensure_tools

RUSTC="${RUSTC:-/usr/bin/rustc}"
CARGO="${CARGO:-/usr/bin/cargo}"
[ -x "$RUSTC" ] || die "$RUSTC missing"
[ -x "$CARGO" ] || CARGO="$(command -v cargo)"
export RUSTC RUSTDOC="${RUSTDOC:-/usr/bin/rustdoc}"
if use_zig; then
  ensure_zig
  LINKER_DESC="zig $(zig version) via cargo-zigbuild, glibc $GLIBC_FLOOR"
else
  LINKER_DESC="gcc, host glibc"
fi
log "$("$RUSTC" --version), $("$CARGO" --version), profile $PROFILE, $LINKER_DESC, CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

mkdir -p "$OUT"
SUMMARY="$OUT/build-summary.tsv"
printf 'target\tbuild_s\tbytes\tmin_glibc\n' >"$SUMMARY"
for t in "${TARGETS[@]}"; do
  triple="$(gnu_triple "$t")"
  up="$(echo "$t" | tr 'a-z-' 'A-Z_')"
  low="$(echo "$t" | tr '-' '_')"
  log "building $t"
  start=$(date +%s)
  if use_zig; then
    # zig is cc, ar and linker for C/asm (ring, tract-linalg kernels) and the final link; the
    # `.2.17` suffix selects the glibc stubs. Output still lands in $CARGO_TARGET_DIR/<target>/.
    CARGO="$CARGO" cargo-zigbuild zigbuild --locked --profile "$PROFILE" -p drover-agent --target "$t.$GLIBC_FLOOR"
  else
    if [ "$t" != x86_64-unknown-linux-gnu ] || [ "$(host_arch)" != amd64 ]; then
      export "CARGO_TARGET_${up}_LINKER=${triple}-gcc" "CC_${low}=${triple}-gcc" "AR_${low}=${triple}-ar"
    fi
    "$CARGO" build --locked --profile "$PROFILE" -p drover-agent --target "$t"
  fi
  secs=$(( $(date +%s) - start ))
  bin="$CARGO_TARGET_DIR/$t/$PROFILE/drover-agent"
  mkdir -p "$OUT/$t"
  cp "$bin" "$OUT/$t/drover-agent.tmp" && mv "$OUT/$t/drover-agent.tmp" "$OUT/$t/drover-agent"
  bytes=$(stat -c %s "$OUT/$t/drover-agent")
  glibc=$(min_glibc "$OUT/$t/drover-agent")
  # Smoke: the binary starts on its (emulated) CPU.
  runner="$(qemu_runner "$t")"
  # shellcheck disable=SC2086
  $runner "$OUT/$t/drover-agent" --version >/dev/null || die "$t binary does not start under '${runner:-native}'"
  printf '%s\t%s\t%s\t%s\n' "$t" "$secs" "$bytes" "$glibc" >>"$SUMMARY"
  log "$t: ${secs}s, $bytes bytes ($(awk "BEGIN{printf \"%.2f\", $bytes/1048576}") MiB), needs glibc >= ${glibc#GLIBC_}"
done
{ column -t "$SUMMARY" 2>/dev/null || cat "$SUMMARY"; } >&2
