#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The system test's checks, run as root inside the booted Debian container by
# tests/system/run:   inside.sh /payload/provider-router_VERSION_ARCH.deb
# /payload also holds mock-provider (tests/mock) and src/, the source tree for the README's
# first command (scripts/run), tried last, once the package is purged. Prints TAP-like "ok N - ..." and
# "not ok N - ..." lines; exits non-zero if any check failed. Every wait is bounded.
set -uo pipefail

deb=$1
url=http://127.0.0.1:3001
mock_port=18080
unitdir=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /lib/systemd/system)
[ -f "$unitdir/provider-router.service" ] || unitdir=/lib/systemd/system
tmp=$(mktemp -d)
n=0
failed=0

ok() { n=$((n + 1)); echo "ok $n - $*"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $*"; }
note() { echo "# $*"; }

# check DESCRIPTION COMMAND...: one check, its output shown only when it fails.
check() {
        local desc=$1
        shift
        if "$@" >"$tmp/check.out" 2>&1; then
                ok "$desc"
        else
                not_ok "$desc"
                tail -n 20 "$tmp/check.out" | sed 's/^/#   /'
        fi
}

# wait_for SECONDS COMMAND...: until COMMAND succeeds, at most SECONDS.
wait_for() {
        local end=$((SECONDS + $1))
        shift
        until "$@" >/dev/null 2>&1; do
                [ $SECONDS -lt $end ] || return 1
                sleep 0.2
        done
}

bail() {
        not_ok "$*"
        echo "Bail out! $*"
        exit 1
}

busctl_router() {
        busctl --timeout=10 "$1" org.providerrouter.Router1 /org/providerrouter/Router1 org.providerrouter.Router1 "${@:2}"
}

default_provider() {
        busctl_router get-property DefaultProvider | sed -n 's/^s "\(.*\)"$/\1/p'
}

main_pid() {
        systemctl show -P MainPID provider-router.service
}

is_default() { [ "$(default_provider)" = "$1" ]; }
same_pid() { [ "$(main_pid)" = "$1" ]; }

# chat NAME PROVIDER-OR-EMPTY BODY: one request; saves $tmp/NAME.{code,headers,body}.
chat() {
        local name=$1 provider=$2 body=$3
        local -a hdr=(-H 'Content-Type: application/json')
        [ -n "$provider" ] && hdr+=(-H "X-Provider: $provider")
        curl -sN --max-time 30 "${hdr[@]}" -D "$tmp/$name.headers" -o "$tmp/$name.body" -w '%{http_code}' \
                -d "$body" "$url/v1/chat/completions" >"$tmp/$name.code" 2>/dev/null
        [ "$(cat "$tmp/$name.code")" = 200 ]
}

header() { # header NAME FIELD
        sed -n "s/^$2: *\\([^[:space:]]*\\).*/\\1/Ip" "$tmp/$1.headers" | tail -n1
}

served_by() { # served_by NAME PROVIDER
        [ "$(header "$1" X-Provider)" = "$2" ]
}

# ---- install ---------------------------------------------------------------------------
check "the package installs (dpkg -i)" dpkg -i "$deb"
dpkg -s provider-router >/dev/null 2>&1 || bail "provider-router is not installed"

check "sysusers.d created the system user provider-router" \
        sh -c 'getent passwd provider-router | grep -q ":/usr/sbin/nologin$\|:/sbin/nologin$"'
check "tmpfiles.d created /var/lib/provider-router, owned by the service user, mode 750" \
        sh -c '[ "$(stat -c "%U %a" /var/lib/provider-router)" = "provider-router 750" ]'
check "the configuration is a conffile" \
        sh -c 'dpkg-query -W -f="\${Conffiles}" provider-router | grep -q "/etc/provider-router/provider-router.conf "'
check "provider-router.socket is enabled" sh -c '[ "$(systemctl is-enabled provider-router.socket)" = enabled ]'
check "provider-router.socket is listening" systemctl is-active --quiet provider-router.socket
check "provider-router.service is not started by the installation" \
        sh -c '! systemctl is-active --quiet provider-router.service'
check "the D-Bus policy, activation file and polkit action are installed" \
        test -f /usr/share/dbus-1/system.d/org.providerrouter.Router1.conf \
        -a -f /usr/share/dbus-1/system-services/org.providerrouter.Router1.service \
        -a -f /usr/share/polkit-1/actions/org.providerrouter.Router1.policy
check "the man pages and the German translation are installed" \
        sh -c 'man -w provider-router.8 && man -w provider-routerctl.1 && man -w provider-router.conf.5 &&
               test -f /usr/share/locale/de/LC_MESSAGES/provider-router.mo'

# ---- the units as installed ------------------------------------------------------------
verify_units() {
        local out
        out=$(systemd-analyze verify "$unitdir/provider-router.socket" "$unitdir/provider-router.service" 2>&1) || {
                echo "$out"
                return 1
        }
        [ -z "$out" ] || { echo "$out"; return 1; }
}
check "systemd-analyze verify on the installed units is clean" verify_units

score=$(systemd-analyze security --offline=yes "$unitdir/provider-router.service" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
note "systemd-analyze security --offline=yes: exposure ${score:-?}"
check "offline security exposure ${score:-?} is at most 2.0" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 2.0) }'

