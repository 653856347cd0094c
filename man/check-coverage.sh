#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The man pages must keep up with the code: every configuration key src/config.c
# accepts is in provider-router.conf(5), every daemon option in provider-router(8),
# and every provider-routerctl command and option in provider-routerctl(1).
#
#   man/check-coverage.sh SRCDIR
set -eu

src=$1
fail=0

missing() {
        echo "FAIL: $1 does not document $2" >&2
        fail=1
}

# Keys are compared as streq(key, "Name") in the group parsers.
for key in $(sed -n 's/.*streq(key, "\([A-Za-z]*\)").*/\1/p' "$src/src/config.c" | sort -u); do
        grep -q "\*$key=\*" "$src/man/provider-router.conf.5.scd" || missing provider-router.conf.5 "$key="
done

# Long options from the getopt tables.
for opt in $(sed -n 's/^ *{ "\([a-z-]*\)", [a-z_]*argument.*/\1/p' "$src/src/main.c"); do
        grep -q -- "--$opt" "$src/man/provider-router.8.scd" || missing provider-router.8 "--$opt"
done
for opt in $(sed -n 's/^ *{ "\([a-z-]*\)", [a-z_]*argument.*/\1/p' "$src/src/ctl/provider-routerctl.c"); do
        grep -q -- "--$opt" "$src/man/provider-routerctl.1.scd" || missing provider-routerctl.1 "--$opt"
done
# Verbs from the verb table: { "name", MIN, MAX, verb_... }.
verbs=$(sed -n 's/^ *{ "\([a-z-]*\)", [0-9], [0-9A-Z_]*, verb_.*/\1/p' "$src/src/ctl/provider-routerctl.c")
[ -n "$verbs" ] || missing provider-routerctl.1 "commands: none found in the verb table (has its shape changed?)"
for verb in $verbs; do
        grep -q "^\*$verb\*" "$src/man/provider-routerctl.1.scd" || missing provider-routerctl.1 "command $verb"
done
# D-Bus members from the vtable.
for member in $(sed -n 's/.*SD_BUS_\(PROPERTY\|METHOD_WITH_ARGS\)("\([A-Za-z]*\)".*/\2/p' "$src/src/bus.c"); do
        grep -q "^\*$member\*" "$src/man/provider-router.8.scd" || missing provider-router.8 "D-Bus member $member"
done

exit $fail
