#!/usr/bin/env bash
# Install everything signalpost needs on a fresh Debian machine: system packages (coturn,
# Chromium, Consul from the bullseye suite, redis-server for the benchmarks' scaled-out
# Socket.IO baseline) and a .venv with the project and its extras.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

need_apt=()
command -v turnserver >/dev/null || need_apt+=(coturn)
command -v chromium >/dev/null || need_apt+=(chromium chromium-driver)
command -v consul >/dev/null || need_apt+=(consul)
command -v ss >/dev/null || need_apt+=(iproute2)  # ss -K: the TCP-reset fault tests
command -v redis-server >/dev/null || need_apt+=(redis-server)
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    need_apt+=(python3 python3-venv)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
    if [[ " ${need_apt[*]} " == *" consul "* ]] && [ ! -f /etc/apt/sources.list.d/bullseye.sources ]; then
        # Consul 1.8.7 is packaged only in bullseye: add that suite (first stanza of the
        # system's sources, suite swapped) pinned low so nothing else comes from it.
        awk 'BEGIN{RS=""; ORS="\n\n"} NR==1 {print; exit}' /etc/apt/sources.list.d/debian.sources \
            | sed -E 's/^Suites:.*/Suites: bullseye/' \
            | $SUDO tee /etc/apt/sources.list.d/bullseye.sources >/dev/null
        printf 'Package: *\nPin: release n=bullseye\nPin-Priority: 100\n' \
            | $SUDO tee /etc/apt/preferences.d/bullseye >/dev/null
    fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
    # The coturn package may start a system turnserver on 3478; tests run their own on
    # free ports. Stop and disable only the service this install started: never a
    # turnserver this script did not start (a user's own coturn, another job's test
    # server). systemd stops exactly the unit's processes. Debian's /etc/init.d/coturn
    # "stop" would also kill every /usr/bin/turnserver by executable, so it is not used:
    # only the pid the service wrote to its pidfile is stopped, and only if that pid runs
    # /usr/bin/turnserver (the init script starts nothing unless TURNSERVER_ENABLED=1).
    if [[ " ${need_apt[*]} " == *" coturn "* ]]; then
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            $SUDO systemctl disable --now coturn 2>/dev/null || true
        elif [ -x /etc/init.d/coturn ]; then
            if [ -f /var/run/turnserver.pid ] && command -v start-stop-daemon >/dev/null; then
                $SUDO start-stop-daemon --stop --quiet --oknodo --retry=TERM/10/KILL/5 \
                    --pidfile /var/run/turnserver.pid --exec /usr/bin/turnserver || true
            fi
            $SUDO update-rc.d coturn disable >/dev/null 2>&1 || true
        fi
    fi
    # The redis-server package starts a system redis on 6379 (where policy-rc.d allows it);
    # the benchmarks run their own on a free port. Stop and disable only the service this
    # install started, through its own init system and pidfile.
    if [[ " ${need_apt[*]} " == *" redis-server "* ]]; then
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            $SUDO systemctl disable --now redis-server 2>/dev/null || true
        elif [ -x /etc/init.d/redis-server ]; then
            $SUDO /etc/init.d/redis-server stop >/dev/null 2>&1 || true
            $SUDO update-rc.d redis-server disable >/dev/null 2>&1 || true
        fi
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,webrtc,load]'
echo "signalpost: set up (.venv ready; consul $(consul version 2>/dev/null | head -1 | awk '{print $2}'), $(chromium --version 2>/dev/null || echo chromium))"
