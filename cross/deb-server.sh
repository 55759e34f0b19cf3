#!/usr/bin/env bash
# The control plane's Debian package, `drover` (the `drover` binary: `drover serve` and the operator CLI), from a
# built binary. Plain dpkg-deb, no debhelper, like cross/deb.sh for the agent.
#
#   cross/deb-server.sh BINARY [ARCH]     ARCH default: from the binary's ELF header (amd64, arm64)
#
# Out: cross/out/deb/drover_<version>_<arch>.deb
# Layout: /usr/bin/drover, /lib/systemd/system/drover.service (control-plane/packaging/drover.service verbatim:
# User=drover, StateDirectory=drover, ProtectSystem=strict, ...), /etc/drover/serve.toml (conffile, the commented
# example control-plane/packaging/serve.toml). postinst creates the system user `drover` and /var/lib/drover and
# does not start the service (serve.toml needs `advertise` first); prerm stops it; purge keeps /var/lib/drover (the
# fleet's keys, CA and database are not thrown away with a package).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEBS="$ROOT/cross/out/deb"
log() { printf '[cross/deb-server %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

bin="${1:-}"
[ -n "$bin" ] && [ -f "$bin" ] || die "usage: cross/deb-server.sh BINARY [ARCH] (build it: cargo build --release -p drover-cli --bin drover)"
machine="$(readelf -h "$bin" | awk -F: '/Machine:/{gsub(/^ +/,"",$2); print $2}')"
case "${2:-}:$machine" in
  amd64:* | :*X86-64*) arch=amd64 ;;
  arm64:* | :AArch64) arch=arm64 ;;
  *) die "unsupported architecture ${2:-$machine}" ;;
esac

VERSION="$(awk '/^\[workspace.package\]/{p=1;next} /^\[/{p=0} p && /^version *=/{gsub(/[" ]/,"",$0); sub(/version=/,""); print; exit}' "$ROOT/Cargo.toml")"
[ -n "$VERSION" ] || die "no version in [workspace.package]"
UNIT_SRC="$ROOT/control-plane/packaging/drover.service"
CONFIG_SRC="$ROOT/control-plane/packaging/serve.toml"
[ -f "$UNIT_SRC" ] && [ -f "$CONFIG_SRC" ] || die "control-plane/packaging/{drover.service,serve.toml} missing"

mkdir -p "$DEBS"
stage="$(mktemp -d "$DEBS/stage-drover-$arch.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$bin" "$stage/usr/bin/drover"
# A debug build (what CI packages to check it) carries debug info; the host's strip reads only its own arch.
if [ "$arch" = amd64 ] && [ "$(uname -m)" = x86_64 ]; then strip --strip-debug "$stage/usr/bin/drover"; fi
install -D -m 0644 "$UNIT_SRC" "$stage/lib/systemd/system/drover.service"
install -D -m 0640 "$CONFIG_SRC" "$stage/etc/drover/serve.toml"
install -D -m 0644 /dev/stdin "$stage/usr/share/doc/drover/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: drover
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

glibc="$(readelf -W --version-info "$stage/usr/bin/drover" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -uV | tail -1)"
glibc="${glibc#GLIBC_}"
size_kb="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
install -d -m 0755 "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<EOF
Package: drover
Version: $VERSION
Architecture: $arch
Maintainer: Drover developers <drover@example.invalid>
Section: net
Priority: optional
Installed-Size: $size_kb
Depends: libc6 (>= $glibc), adduser
Homepage: https://example.invalid/drover
Description: Drover control plane and CLI for ML model fleets on edge devices
 drover serve: the fleet API, an embedded MQTT broker behind a mutual-TLS
 front, signed model registry, staged rollouts with gates, drift scoring and
 continuous training. Set advertise in /etc/drover/serve.toml, then run
 "systemctl enable --now drover".
EOF
echo /etc/drover/serve.toml >"$stage/DEBIAN/conffiles"

cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd drover >/dev/null; then
        if command -v adduser >/dev/null; then
            adduser --system --group --home /var/lib/drover --no-create-home \
                --shell /usr/sbin/nologin --gecos "Drover control plane" drover >/dev/null
        else
            useradd --system --user-group --home-dir /var/lib/drover --no-create-home \
                --shell /usr/sbin/nologin --comment "Drover control plane" drover
        fi
    fi
    # Database, root and signing keys, fleet CA: the service user's alone.
    install -d -o drover -g drover -m 0700 /var/lib/drover
    chown root:drover /etc/drover /etc/drover/serve.toml
    chmod 0750 /etc/drover
    chmod 0640 /etc/drover/serve.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        # Restart on upgrade only if it was running; a fresh install waits for `advertise` in serve.toml.
        if [ -n "$2" ] && systemctl is-active --quiet drover.service; then
            systemctl restart drover.service || true
        fi
    fi
fi
exit 0
EOF
cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && { [ "$1" = remove ] || [ "$1" = deconfigure ]; }; then
    systemctl stop drover.service >/dev/null 2>&1 || true
    systemctl disable drover.service >/dev/null 2>&1 || true
fi
exit 0
EOF
cat >"$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    # /var/lib/drover holds the fleet's root key, CA and database: kept. Remove it by hand if meant.
    rmdir /etc/drover 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

deb="$DEBS/drover_${VERSION}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz -z6 --build "$stage" "$deb.tmp" >/dev/null
mv "$deb.tmp" "$deb"
log "$deb ($(stat -c %s "$deb") bytes, libc6 >= $glibc)"
