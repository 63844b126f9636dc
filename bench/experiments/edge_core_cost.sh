#!/bin/bash
# Instructions per relayed message of the cluster edges' session core (edge_core_cost.py)
# under callgrind: (run of N messages - run of 0) / N.
#   bash bench/experiments/edge_core_cost.sh <source tree> [N, default 20000]
TREE=$1; N=${2:-20000}
SCRIPT=$(cd "$(dirname "$0")" && pwd)/edge_core_cost.py
ir() {
  (cd /tmp && PYTHONPATH=$TREE valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    /work/main/.venv/bin/python "$SCRIPT" --count "$1" 2>&1 | grep "Collected" | awk '{print $4}')
}
A=$(ir 0); B=$(ir $N)
echo "$TREE instructions per message $(( (B - A) / N ))"
