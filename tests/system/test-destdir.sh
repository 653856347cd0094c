#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# 'meson install --destdir' alone gives a distribution's layout: configures the source
# for /usr, installs into a scratch directory, and checks that every file a system
# needs is where systemd, D-Bus, polkit, man and bash-completion look for it, and
# that the installed files point at each other correctly. With --deb, the installed
# file list must also equal the package's (documentation aside).
#
#   tests/system/test-destdir.sh [--deb FILE.deb] [SRCDIR]
set -euo pipefail

deb=
if [ "${1:-}" = --deb ]; then
        deb=$(realpath "$2")
        shift 2
fi
src=$(realpath "${1:-$(dirname "$0")/../..}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dest=$tmp/dest
fail=0

bad() { echo "FAIL: $*" >&2; fail=1; }

man=auto
command -v scdoc >/dev/null && man=enabled
meson setup "$tmp/build" "$src" --prefix=/usr --sysconfdir=/etc --localstatedir=/var \
        -Dtests=false -Dman=$man >"$tmp/setup.log" 2>&1 || { cat "$tmp/setup.log" >&2; exit 1; }
meson compile -C "$tmp/build" >"$tmp/compile.log" 2>&1 || { tail -n 30 "$tmp/compile.log" >&2; exit 1; }
meson install -C "$tmp/build" --destdir "$dest" --no-rebuild >"$tmp/install.log" 2>&1 ||
        { cat "$tmp/install.log" >&2; exit 1; }

unitdir=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /usr/lib/systemd/system)
expected=(
        /etc/provider-router/provider-router.conf
        "$unitdir/provider-router.service"
        "$unitdir/provider-router.socket"
        /usr/lib/sysusers.d/provider-router.conf
        /usr/lib/tmpfiles.d/provider-router.conf
        /usr/libexec/provider-router
        /usr/bin/provider-routerctl
        /usr/share/dbus-1/system.d/org.providerrouter.Router1.conf
        /usr/share/dbus-1/system-services/org.providerrouter.Router1.service
        /usr/share/dbus-1/interfaces/org.providerrouter.Router1.xml
        /usr/share/polkit-1/actions/org.providerrouter.Router1.policy
        /usr/share/bash-completion/completions/provider-routerctl
)
if [ $man = enabled ]; then
        expected+=(/usr/share/man/man8/provider-router.8 /usr/share/man/man1/provider-routerctl.1
                   /usr/share/man/man5/provider-router.conf.5)
fi
for f in "${expected[@]}"; do
        [ -f "$dest$f" ] || bad "missing $f"
done
[ -d "$dest/etc/provider-router/provider-router.conf.d" ] || bad "missing /etc/provider-router/provider-router.conf.d/"
ls "$dest"/usr/share/locale/*/LC_MESSAGES/provider-router.mo >/dev/null 2>&1 || bad "no translations installed"

# The files name each other: check that those names resolve inside the tree.
grep -qx 'ExecStart=/usr/libexec/provider-router --bus=system' "$dest$unitdir/provider-router.service" ||
        bad "ExecStart= does not run /usr/libexec/provider-router"
grep -qx 'Exec=/usr/libexec/provider-router --bus=system' \
        "$dest/usr/share/dbus-1/system-services/org.providerrouter.Router1.service" ||
        bad "D-Bus activation Exec= does not run /usr/libexec/provider-router"
grep -qx 'SystemdService=provider-router.service' \
        "$dest/usr/share/dbus-1/system-services/org.providerrouter.Router1.service" ||
        bad "D-Bus activation does not go through provider-router.service"
user=$(awk '$1 == "u" { print $2 }' "$dest/usr/lib/sysusers.d/provider-router.conf")
grep -qx "User=$user" "$dest$unitdir/provider-router.service" || bad "the unit does not run as the sysusers.d user '$user'"
grep -q "<policy user=\"$user\">" "$dest/usr/share/dbus-1/system.d/org.providerrouter.Router1.conf" ||
        bad "the D-Bus policy does not name the service user '$user'"
if command -v xmllint >/dev/null; then
        for f in "$dest"/usr/share/dbus-1/system.d/*.conf "$dest"/usr/share/dbus-1/interfaces/*.xml \
                 "$dest"/usr/share/polkit-1/actions/*.policy; do
                xmllint --noout "$f" || bad "$f is not well-formed XML"
        done
fi
grep -q 'xml:lang=' "$dest/usr/share/polkit-1/actions/org.providerrouter.Router1.policy" ||
        bad "the polkit policy carries no translations"

if [ -n "$deb" ]; then
        # Files only: directories are implied. Man pages are compressed in the package;
        # its documentation and lintian overrides are Debian's own.
        (cd "$dest" && find . \( -type f -o -type l \) | sed 's|^\./|/|' | sort) >"$tmp/meson.list"
        dpkg-deb -c "$deb" | awk '$1 ~ /^[-l]/ { print $6 }' | sed -e 's|^\./|/|' \
                -e 's|^\(/usr/share/man/.*\)\.gz$|\1|' | grep -v -e '^/usr/share/doc/' -e '^/usr/share/lintian/' | sort >"$tmp/deb.list"
        if ! diff -u --label meson-install "$tmp/meson.list" --label "${deb##*/}" "$tmp/deb.list"; then
                bad "meson install and the package install different files"
        fi
fi

if [ $fail -ne 0 ]; then
        exit 1
fi
echo "PASS: meson install --destdir gives the expected layout (${#expected[@]} files checked${deb:+, same files as ${deb##*/}})"
