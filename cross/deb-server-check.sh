#!/usr/bin/env bash
# Checks the control plane's .deb from cross/deb-server.sh the way cross/deb-check.sh checks the agent's: metadata,
# contents and modes, conffile, maintainer scripts (syntax, the system user), a real `dpkg --unpack` into a scratch
# root with its own database, `drover --version` from that root, the hardened unit (`systemd-analyze verify` and its
# required keys), and the shipped serve.toml run by the unpacked binary: refused as shipped (mqtt_listen on 0.0.0.0
# with nothing advertised, the message saying what to set) and serving once one name is advertised.
#
#   cross/deb-server-check.sh [DEB...]     default: cross/out/deb/drover_*.deb
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[cross/deb-server-check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

if [ $# -gt 0 ]; then DEBS=("$@"); else DEBS=("$ROOT"/cross/out/deb/drover_*.deb); fi
[ -f "${DEBS[0]}" ] || fail "no drover_*.deb found: run cross/deb-server.sh first"

for deb in "${DEBS[@]}"; do
  name="$(basename "$deb")"
  arch="$(dpkg-deb -f "$deb" Architecture)"
  [ "$(dpkg-deb -f "$deb" Package)" = drover ] || fail "$name: Package is not drover"
  case "$name" in *"_${arch}.deb") ;; *) fail "$name: file name does not end in _$arch.deb" ;; esac
  dpkg-deb -f "$deb" Depends | grep -q 'libc6 (>= 2\.' || fail "$name: no versioned libc6 dependency"

  listing="$(dpkg-deb -c "$deb")"
  for w in '-rwxr-xr-x root/root .* ./usr/bin/drover$' \
           '-rw-r--r-- root/root .* ./lib/systemd/system/drover.service$' \
           '-rw-r----- root/root .* ./etc/drover/serve.toml$'; do
    grep -Eq -- "$w" <<<"$listing" || fail "$name: no entry matching '$w'"
  done

  scratch="$(mktemp -d)"
  serve_pid=""
  trap '[ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; rm -rf "$scratch"' EXIT
  dpkg-deb -e "$deb" "$scratch/DEBIAN"
  grep -qx /etc/drover/serve.toml "$scratch/DEBIAN/conffiles" || fail "$name: serve.toml is not a conffile"
  for s in postinst prerm postrm; do
    [ -x "$scratch/DEBIAN/$s" ] || fail "$name: $s missing or not executable"
    sh -n "$scratch/DEBIAN/$s" || fail "$name: $s has a syntax error"
  done
  grep -q 'adduser --system\|useradd --system' "$scratch/DEBIAN/postinst" || fail "$name: postinst creates no system user"
  grep -q 'install -d -o drover -g drover -m 0700 /var/lib/drover' "$scratch/DEBIAN/postinst" \
    || fail "$name: postinst does not make /var/lib/drover the user's alone"
  if grep -q 'rm -rf /var/lib/drover' "$scratch/DEBIAN/postrm"; then fail "$name: purge deletes the fleet's keys"; fi

  r="$scratch/root"
  mkdir -p "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates" "$r/var/lib/dpkg/triggers"
  : >"$r/var/lib/dpkg/status"
  : >"$r/var/lib/dpkg/available"
  dpkg --root="$r" --force-depends --force-architecture --force-not-root --unpack "$deb" >/dev/null \
    || fail "$name: dpkg --unpack into scratch root failed"
  dpkg --root="$r" -s drover | grep -q '^Conffiles:' || fail "$name: dpkg did not register the conffile"
  drover="$r/usr/bin/drover"
  [ -x "$drover" ] || fail "$name: binary not installed"
  machine="$(readelf -h "$drover" | awk -F: '/Machine:/{gsub(/^ +/,"",$2); print $2}')"
  case "$arch:$machine" in
    arm64:AArch64 | amd64:*X86-64*) ;;
    *) fail "$name: binary machine '$machine' does not match $arch" ;;
  esac
  case "$arch" in arm64) run=(qemu-aarch64-static) ;; *) run=() ;; esac
  if [ ${#run[@]} -gt 0 ] && ! command -v "${run[0]}" >/dev/null; then
    log "$name: ${run[0]} not installed, binary not run"
  else
    version="$("${run[@]}" "$drover" --version)" || fail "$name: drover --version failed"
    [ "$version" = "drover $(dpkg-deb -f "$deb" Version)" ] || fail "$name: --version says '$version'"

    # The shipped config as shipped (unpacked, not configured: dpkg leaves a conffile as .dpkg-new):
    # refused, saying what to set.
    conf="$r/etc/drover/serve.toml"
    [ -f "$conf" ] || conf="$conf.dpkg-new"
    [ -f "$conf" ] || fail "$name: serve.toml not unpacked"
    state="$scratch/state"
    rc=0
    out="$(DROVER_DATA_DIR="$state" timeout 60 "${run[@]}" "$drover" serve --config "$conf" 2>&1)" || rc=$?
    [ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "$name: the shipped serve.toml started with nothing advertised (rc=$rc)"
    grep -q -- '--advertise HOST\[:PORT\]' <<<"$out" || { printf '%s\n' "$out" >&2; fail "$name: refusal does not say what to set"; }
    # With one name advertised (free ports, a scratch state dir) it serves: the API URL file appears.
    DROVER_DATA_DIR="$state" DROVER_ADVERTISE=drover.example.test "${run[@]}" "$drover" serve \
      --config "$conf" --http-listen 127.0.0.1:0 --mqtt-listen 0.0.0.0:0 \
      >"$scratch/serve.log" 2>&1 &
    serve_pid=$!
    for _ in $(seq 1 600); do
      [ -s "$state/api-url" ] && break
      kill -0 "$serve_pid" 2>/dev/null || break
      sleep 0.1
    done
    [ -s "$state/api-url" ] || { cat "$scratch/serve.log" >&2; fail "$name: drover serve did not start on the shipped config plus advertise"; }
    kill "$serve_pid"
    wait "$serve_pid" 2>/dev/null || true
    serve_pid=""
  fi

  unit="$r/lib/systemd/system/drover.service"
  for k in '^ExecStart=/usr/bin/drover serve --config /etc/drover/serve.toml$' '^User=drover$' \
           '^StateDirectory=drover$' '^ProtectSystem=strict$' '^NoNewPrivileges=yes$' '^ProtectHome=yes$' \
           '^PrivateTmp=yes$' '^CapabilityBoundingSet=$' '^SystemCallFilter=@system-service$' \
           '^\[Install\]' '^WantedBy=multi-user.target' '^Restart='; do
    grep -q -- "$k" "$unit" || fail "$name: unit lacks $k"
  done
  if command -v systemd-analyze >/dev/null; then
    vdir="$scratch/verify"
    mkdir -p "$vdir"
    sed "s|^ExecStart=/usr/bin/drover|ExecStart=$drover|" "$unit" >"$vdir/drover.service"
    rc=0
    out="$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$vdir/drover.service" 2>&1)" || rc=$?
    if [ "$rc" != 0 ] || grep -q "drover.service" <<<"$out"; then
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
