#!/bin/bash
# Instructions per call of `signalpost dev` under the calls load (valgrind's callgrind):
# noise-free where CPU time is not (a shared machine).
#   bash bench/experiments/callgrind_calls.sh <source tree> <name>
# RATE=<calls/s> makes the load open loop at that rate (the same wall time and calls for
# every tree: the server's idle work, timers and keepalives, then weighs the same).
TREE=$1; NAME=$2; shift 2
cd $TREE
export SIGNALPOST_JWT_SECRET=benchsecret SIGNALPOST_RATE_PER_SECOND=1000000000 SIGNALPOST_RATE_BURST=1000000000 SIGNALPOST_ROOM_CAPACITY=2
rm -f /tmp/cg.$NAME.*
PYTHONPATH=$TREE valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$NAME.%p /work/main/.venv/bin/python /work/main/.venv/bin/signalpost --log-level WARNING dev --host 127.0.0.1 --port 0 > /tmp/cgout.$NAME 2>&1 &
PID=$!
for i in $(seq 300); do grep -q "signalpost dev:" /tmp/cgout.$NAME && break; sleep 0.2; done
URL=$(grep "signalpost dev:" /tmp/cgout.$NAME | awk '{print $NF}')
/work/main/.venv/bin/python -m bench.loadgen calls --url $URL --secret benchsecret --slots 8 --duration 1 --warmup 5 --no-wait > /dev/null 2>&1
callgrind_control -z $PID >/dev/null
/work/main/.venv/bin/python -m bench.loadgen calls --url $URL --secret benchsecret --slots 8 ${RATE:+--rate $RATE} --duration 20 --warmup 0 --no-wait 2>/dev/null | grep RESULT > /tmp/cgres.$NAME
callgrind_control -d $PID >/dev/null
kill -TERM $PID; wait $PID
CALLS=$(python3 -c "import json;print(json.loads(open('/tmp/cgres.$NAME').read()[7:])['calls'])")
F=$(ls /tmp/cg.$NAME.*.1 | head -1)
IR=$(callgrind_annotate $F 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{print $1}' | tr -d ,)
echo "$NAME calls=$CALLS Ir=$IR Ir/call=$((IR / CALLS))"
