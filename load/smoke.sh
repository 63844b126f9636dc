#!/usr/bin/env bash
# 20-second headless Locust smoke against a fresh `signalpost dev`; exits non-zero on any
# failure (Locust's exit code is 1 when a request failed) or if the server misbehaves.
#
#   load/smoke.sh            # from the repository root
#   SMOKE_SECONDS=60 SMOKE_USERS=40 load/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SECONDS_TO_RUN=${SMOKE_SECONDS:-20}
USERS=${SMOKE_USERS:-24}
export SIGNALPOST_JWT_SECRET=${SIGNALPOST_JWT_SECRET:-signalpost-smoke-secret-0123456789abcdef}
export SIGNALPOST_ROOM_CAPACITY=${SIGNALPOST_ROOM_CAPACITY:-50}
export SIGNALPOST_RESUME_WINDOW=${SIGNALPOST_RESUME_WINDOW:-30}

PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG=$(mktemp -d)/smoke
mkdir -p "$LOG"
"$VENV/bin/signalpost" --log-level WARNING dev --host 127.0.0.1 --port "$PORT" \
    >"$LOG/server.out" 2>"$LOG/server.err" &
SERVER=$!
cleanup() {
    kill -TERM "$SERVER" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER" 2>/dev/null || true
}
trap cleanup EXIT

for _ in $(seq 100); do
    if "$VENV/bin/python" -c "import socket,sys; socket.create_connection(('127.0.0.1',$PORT),0.2)" 2>/dev/null; then
        break
    fi
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG/server.err"; echo "smoke: server died" >&2; exit 1; }
    sleep 0.1
done

set +e
timeout $((SECONDS_TO_RUN + 60)) "$VENV/bin/locust" -f load/locustfile.py --headless \
    -u "$USERS" -r "$USERS" -t "${SECONDS_TO_RUN}s" --stop-timeout 10 \
    --host "ws://127.0.0.1:$PORT" --only-summary --exit-code-on-error 1 \
    --csv "$LOG/locust" \
    CallSetupUser PresenceChurnUser RoomFanoutUser ReconnectStormUser
STATUS=$?
set -e
if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "smoke: the server exited during the run" >&2
    cat "$LOG/server.err" >&2
    exit 1
fi
# locust_stats.csv: Type,Name,Request Count,Failure Count,...
REQUESTS=$(awk -F, '$2=="Aggregated" {print $3}' "$LOG/locust_stats.csv")
FAILURES=$(awk -F, '$2=="Aggregated" {print $4}' "$LOG/locust_stats.csv")
echo "smoke: ${REQUESTS:-0} requests, ${FAILURES:-?} failures, locust exit $STATUS (logs in $LOG)"
if [ "$STATUS" -ne 0 ] || [ "${FAILURES:-1}" != "0" ] || [ "${REQUESTS:-0}" -lt 100 ]; then
    echo "smoke: FAILED" >&2
    exit 1
fi
echo "smoke: OK"
