"""`prune --nproc K` on one machine: the ranks started by torch's elastic launcher (what `torchrun --standalone`
runs), and a failed job reduced to the one line that explains it.

Every rank started here leaves its own one line in a report file instead of printing it; when the job fails the
launcher prints one: the earliest rank's own error, else a rank killed by a signal, else a rank stopped by a signal
(Ctrl-C: the line that says how to resume), else a collective that failed because another rank went away.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPORTS = "STREAMPRUNE_RANK_REPORTS"  # the directory a rank started by `launch` writes its report to
# what a report's kind says about the cause, most telling first
KINDS = ("error", "internal", "killed", "interrupted", "peer")


def report_failure(line: str, code: int, kind: str) -> bool:
    """In a rank started by `launch`: leave this rank's line for the launcher instead of printing it (K ranks would
    print K lines, most of them consequences of one). False outside such a rank."""
    where, rank = os.environ.get(REPORTS), os.environ.get("RANK")
    if not where or rank is None or not Path(where).is_dir():
        return False
    path = Path(where) / f"rank-{int(rank)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": int(rank), "time": time.time(), "line": line, "code": code, "kind": kind}))
    os.replace(tmp, path)
    return True


def explain(reports: list[dict], exits: dict[int, int], world: int) -> tuple[str, int]:
    """The one line (and exit status) for a failed job: `reports` from the ranks, `exits` their exit codes (a
    negative code: killed by that signal)."""
    told = {r["rank"] for r in reports}
    candidates = list(reports)
    for rank, code in exits.items():
        if code < 0 and rank not in told:  # died without a word: SIGKILL, the OOM killer, a segfault
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
            candidates.append({"rank": rank, "time": 0.0, "kind": "killed", "code": 1,
                               "line": f"streamprune: error: rank {rank} of {world} was killed by {name}; the other "
                                       f"ranks were stopped (run the same command again to continue from the last "
                                       f"committed block)"})
    if not candidates:
        rank, code = min(exits.items()) if exits else (0, 1)
        return f"streamprune: error: rank {rank} of {world} failed with exit status {code}", 1
    first = min(candidates, key=lambda r: (KINDS.index(r["kind"]), r["time"] if r["kind"] != "interrupted" else 0,
                                           r["rank"]))
    return first["line"], int(first["code"])


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m streamprune *argv` as `nproc` ranks on this machine; returns the exit status, and prints the
    one line of a failed job."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the launcher's own account (tracebacks, failure tables)
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # share the cores
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    with tempfile.TemporaryDirectory(prefix="streamprune-ranks-") as where:
        os.environ[REPORTS] = where
        exits, code = {}, 1
        try:
            elastic_launch(config, sys.executable)("-m", "streamprune", *argv)
            return 0
        except ChildFailedError as e:
            exits = {rank: f.exitcode for rank, f in e.failures.items()}
        except SignalException as e:  # Ctrl-C or SIGTERM to the launcher: the ranks got it too and stopped
            code = 128 + int(e.sigval)
        finally:
            del os.environ[REPORTS]
        reports = [json.loads(p.read_text()) for p in sorted(Path(where).glob("rank-*.json"))]
    if not reports and not exits:
        print(f"streamprune: stopped by {signal.Signals(code - 128).name}", file=sys.stderr, flush=True)
        return code
    line, status = explain(reports, exits, nproc)
    print(line, file=sys.stderr, flush=True)
    return status