# ---- socket activation, the echo provider ----------------------------------------------
echo_body='{"model":"echo","messages":[{"role":"user","content":"hello from the system test"}]}'
check "the first request (echo provider) is answered" chat first echo "$echo_body"
check "... with the echoed text and X-Provider: echo" \
        sh -c "grep -q 'hello from the system test' '$tmp/first.body' && grep -qi '^X-Provider: echo' '$tmp/first.headers'"
check "the first connection started provider-router.service" systemctl is-active --quiet provider-router.service
check "the service got its socket from systemd" \
        wait_for 10 sh -c 'journalctl -b -u provider-router.service --no-pager | grep -q "(socket activated)"'
pid=$(main_pid)
check "the service runs as provider-router, not root" \
        sh -c "[ \"\$(stat -c %U /proc/$pid)\" = provider-router ] && ! grep -q '^Uid:[[:space:]]0' /proc/$pid/status"
check "Type=notify: the service reports its status" \
        sh -c 'systemctl show -P StatusText provider-router.service | grep -q "^Routing to"'
check "the watchdog is armed (WatchdogSec=30s)" \
        sh -c '[ "$(systemctl show -P WatchdogUSec provider-router.service)" = 30s ]'

# ---- the installed defaults keep web pages out (issue 11) --------------------------------
web_body='{"model":"echo","messages":[{"role":"user","content":"from a web page"}]}'
cross_origin_refused() {
        local code
        # A preflight and a plain cross-origin POST: answered, but with no CORS header, so the
        # browser shows the page nothing.
        curl -s --max-time 10 -X OPTIONS -D "$tmp/preflight.headers" -o /dev/null -H 'Origin: http://evil.example' \
                -H 'Access-Control-Request-Method: POST' "$url/v1/chat/completions" || return 1
        curl -s --max-time 10 -D "$tmp/cors.headers" -o /dev/null -H 'Origin: http://evil.example' \
                -H 'Content-Type: application/json' -H 'X-Provider: echo' -d "$web_body" "$url/v1/chat/completions" || return 1
        if grep -qi '^Access-Control-' "$tmp/preflight.headers" "$tmp/cors.headers"; then
                cat "$tmp/preflight.headers" "$tmp/cors.headers"
                return 1
        fi
        # A POST a page may send without a preflight (text/plain) is refused.
        code=$(curl -s --max-time 10 -o "$tmp/simple.body" -w '%{http_code}' -H 'Origin: http://evil.example' \
                -H 'Content-Type: text/plain' -d "$web_body" "$url/v1/chat/completions")
        [ "$code" = 415 ] || { echo "text/plain POST: $code"; cat "$tmp/simple.body"; return 1; }
}
rebinding_refused() {
        local code
        code=$(curl -s --max-time 10 -o "$tmp/rebind.body" -w '%{http_code}' -H 'Host: evil.example:3001' \
                -H 'Content-Type: application/json' -H 'X-Provider: echo' -d "$web_body" "$url/v1/chat/completions")
        [ "$code" = 403 ] && grep -q 'Host not allowed' "$tmp/rebind.body" || { echo "$code"; cat "$tmp/rebind.body"; return 1; }
}
check "the installed defaults send no CORS header to a cross-origin page and refuse a text/plain POST (415)" \
        cross_origin_refused
