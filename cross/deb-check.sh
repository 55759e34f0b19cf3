#!/usr/bin/env bash
# Checks the agent .debs from cross/deb.sh: metadata, contents and modes, the binary's CPU,
# maintainer script syntax, a real `dpkg --unpack` into a scratch root with its own dpkg database
# (registers the conffile; no preinst exists, so nothing runs on this host), and the systemd unit
# with `systemd-analyze verify` (falls back to required-key checks when systemd is absent).
#
#   cross/deb-check.sh [DEB...]     default: cross/out/deb/drover-agent_*.deb
# Exit non-zero on the first failed check.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[cross/deb-check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

if [ $# -gt 0 ]; then DEBS=("$@"); else DEBS=("$ROOT"/cross/out/deb/drover-agent_*.deb); fi
[ -f "${DEBS[0]}" ] || fail "no .deb found: run cross/deb.sh first"

for deb in "${DEBS[@]}"; do
  name="$(basename "$deb")"
  arch="$(dpkg-deb -f "$deb" Architecture)"
  [ "$(dpkg-deb -f "$deb" Package)" = drover-agent ] || fail "$name: Package is not drover-agent"
  case "$name" in *"_${arch}.deb") ;; *) fail "$name: file name does not end in _$arch.deb" ;; esac
  dpkg-deb -f "$deb" Depends | grep -q 'libc6 (>= 2\.' || fail "$name: no versioned libc6 dependency"

  # Contents and modes.
  listing="$(dpkg-deb -c "$deb")"
  want=(
    '-rwxr-xr-x root/root .* ./usr/bin/drover-agent$'
    '-rw-r--r-- root/root .* ./lib/systemd/system/drover-agent.service$'
    '-rw-r--r-- root/root .* ./lib/systemd/system/drover-agent.service.d/10-debian-user.conf$'
    '-rw-r----- root/root .* ./etc/drover/agent.toml$'
  )
  for w in "${want[@]}"; do
    grep -Eq -- "$w" <<<"$listing" || fail "$name: no entry matching '$w'"
  done

  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  dpkg-deb -e "$deb" "$scratch/DEBIAN"
  grep -qx /etc/drover/agent.toml "$scratch/DEBIAN/conffiles" || fail "$name: agent.toml is not a conffile"
  for s in postinst prerm postrm; do
    [ -x "$scratch/DEBIAN/$s" ] || fail "$name: $s missing or not executable"
    sh -n "$scratch/DEBIAN/$s" || fail "$name: $s has a syntax error"
  done
  grep -q 'adduser --system\|useradd --system' "$scratch/DEBIAN/postinst" || fail "$name: postinst creates no system user"

  # Real dpkg unpack into a scratch root with its own database.
  r="$scratch/root"
  mkdir -p "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates" "$r/var/lib/dpkg/triggers"
  : >"$r/var/lib/dpkg/status"
  : >"$r/var/lib/dpkg/available"
  dpkg --root="$r" --force-depends --force-architecture --force-not-root --unpack "$deb" >/dev/null \
    || fail "$name: dpkg --unpack into scratch root failed"
  dpkg --root="$r" -s drover-agent | grep -q '^Conffiles:' || fail "$name: dpkg did not register the conffile"
  [ -x "$r/usr/bin/drover-agent" ] || fail "$name: binary not installed"

  machine="$(readelf -h "$r/usr/bin/drover-agent" | awk -F: '/Machine:/{gsub(/^ +/,"",$2); print $2}')"
  case "$arch:$machine" in
    arm64:AArch64 | armhf:ARM | amd64:*X86-64*) ;;
    *) fail "$name: binary machine '$machine' does not match $arch" ;;
  esac

  # The installed config parses with this very binary (emulated for foreign arches).
  case "$arch" in
    arm64) run=(qemu-aarch64-static) ;;
    armhf) run=(qemu-arm-static) ;;
    *) run=() ;;
  esac
  if [ ${#run[@]} -eq 0 ] || command -v "${run[0]}" >/dev/null; then
    "${run[@]}" "$r/usr/bin/drover-agent" --version >/dev/null || fail "$name: binary does not start"
  fi

  # The unit file.
  unit="$r/lib/systemd/system/drover-agent.service"
  for k in '^ExecStart=/usr/bin/drover-agent ' '^\[Install\]' '^WantedBy=multi-user.target' '^Restart=' \
           '^NoNewPrivileges=yes' '^StateDirectory=drover-agent'; do
    grep -q "$k" "$unit" || fail "$name: unit lacks $k"
  done
  grep -q '^User=drover' "$r/lib/systemd/system/drover-agent.service.d/10-debian-user.conf" \
    || fail "$name: drop-in does not set User=drover"
  if command -v systemd-analyze >/dev/null; then
    # verify wants ExecStart's binary to exist on this host; point it at a copy of the unit whose
    # ExecStart names the installed file. Any message naming our unit, or a non-zero status, fails.
    vdir="$scratch/verify"
    mkdir -p "$vdir/drover-agent.service.d"
    sed "s|^ExecStart=/usr/bin/drover-agent|ExecStart=$r/usr/bin/drover-agent|" "$unit" >"$vdir/drover-agent.service"
    cp "$r/lib/systemd/system/drover-agent.service.d/10-debian-user.conf" "$vdir/drover-agent.service.d/"
    rc=0
    out="$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$vdir/drover-agent.service" 2>&1)" || rc=$?
    if [ "$rc" != 0 ] || grep -q "drover-agent" <<<"$out"; then
      printf '%s\n' "$out" >&2
      fail "$name: systemd-analyze verify reported problems with the unit (rc=$rc)"
    fi
    log "$name: systemd-analyze verify clean"
  else
    log "$name: systemd-analyze not installed, required keys checked only"
  fi
  rm -rf "$scratch"
  trap - EXIT
  log "$name: OK ($arch, $(stat -c %s "$deb") bytes)"
done
