#!/bin/bash
# Instructions per relayed message of `signalpost cluster --edges 2 --brokers 1` (the edges
# and the broker under valgrind's callgrind), relay load at a fixed rate: noise-free where
# CPU time is not (a shared machine). Batching under valgrind differs from a real run, so
# compare trees with each other, not with CPU figures.
#   bash bench/experiments/callgrind_cluster.sh <source tree> <name> [rate/s, default 200]
TREE=$1; NAME=$2; RATE=${3:-200}
HERE=$(cd "$(dirname "$0")" && pwd)
cd $TREE
export SIGNALPOST_JWT_SECRET=benchsecret SIGNALPOST_RATE_PER_SECOND=1000000000 SIGNALPOST_RATE_BURST=1000000000 SIGNALPOST_ROOM_CAPACITY=2
export CG_CLUSTER_OUT=/tmp/cgc.$NAME
rm -f /tmp/cgc.$NAME.* /tmp/cgc-state.$NAME.json
PYTHONPATH=$TREE:$HERE/callgrind_cluster /work/main/.venv/bin/python -m signalpost.cli --log-level WARNING cluster --edges 2 --brokers 1 --consul off --state /tmp/cgc-state.$NAME.json > /tmp/cgcout.$NAME 2>&1 &
SUP=$!
URLS=""
for i in $(seq 600); do
  URLS=$(python3 -c "
import json,sys
try: d=json.load(open('/tmp/cgc-state.$NAME.json'))
except Exception: sys.exit()
e=[p['url'] for p in d.get('processes',[]) if p.get('kind')=='edge' and p.get('url')]
print(' '.join('--url '+u.rstrip('/')+('' if u.rstrip('/').endswith('/v1/signal') else '/v1/signal') for u in e) if len(e)==2 else '')" 2>/dev/null)
  [ -n "$URLS" ] && break; kill -0 $SUP 2>/dev/null || break; sleep 0.5
done
[ -z "$URLS" ] && { echo "cluster did not start"; kill -TERM $SUP; exit 1; }
sleep 5
PIDS=$(ls /tmp/cgc.$NAME.* 2>/dev/null | sed 's/.*\.//' | sort -u)
/work/main/.venv/bin/python -m bench.loadgen relay $URLS --secret benchsecret --pairs 20 --rate $RATE --duration 1 --warmup 4 --no-wait > /dev/null 2>/tmp/cgcerr0.$NAME
# the measured run: zero the counters once its clients are connected and warmed up
( sleep 8; for p in $PIDS; do callgrind_control -z $p > /dev/null; done ) &
/work/main/.venv/bin/python -m bench.loadgen relay $URLS --secret benchsecret --pairs 20 --rate $RATE --duration 20 --warmup 8 --no-wait 2>/tmp/cgcerr.$NAME | grep RESULT > /tmp/cgcres.$NAME
for p in $PIDS; do callgrind_control -d $p > /dev/null; done
kill -TERM $SUP; wait $SUP
N=$(python3 -c "import json;print(json.loads(open('/tmp/cgcres.$NAME').read()[7:])['relayed'])")
for kind in edge broker; do
  IR=0
  for f in /tmp/cgc.$NAME.$kind.*.1; do
    x=$(callgrind_annotate $f 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{print $1}' | tr -d ,)
    IR=$((IR + x))
  done
  echo "$NAME $kind relayed=$N Ir=$IR Ir/msg=$((IR / N))"
done