check "the installed defaults refuse a rebinding Host: evil.example:3001 (403)" rebinding_refused

# ---- a loopback mock provider with an API key from a systemd credential -----------------
systemd-run --quiet --unit=pr-mock-provider -p DynamicUser=yes \
        /payload/mock-provider --port "$mock_port" --name mock --quiet
check "the mock provider runs in the container" \
        wait_for 15 curl -sf --max-time 2 "http://127.0.0.1:$mock_port/v1/models"

mkdir -p /etc/provider-router/provider-router.conf.d /etc/systemd/system/provider-router.service.d
cat >/etc/provider-router/provider-router.conf.d/50-mock.conf <<EOF
[Provider mock]
BaseURL=http://127.0.0.1:$mock_port/v1
APIKeyCredential=mock-key
EOF
# As provider-router(8) recommends: the key in /etc/credstore/, where LoadCredential=
# with no path finds it.
install -d -m 0700 /etc/credstore
install -m 0600 /dev/null /etc/credstore/mock-key
printf 's3cret-system-test-key\n' >/etc/credstore/mock-key
# The shipped unit loads qwen-api-key the same way.
install -m 0600 /dev/null /etc/credstore/qwen-api-key
printf 'qwen-system-test-key\n' >/etc/credstore/qwen-api-key
cat >/etc/systemd/system/provider-router.service.d/50-credential.conf <<EOF
[Service]
LoadCredential=mock-key
EOF
systemctl daemon-reload
check "provider-router --check-config accepts the configuration" /usr/libexec/provider-router --check-config
# Credentials are given to the service when it starts.
check "systemctl restart provider-router applies the credential drop-in" timeout 60 systemctl restart provider-router.service

mock_request() {
        chat mock1 mock '{"model":"m1","messages":[{"role":"user","content":"hi"}]}' && served_by mock1 mock
}
check "a request with X-Provider: mock is answered by the mock" mock_request
qwen_key_loaded() {
        local id
        id=$(systemctl show -P InvocationID provider-router.service)
        journalctl _SYSTEMD_INVOCATION_ID="$id" --no-pager | grep -q 'listening on' &&
                ! journalctl _SYSTEMD_INVOCATION_ID="$id" --no-pager | grep -q "credential qwen-api-key) not found"
}
check "the shipped LoadCredential=qwen-api-key finds /etc/credstore/qwen-api-key" qwen_key_loaded
check "the API key from the credential reached the provider as a bearer token" \
        sh -c "curl -sf --max-time 5 http://127.0.0.1:$mock_port/_mock/stats | grep -q 'Bearer s3cret-system-test-key'"
check "the API key appears nowhere in the journal" \
        sh -c '! journalctl -b --no-pager -o export | grep -q s3cret-system-test-key'

# ---- live switch over D-Bus ------------------------------------------------------------
providers_include_mock() { busctl_router get-property Providers | grep -q '"mock"'; }
check "the mock is among the providers on the bus" providers_include_mock
before=$(main_pid)
check "busctl call SetDefaultProvider s mock" busctl_router call SetDefaultProvider s mock
check "DefaultProvider is now mock" is_default mock
body='{"model":"some-unmapped-model","messages":[{"role":"user","content":"who serves me?"}]}'
chat switched "" "$body"
check "the next request without X-Provider goes to the mock" served_by switched mock
check "... without a restart" same_pid "$before"

rid=$(header switched X-Request-Id)
journal_fields() {
        local out f
        out=$(journalctl -u provider-router PROVIDER=mock REQUEST_ID="$rid" -o export --no-pager 2>/dev/null)
        for f in PROVIDER=mock MODEL=some-unmapped-model STATUS=200 DURATION_USEC= REQUEST_ID="$rid" STREAM=0; do
                printf '%s\n' "$out" | grep -q "^$f" || { echo "no $f in: $out"; return 1; }
        done
}
check "journalctl -u provider-router PROVIDER=mock shows the request (request id $rid) with its fields" \
        wait_for 10 journal_fields
