"""Experiment only (bench/experiments/callgrind_cluster.sh): put on the PYTHONPATH of
``signalpost cluster``, it starts the cluster's edges and broker under valgrind's callgrind
(output ``$CG_CLUSTER_OUT.<kind>.<pid>``), so instructions per relayed message can be counted
per process kind; presence and the supervisor run as usual."""

import os

_out = os.environ.get("CG_CLUSTER_OUT")
if _out:
    try:
        import signalpost.cluster as cluster

        _child = cluster._python_child

        def _under_callgrind(kind: str, node_id: str, *args: str) -> list[str]:
            argv = _child(kind, node_id, *args)
            if kind in ("edge", "broker"):
                return [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={_out}.{kind}.%p",
                    *argv,
                ]
            return argv

        cluster._python_child = _under_callgrind
        cluster.READY_TIMEOUT = 300.0  # starting under valgrind takes a while
    except Exception as exc:  # only the supervisor has the module; others carry on
        del exc
