"""One rank of a ``torchrun`` job for the distributed merge tests (not collected by pytest).

    python -m torch.distributed.run --standalone --nproc_per_node=P tests/dist_merge_worker.py JOBS.json

JOBS.json holds ``{"jobs": [{"config": YAML, "out": folder, "options": {...}}, ...], "fault": {...},
"results": folder, "init_group": bool}`` (``init_group``: the worker starts the process group itself). Every rank runs the merges in order through ``fastmerge.merge_checkpoints`` (each merge
starts and ends its own process group) and writes its results, or its error, to ``results/rank-R.json``. A fault
makes one rank misbehave after a number of merged tensors: ``kill`` (SIGKILL, as the OOM killer does),
``interrupt`` (Ctrl-C in that rank only),
``hang`` (sleeps, so the others time out), ``blind`` (the rank cannot see the shared output folder), or
``enospc`` (the rank's disk is full).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    from fastmerge.cli import _terminate_as_interrupt
    from fastmerge.merge import merge_checkpoints
    from fastmerge.merge import run as mrun

    _terminate_as_interrupt()
    fault = spec.get("fault") or {}
    if fault.get("rank") == rank:
        real = mrun._merge_one
        count = {"n": 0}

        def merge_one(*a, **k):
            if count["n"] == fault.get("after", 0):
                if fault["kind"] == "kill":
                    time.sleep(0.3)  # let the writer thread record the finished tensors
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault["kind"] == "hang":
                    time.sleep(600)
                if fault["kind"] == "interrupt":
                    raise KeyboardInterrupt
            count["n"] += 1
            return real(*a, **k)

        mrun._merge_one = merge_one
        if fault["kind"] == "blind":
            mrun._read_json = lambda path: None
        if fault["kind"] == "enospc":
            import errno

            from fastmerge.merge import io as mio

            def full(fd, data, offset):
                raise OSError(errno.ENOSPC, "No space left on device")

            mio._write_at = full
    if spec.get("init_group"):  # the caller's own process group, as a training script would have
        import torch.distributed as dist

        dist.init_process_group("gloo")
    results = []
    out = os.path.join(spec["results"], f"rank-{rank}.json")
    for job in spec["jobs"]:
        try:
            res = merge_checkpoints(job["config"], job["out"], quiet=True, **job.get("options", {}))
        except BaseException as e:  # noqa: BLE001 - reported to the test (SIGTERM included)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's stop must not cut the report short
            results.append({"error": f"{type(e).__name__}: {e}"})
            with open(out, "w") as f:
                json.dump(results, f)
            print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
            return 3
        results.append({"world": res.world, "rank": res.rank, "resumed": res.resumed, "ranks": res.ranks,
                        "shards": res.shards})
    if spec.get("init_group"):
        import torch.distributed as dist

        results.append({"group_still_initialised": dist.is_initialized()})
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