journal_fields || journalctl -u provider-router PROVIDER=mock -o verbose --no-pager -n 2 | sed 's/^/#   /'

# A client once kept its request out of the journal with a long model name: the fields overflowed
# a fixed buffer and journald refused the whole entry. Now the name is cut and marked.
long_model=$(head -c 10240 /dev/zero | tr '\0' m)
chat longmodel echo "{\"model\":\"$long_model\",\"messages\":[{\"role\":\"user\",\"content\":\"long\"}]}"
long_rid=$(header longmodel X-Request-Id)
long_model_in_journal() {
        local out
        out=$(journalctl -u provider-router REQUEST_ID="$long_rid" -o export --no-pager 2>/dev/null)
        printf '%s\n' "$out" | grep -q '^MODEL=mmmmmmmmmmmmmmmm' &&
                printf '%s\n' "$out" | grep -qF '[cut 8192 bytes]' &&
                printf '%s\n' "$out" | grep -q '^STATUS=200$' &&
                printf '%s\n' "$out" | grep -q '^PROVIDER=echo$'
}
check "a request with a 10 KB model name has its journal entry (journalctl REQUEST_ID=$long_rid), the name cut and marked" \
        wait_for 10 long_model_in_journal

# ---- a comparison, in the journal and on the bus (issue 12) ----------------------------------
compare_request() {
        curl -sf --max-time 30 -H 'Content-Type: application/json' -H 'X-Provider: mock' -H 'X-Compare: mock' \
                -D "$tmp/cmp.headers" -o /dev/null \
                -d '{"model":"m-compare","messages":[{"role":"user","content":"compare me"}]}' "$url/v1/chat/completions"
}
check "a request asking for a comparison (X-Compare: mock) is answered" compare_request
cmp_rid=$(header cmp X-Request-Id)
comparison_in_journal() {
        local out f
        out=$(journalctl MESSAGE_ID=3f0a1c9e6b2d4e8f9a7c5b1d2e4f6a80 PROVIDER=mock REQUEST_ID="$cmp_rid" -o export --no-pager 2>/dev/null)
        for f in MODEL=m-compare ORIGIN=x-compare SIMILARITY=1.0000 PRIMARY_PROVIDER=mock MIRROR_PROVIDER=mock \
                 PRIMARY_STATUS=200 MIRROR_STATUS=200 PRIMARY_TTFB_USEC= MIRROR_TTFB_USEC= PRIMARY_DURATION_USEC= \
                 MIRROR_DURATION_USEC= PRIMARY_PROMPT_TOKENS= MIRROR_COMPLETION_TOKENS= PRIMARY_TOKENS_PER_SEC= \
                 PRIMARY_FINISH_REASON=stop MIRROR_FINISH_REASON=stop PRIMARY_ANSWER_LENGTH= MIRROR_ANSWER_LENGTH=; do
                printf '%s\n' "$out" | grep -q "^$f" || { echo "no $f in: $out"; return 1; }
        done
}
check "journalctl MESSAGE_ID=3f0a1c9e… PROVIDER=mock shows the comparison ($cmp_rid) with every field" \
        wait_for 10 comparison_in_journal
comparison_on_bus() {
        busctl --json=short call org.providerrouter.Router1 /org/providerrouter/Router1 \
                org.providerrouter.Router1 GetComparisons u 5 | grep -q "$cmp_rid"
}
check "... and GetComparisons lists it" comparison_on_bus

