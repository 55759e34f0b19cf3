#!/usr/bin/env bash
# Debian packages of the agent, one per architecture, from the binaries cross/build.sh left in
# cross/out/<target>/drover-agent. Plain dpkg-deb, no debhelper.
#
#   cross/deb.sh [TARGET...]    default: every target with a built binary
#
# Out: cross/out/deb/drover-agent_<version>_<arch>.deb
# Layout: /usr/bin/drover-agent, /lib/systemd/system/drover-agent.service (agent/drover-agent.service
# verbatim) plus a drop-in that swaps DynamicUser for the package's static `drover` system user,
# /etc/drover/agent.toml (conffile, agent/agent.toml). postinst creates the user and
# /var/lib/drover-agent; prerm stops the service; postrm purge removes the state dir.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/cross/out"
DEBS="$OUT/deb"
log() { printf '[cross/deb %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

deb_arch() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    x86_64-unknown-linux-gnu) echo amd64 ;;
    *) die "unsupported target $1" ;;
  esac
}

# The workspace version, written once in [workspace.package].
VERSION="$(awk '/^\[workspace.package\]/{p=1;next} /^\[/{p=0} p && /^version *=/{gsub(/[" ]/,"",$0); sub(/version=/,""); print; exit}' "$ROOT/Cargo.toml")"
[ -n "$VERSION" ] || die "no version in [workspace.package]"

if [ $# -gt 0 ]; then TARGETS=("$@"); else
  TARGETS=()
  for d in "$OUT"/*/drover-agent; do [ -f "$d" ] && TARGETS+=("$(basename "$(dirname "$d")")"); done
fi
[ ${#TARGETS[@]} -gt 0 ] || die "no binaries in $OUT/<target>/drover-agent: run cross/build.sh first"

CONFIG_SRC="$ROOT/agent/agent.toml"
UNIT_SRC="$ROOT/agent/drover-agent.service"
[ -f "$CONFIG_SRC" ] && [ -f "$UNIT_SRC" ] || die "agent/agent.toml or agent/drover-agent.service missing"

mkdir -p "$DEBS"
for t in "${TARGETS[@]}"; do
  arch="$(deb_arch "$t")"
  bin="$OUT/$t/drover-agent"
  [ -f "$bin" ] || die "$bin missing: run cross/build.sh $t"
  stage="$(mktemp -d "$DEBS/stage-$arch.XXXXXX")"
  trap 'rm -rf "$stage"' EXIT

  install -D -m 0755 "$bin" "$stage/usr/bin/drover-agent"
  install -D -m 0644 "$UNIT_SRC" "$stage/lib/systemd/system/drover-agent.service"
  install -d -m 0755 "$stage/lib/systemd/system/drover-agent.service.d"
  cat >"$stage/lib/systemd/system/drover-agent.service.d/10-debian-user.conf" <<'EOF'
# Installed by the drover-agent .deb: run as the package's static system user `drover`
# (created by postinst, owns /var/lib/drover-agent and can read /etc/drover/agent.toml)
# instead of a DynamicUser, so the state dir and the config's group survive reinstalls.
[Service]
DynamicUser=no
User=drover
Group=drover
EOF
  install -D -m 0640 "$CONFIG_SRC" "$stage/etc/drover/agent.toml"
  install -D -m 0644 /dev/stdin "$stage/usr/share/doc/drover-agent/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: drover
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

  glibc="$(readelf -W --version-info "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -uV | tail -1)"
  glibc="${glibc#GLIBC_}"
  size_kb="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
  install -d -m 0755 "$stage/DEBIAN"
  cat >"$stage/DEBIAN/control" <<EOF
Package: drover-agent
Version: $VERSION
Architecture: $arch
Maintainer: Drover developers <drover@example.invalid>
Section: net
Priority: optional
Installed-Size: $size_kb
Depends: libc6 (>= $glibc), adduser
Homepage: https://example.invalid/drover
Description: Drover edge agent for ML model fleets
 Verified model store with signed manifests, tract ONNX runtime, local KServe v2
 inference API and telemetry over MQTT. Enroll the device with
 "drover device enroll", put the result in /etc/drover/agent.toml, then
 run "systemctl enable --now drover-agent".
EOF
  echo /etc/drover/agent.toml >"$stage/DEBIAN/conffiles"

  cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd drover >/dev/null; then
        if command -v adduser >/dev/null; then
            adduser --system --group --home /var/lib/drover-agent --no-create-home \
                --shell /usr/sbin/nologin --gecos "Drover edge agent" drover >/dev/null
        else
            useradd --system --user-group --home-dir /var/lib/drover-agent --no-create-home \
                --shell /usr/sbin/nologin --comment "Drover edge agent" drover
        fi
    fi
    install -d -o drover -g drover -m 0700 /var/lib/drover-agent
    # The config holds the device key once enrolled: root-owned, readable by the agent's group.
    chown root:drover /etc/drover /etc/drover/agent.toml
    chmod 0750 /etc/drover
    chmod 0640 /etc/drover/agent.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        # Restart on upgrade only if it was already running; a fresh install is not enrolled yet.
        if [ -n "$2" ] && systemctl is-active --quiet drover-agent.service; then
            systemctl restart drover-agent.service || true
        fi
    fi
fi
exit 0
EOF
  cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && { [ "$1" = remove ] || [ "$1" = deconfigure ]; }; then
    systemctl stop drover-agent.service >/dev/null 2>&1 || true
    systemctl disable drover-agent.service >/dev/null 2>&1 || true
fi
exit 0
EOF
  cat >"$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    # Models, spool and replay state. The `drover` user stays (Debian practice: uids are not reused).
    rm -rf /var/lib/drover-agent
    rmdir /etc/drover 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
  chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

  deb="$DEBS/drover-agent_${VERSION}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz -z6 --build "$stage" "$deb.tmp" >/dev/null
  mv "$deb.tmp" "$deb"
  rm -rf "$stage"
  trap - EXIT
  log "$deb ($(stat -c %s "$deb") bytes, libc6 >= $glibc)"
done
