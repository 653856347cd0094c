#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Checks the systemd units as built: 'systemd-analyze verify' must be silent and the
# offline 'systemd-analyze security' exposure must not exceed MAX.
#
#   check-units.sh SERVICE SOCKET DAEMON [MAX]
#
# The service's ExecStart= points at the installed daemon, which a build tree does
# not have yet, so the check runs on a copy that points at DAEMON instead.
set -eu

service=$1
socket=$2
daemon=$3
max=${4:-2.0}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

sed -e "s|^ExecStart=[^ ]*|ExecStart=$daemon|" "$service" >"$tmp/provider-router.service"
cp "$socket" "$tmp/provider-router.socket"

out=$(systemd-analyze verify --man=no "$tmp/provider-router.socket" "$tmp/provider-router.service" 2>&1) || {
        printf '%s\n' "$out"
        echo "FAIL: systemd-analyze verify failed" >&2
        exit 1
}
if [ -n "$out" ]; then
        printf '%s\n' "$out"
        echo "FAIL: systemd-analyze verify is not clean" >&2
        exit 1
fi

score=$(systemd-analyze security --offline=yes "$tmp/provider-router.service" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
        echo "FAIL: no exposure level from systemd-analyze security" >&2
        exit 1
fi
echo "verify: clean; security exposure: $score (limit $max)"
awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }' || {
        echo "FAIL: exposure $score is above $max" >&2
        exit 1
}