# ---- who may do what on the bus --------------------------------------------------------
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
nobody_reads() { as_nobody busctl get-property org.providerrouter.Router1 /org/providerrouter/Router1 org.providerrouter.Router1 DefaultProvider | grep -q mock; }
nobody_cannot_change() {
        ! as_nobody busctl --timeout=10 call org.providerrouter.Router1 /org/providerrouter/Router1 \
                org.providerrouter.Router1 SetDefaultProvider s echo
}
# Both refused by the bus itself, before the router sees anything.
nobody_cannot_own() {
        local out
        out=$(as_nobody busctl --timeout=10 call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
                RequestName su org.providerrouter.Router1 4 2>&1)
        echo "$out"
        grep -qi 'access denied' <<<"$out"
}
nobody_cannot_call_others() {
        local out
        out=$(as_nobody busctl --timeout=10 call org.providerrouter.Router1 /org/providerrouter/Router1 \
                org.freedesktop.DBus.ObjectManager GetManagedObjects 2>&1)
        echo "$out"
        grep -qi 'access denied' <<<"$out"
}
check "an unprivileged user can read the routing" nobody_reads
check "an unprivileged user cannot change it (polkit, auth_admin_keep)" nobody_cannot_change
check "... and the routing is unchanged" is_default mock
check "an unprivileged user cannot own org.providerrouter.Router1 (D-Bus policy)" nobody_cannot_own
check "an unprivileged user cannot call other interfaces of the service (D-Bus policy)" nobody_cannot_call_others

# ---- state survives a restart; reload returns to the files -----------------------------
check "runtime routing is saved in the state directory" \
        sh -c '[ "$(stat -c %U /var/lib/provider-router/routing.state)" = provider-router ]'
restart_keeps_default() { timeout 60 systemctl restart provider-router.service && is_default mock; }
check "systemctl restart keeps the runtime default provider" restart_keeps_default
before=$(main_pid)
reload_resets_default() {
        timeout 60 systemctl reload provider-router.service && wait_for 10 is_default lm-studio
}
check "systemctl reload returns to the configured default provider (lm-studio)" reload_resets_default
check "... in the same process" same_pid "$before"
reload_refuses_bad_config() {
        local out rc=0
        cp /etc/provider-router/provider-router.conf /tmp/good.conf
        printf '\n[Router]\nDefaultProvider=no-such-provider\n' >> /etc/provider-router/provider-router.conf
        out=$(timeout 60 systemctl reload provider-router.service 2>&1) || rc=$?
        cp /tmp/good.conf /etc/provider-router/provider-router.conf
        echo "$out"
        [ "$rc" -ne 0 ] || return 1
        wait_for 10 sh -c 'journalctl -u provider-router --no-pager | grep -q "no-such-provider"' || return 1
        systemctl is-active -q provider-router.service && is_default lm-studio
}
check "systemctl reload fails on an invalid configuration, names the error, keeps serving the old one" \
        reload_refuses_bad_config

# ---- reload and restart under load lose no request -------------------------------------
workers=4
per_worker=30
deadline=$((SECONDS + 150))
worker() {
        local id=$1 i code out=$tmp/w$1.body
        for ((i = 1; i <= per_worker; i++)); do
                if [ $SECONDS -ge $deadline ]; then
                        echo "fail deadline"
                        continue
                fi
                if ((i % 2)); then
                        code=$(curl -s --max-time 30 -o "$out" -w '%{http_code}' -H 'Content-Type: application/json' \
                                -H 'X-Provider: echo' \
                                -d "{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"w$id-$i\"}]}" \
                                "$url/v1/chat/completions")
                        if [ "$code" = 200 ] && grep -q "w$id-$i" "$out"; then echo ok; else echo "fail echo $code"; fi
                else
                        code=$(curl -sN --max-time 30 -o "$out" -w '%{http_code}' -H 'Content-Type: application/json' \
                                -H 'X-Provider: mock' \
                                -d '{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}],"mock":{"frames":4,"frame_delay_ms":150}}' \
                                "$url/v1/chat/completions")
                        if [ "$code" = 200 ] && grep -q '^data: \[DONE\]' "$out"; then echo ok; else echo "fail stream $code"; fi
                fi
        done >"$tmp/w$id.results"
}
pid_before=$(main_pid)
restarts_before=$(journalctl -b -u provider-router.service --no-pager | grep -c 'Stopping: no new connections' || true)
for ((w = 1; w <= workers; w++)); do
        worker $w &
