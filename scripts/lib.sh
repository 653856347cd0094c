# Shared by scripts/run and scripts/test: package lists and a helper that installs what is
# missing. Sourced, not executed.

# What the daemon needs to build; nothing in it is for the tests only.
BUILD_DEPS="meson ninja-build pkg-config gcc libc6-dev libsystemd-dev libcurl4-openssl-dev
libmicrohttpd-dev libjson-glib-dev libglib2.0-dev gettext scdoc bash-completion"

TEST_DEPS="check python3 curl dbus-daemon dbus-bin polkitd systemd systemd-container
debootstrap libxml2-utils clang libclang-rt-dev valgrind
debhelper devscripts dpkg-dev lintian fakeroot iproute2 openssl"

top=$(cd "$(dirname "$0")/.." && pwd)

missing_packages() {
        for p in "$@"; do
                dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
        done
}

ensure_packages() {
        # shellcheck disable=SC2086
        missing=$(missing_packages $@ | tr '\n' ' ')
        [ -z "${missing% }" ] && return 0
        echo "Installing: $missing"
        if [ "$(id -u)" -eq 0 ]; then
                apt_get="apt-get"
        elif command -v sudo >/dev/null; then
                apt_get="sudo apt-get"
        else
                echo "Missing packages: $missing — install them as root (apt-get install $missing)." >&2
                return 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        $apt_get install -y --no-install-recommends $missing || {
                $apt_get update && $apt_get install -y --no-install-recommends $missing
        }
}

# The openai npm client test needs node and npm; a machine with Node.js from elsewhere (which
# bundles npm) must not get Debian's npm on top, which conflicts with it.
ensure_node() {
        if command -v node >/dev/null && command -v npm >/dev/null; then
                return 0
        fi
        ensure_packages nodejs npm
}

# build_option DIR NAME: the value of a meson option in the build directory DIR.
build_option() {
        meson introspect --buildoptions "$top/$1" |
                python3 -c 'import json, sys
print(next((str(o["value"]).lower() for o in json.load(sys.stdin) if o["name"] == sys.argv[1]), ""))' "$2"
}

# build DIR [MESON SETUP ARGUMENTS]: for scripts/test. Sets DIR up with the tests if it does not
# exist, turns them on if scripts/run set it up without (it does when check is missing), builds.
build() {
        dir=${1:-build}
        shift || true
        if [ ! -f "$top/$dir/build.ninja" ]; then
                meson setup "$top/$dir" "$top" -Dtests=true "$@"
        elif [ "$(build_option "$dir" tests)" != true ]; then
                meson configure "$top/$dir" -Dtests=true
        fi
        ninja -C "$top/$dir"
}

# build_daemon DIR: for scripts/run, which needs none of the test dependencies. A new DIR has the
# tests only if check is installed; an existing one keeps what it has (scripts/test may have set
# it up), unless it has the tests and check has gone since: then they are turned off, so that
# meson regenerating the build does not fail on a dependency the daemon does not need.
build_daemon() {
        dir=${1:-build}
        if pkg-config --exists check 2>/dev/null; then
                have_check=true
        else
                have_check=false
        fi
        if [ ! -f "$top/$dir/build.ninja" ]; then
                meson setup "$top/$dir" "$top" -Dtests=$have_check
        elif [ $have_check = false ] && [ "$(build_option "$dir" tests)" = true ]; then
                meson configure "$top/$dir" -Dtests=false
        fi
        ninja -C "$top/$dir"
}