done
sleep 2
timeout 60 systemctl reload provider-router.service || not_ok "systemctl reload under load failed"
sleep 2
timeout 60 systemctl restart provider-router.service || not_ok "systemctl restart under load failed"
sleep 2
timeout 60 systemctl restart provider-router.service || not_ok "second systemctl restart under load failed"
wait
total=$((workers * per_worker))
good=$(cat "$tmp"/w*.results | grep -c '^ok$' || true)
note "requests during reload + 2 restarts: $good of $total succeeded (half of them streams)"
check "reload and two restarts during $total requests lose none ($good/$total)" [ "$good" = "$total" ]
[ "$good" = "$total" ] || cat "$tmp"/w*.results | grep -v '^ok$' | sort | uniq -c | sed 's/^/#   /'
check "... and they really restarted the service" sh -c "! [ $(main_pid) = $pid_before ]"
drains=$(journalctl -b -u provider-router.service --no-pager | grep 'Stopping: no new connections' | tail -n 2 |
         sed -n 's/.*waiting for \([0-9]*\) request.*/\1/p' | paste -sd+)
note "requests in flight when each restart began: ${drains:-?}"
check "no failure restarts (NRestarts=0)" sh -c '[ "$(systemctl show -P NRestarts provider-router.service)" = 0 ]'

# ---- graceful stop: a stream in flight finishes ----------------------------------------
curl -sN --max-time 30 -o "$tmp/long.body" -w '%{http_code}' -H 'Content-Type: application/json' -H 'X-Provider: mock' \
        -d '{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}],"mock":{"frames":10,"frame_delay_ms":200}}' \
        "$url/v1/chat/completions" >"$tmp/long.code" &
curl_pid=$!
sleep 0.7
check "systemctl stop waits for the stream in flight" timeout 60 systemctl stop provider-router.service
wait $curl_pid
check "... which completed ([DONE] after 10 frames)" \
        sh -c "[ \"\$(cat $tmp/long.code)\" = 200 ] && grep -q '^data: \[DONE\]' $tmp/long.body"
check "the socket stays listening while the service is stopped" systemctl is-active --quiet provider-router.socket

# ---- D-Bus activation ------------------------------------------------------------------
check "a D-Bus call starts the stopped service (SystemdService=)" \
        sh -c 'busctl --timeout=30 get-property org.providerrouter.Router1 /org/providerrouter/Router1 org.providerrouter.Router1 Version | grep -q "^s " && systemctl is-active --quiet provider-router.service'
check "provider-routerctl status works" sh -c 'provider-routerctl --no-pager status | grep -q "Default provider"'

# ---- provider-routerctl -H: a router reached over SSH ----------------------------------
# A real sshd on loopback in the container, a key for root, and provider-routerctl -H going
# through it (ssh -xT root@127.0.0.1 systemd-stdio-bridge) to this system bus, as it would
# to another host. Also an unprivileged login: it reads, it cannot change.
ctl_ssh_setup() {
        # Ours, on loopback only: not the package's ssh.service on every address.
        systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
        [ -e /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A >/dev/null || return 1
        mkdir -p /run/sshd
        systemd-run --quiet --unit=pr-sshd /usr/sbin/sshd -D -e -o ListenAddress=127.0.0.1 \
                -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
                -o PermitRootLogin=prohibit-password || return 1
        install -d -m 0700 /root/.ssh
        rm -f /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub
        ssh-keygen -q -t ed25519 -N '' -C pr-systest -f /root/.ssh/id_ed25519 || return 1
        install -m 0600 /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys
        id prtester >/dev/null 2>&1 || useradd -m -s /bin/bash prtester || return 1
        install -d -m 0700 -o prtester -g prtester ~prtester/.ssh
        install -m 0600 -o prtester -g prtester /root/.ssh/id_ed25519.pub ~prtester/.ssh/authorized_keys
        wait_for 15 sh -c 'ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | grep -q ssh-ed25519' || return 1
        # The host key pinned, as an administrator would.
        ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null >/root/.ssh/known_hosts
        ssh -o BatchMode=yes root@127.0.0.1 true
}
check "sshd on 127.0.0.1 in the container, root logs in with a key" ctl_ssh_setup
health_default() { curl -sf --max-time 10 "$url/health" | python3 -c 'import json, sys; print(json.load(sys.stdin)["default_provider"])'; }
ctl_remote_status() {
        local out
        out=$(provider-routerctl -H root@127.0.0.1 --no-pager status) || return 1
        echo "$out"
        grep -q "^ *Default provider: $(default_provider)$" <<<"$out" && grep -q "^ *Version: " <<<"$out"
}
check "provider-routerctl -H root@127.0.0.1 status" ctl_remote_status
note "provider-routerctl -H root@127.0.0.1 status:"
provider-routerctl -H root@127.0.0.1 --no-pager status 2>&1 | sed 's/^/#   /'
check "provider-routerctl -H root@127.0.0.1:22 providers (with a port)" \
        sh -c 'provider-routerctl -H root@127.0.0.1:22 --no-pager providers | grep -q "^echo "'
before=$(main_pid)
ctl_remote_change() {
        provider-routerctl -H root@127.0.0.1 set-default echo || return 1
        is_default echo && [ "$(health_default)" = echo ]
}
check "provider-routerctl -H root@127.0.0.1 set-default echo: DefaultProvider and /health say echo" ctl_remote_change
ctl_remote_routed() {
        chat remote "" '{"model":"unmapped","messages":[{"role":"user","content":"via ssh"}]}' &&
                served_by remote echo && same_pid "$before"
}
check "... and the next request goes to echo, without a restart" ctl_remote_routed
ctl_remote_unprivileged() {
        local out rc=0
        provider-routerctl -H prtester@127.0.0.1 --no-pager status | grep -q "Default provider: echo" || return 1
        out=$(provider-routerctl -H prtester@127.0.0.1 set-default mock 2>&1) || rc=$?
        echo "$out"
        [ $rc = 1 ] && grep -q "org.providerrouter.Router1.manage on 'prtester@127.0.0.1'" <<<"$out" && is_default echo
}
check "-H prtester@127.0.0.1 (unprivileged) reads, but set-default is refused by polkit there" ctl_remote_unprivileged
ctl_remote_reload() { provider-routerctl -H root@127.0.0.1 reload && wait_for 10 is_default lm-studio; }
check "provider-routerctl -H root@127.0.0.1 reload returns to the configured default" ctl_remote_reload
ctl_remote_refusals() {
        local out
        out=$(provider-routerctl -H root@127.0.0.1 --user status 2>&1) && return 1
        grep -q -- "--user cannot be combined with -H" <<<"$out" || { echo "$out"; return 1; }
        # No sshd on that port: ssh's reason, then ours.
        out=$(provider-routerctl -H root@127.0.0.1:2 status 2>&1) && return 1
        echo "$out"
        grep -q "over SSH failed" <<<"$out"
}
check "-H with --user is refused; an unreachable sshd is a clear failure" ctl_remote_refusals
systemctl stop pr-sshd.service 2>/dev/null || true

# ---- an existing .env of the original router as EnvironmentFile= ------------------------
cat >/etc/provider-router/provider-router.env <<EOF
# the plan's variables
DEFAULT_PROVIDER=echo
MODEL_MAPPINGS=env-model:mock,other-model:echo
LOG_LEVEL=info
EOF
chmod 0600 /etc/provider-router/provider-router.env
cat >/etc/systemd/system/provider-router.service.d/60-env.conf <<EOF
[Service]
EnvironmentFile=/etc/provider-router/provider-router.env
EOF
systemctl daemon-reload
env_applied() {
        timeout 60 systemctl restart provider-router.service &&
                is_default echo &&
                busctl_router get-property ModelMappings | grep -q '"env-model" "mock"'
}
check "an existing .env works as an EnvironmentFile= drop-in (DEFAULT_PROVIDER, MODEL_MAPPINGS)" env_applied
env_routed() { chat envreq "" '{"model":"env-model","messages":[{"role":"user","content":"x"}]}' && served_by envreq mock; }
check "... and routes by it" env_routed

# ---- client tokens from the shipped credential -----------------------------------------
install -m 0600 /dev/null /etc/credstore/provider-router-client-tokens
printf '# system test\nsystem-test-client-token\n' >/etc/credstore/provider-router-client-tokens
printf '[Router]\nClientTokensCredential=provider-router-client-tokens\n' \
        >/etc/provider-router/provider-router.conf.d/60-client-tokens.conf
http_code() { curl -s --max-time 10 -o /dev/null -w '%{http_code}' "$@"; }
tokens_enforced() {
        local body='{"model":"echo","messages":[{"role":"user","content":"x"}]}'
        timeout 60 systemctl restart provider-router.service &&
                [ "$(http_code -H 'X-Provider: echo' -d "$body" "$url/v1/chat/completions")" = 401 ] &&
                [ "$(http_code -H 'X-Provider: echo' -H 'Authorization: Bearer wrong' -d "$body" "$url/v1/chat/completions")" = 401 ] &&
                [ "$(http_code -H 'X-Provider: echo' -H 'Authorization: Bearer system-test-client-token' \
                        -H 'Content-Type: application/json' -d "$body" "$url/v1/chat/completions")" = 200 ] &&
                [ "$(http_code "$url/health")" = 200 ]
}
check "client tokens from /etc/credstore: 401 without or with a wrong token, 200 with it, /health open" tokens_enforced

# ---- removal ---------------------------------------------------------------------------
check "the package removes cleanly (dpkg -r)" dpkg -r provider-router
check "... stopping the socket and the service" \
        sh -c '! systemctl is-active --quiet provider-router.socket && ! systemctl is-active --quiet provider-router.service'
check "... and keeping the configuration until purge" test -f /etc/provider-router/provider-router.conf
check "the package purges cleanly (dpkg -P)" dpkg -P provider-router

systemctl stop pr-mock-provider.service 2>/dev/null || true

# ---- the README's first command on this clean system ------------------------------------
# A fresh copy of the source tree; scripts/run installs the build dependencies with apt (their
# .debs wait in apt's cache, the container has no network), builds and starts the router with
# the shipped configuration. Then the README's own curl request, and its answer as shown there.
checkout=/root/provider-router
cp -a /payload/src "$checkout"
readme=$checkout/README.md
check "the build dependencies are not installed yet (a clean system)" \
        sh -c '! command -v meson && ! command -v gcc && ! dpkg-query -W -f="\${Status}" check 2>/dev/null | grep -q "ok installed"'
(cd "$checkout" && exec timeout 900 scripts/run) >"$tmp/run.log" 2>&1 &
run_pid=$!
router_up() {
        local end=$((SECONDS + 900))
        until curl -sf --max-time 2 -o /dev/null http://127.0.0.1:3001/health; do
                kill -0 "$run_pid" 2>/dev/null || { echo "scripts/run exited"; return 1; }
                [ $SECONDS -lt $end ] || { echo "not up after 900 s"; return 1; }
                sleep 1
        done
}
run_up() {
        router_up || { tail -n 30 "$tmp/run.log"; return 1; }
}
check "scripts/run installs, builds and starts the router on 127.0.0.1:3001" run_up
note "scripts/run: $(grep -m1 '^Installing:' "$tmp/run.log" || echo 'installed nothing')"
readme_request() {
        local cmd expected answer
        # The README's curl command, from "In another terminal:" to the end of its code block.
        cmd=$(awk '/^In another terminal:/ {f=1} f && /^curl / {c=1} c && /^```/ {exit} c {print}' "$readme")
        expected=$(awk 'f && /^```json/ {j=1; next} j {print; exit} /^In another terminal:/ {f=1}' "$readme")
        [ -n "$cmd" ] && [ -n "$expected" ] || { echo "no curl command or answer found in $readme"; return 1; }
        answer=$(sh -c "$cmd" | sed -E 's/"id":"chatcmpl-[^"]*"/"id":"chatcmpl-…"/; s/"created":[0-9]+/"created":…/')
        echo "command: $cmd"
        echo "answer:  $answer"
        echo "README:  $expected"
        [ "$answer" = "$expected" ]
}
check "the README's curl request gets the README's answer from the echo provider" readme_request
stop_run() {
        kill -TERM "$run_pid" 2>/dev/null
        wait "$run_pid"
}
check "the router started by scripts/run stops cleanly on SIGTERM" stop_run
grep -q 'Dtests=false\|tests *: *False' "$tmp/run.log" && note "scripts/run configured the build without the tests (no check)"

rm -rf "$tmp"
echo "1..$n"
[ $failed -eq 0 ]
