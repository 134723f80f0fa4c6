"""The processes of one merge: a single process, or the ranks of a ``torchrun`` job.

A merge under ``torchrun`` (``torch.distributed``: gloo on CPU, NCCL for CUDA tensors) splits the output
tensors among the ranks. The ranks meet only at a few sync points (after planning, after the output
folder is prepared, after each histogram pass of global-scope TIES, at the end). At each one every rank
says whether it failed, so that a failure anywhere stops every rank with a message that names the rank
and the cause. Between sync points a failing rank also posts its failure in the job's key-value store,
and the others look for it between tensors, so that they stop early instead of finishing their share.

With one process (no ``torchrun``, or ``WORLD_SIZE=1``) nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

# How long a rank that lost contact with the others looks for a dead rank on its host before it
# reports that it could not name one.
LOST_GRACE_S = 3.0


class MergeError(RuntimeError):
    """A merge that failed while running; the output folder was not created."""


class MergeInterrupted(MergeError):
    pass


class RankFailed(MergeError):
    """Another rank of the job failed; the message names it and its error."""


class CollectiveTimeout(MergeError):
    """The ranks did not all reach a sync point within the timeout."""


@dataclass
class Failure:
    """One rank's failure, as the other ranks learn it."""

    rank: int
    message: str
    resumable: bool  # the finished tensors stay valid (an interrupt, a lost rank), unlike a bad input
    primary: bool = True  # False: this rank stopped because another one failed

    def text(self) -> str:
        return f"rank {self.rank} failed: {self.message}"


def partition(sizes: Sequence[int], parts: int) -> List[range]:
    """Split items (in order) into ``parts`` contiguous ranges of about equal total size.

    Item i goes to the part that holds the middle of its byte range, so each part's total is within
    one item of the ideal; the ranges keep plan order, so each rank writes its shards sequentially."""
    total = sum(sizes)
    bounds = [0] * (parts + 1)
    acc = 0
    owner = []
    for s in sizes:
        mid = acc + s / 2
        owner.append(min(parts - 1, int(mid * parts / total)) if total else 0)
        acc += s
    k = 0
    for p in range(parts):
        while k < len(owner) and owner[k] <= p:
            k += 1
        bounds[p + 1] = k
    bounds[parts] = len(sizes)
    return [range(bounds[p], bounds[p + 1]) for p in range(parts)]


class Group:
    """The ranks of one merge.

    Args:
        timeout: seconds a rank waits for the others at a sync point before it reports a timeout.
        device: ``cpu`` or ``cuda``; with CUDA under ``torchrun`` the rank uses ``cuda:LOCAL_RANK`` and
            the process group uses NCCL for CUDA tensors (gloo for the small CPU messages).
        distributed: None: a process group that is already initialised is used, and one is started when
            the environment says this process is one of several (``WORLD_SIZE`` > 1, as ``torchrun``
            sets it). False: always one process. True: fail unless several processes are found.
    """

    _merges = 0  # merges started by this process: keys in the store are unique per merge

    def __init__(self, timeout: float = 1800.0, device: str = "cpu", distributed: Optional[bool] = None):
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.timeout = float(timeout)
        self.store = None
        self.owns = False
        self.cuda = torch.device(device).type == "cuda"
        self.bytes_reduced = 0  # bytes this rank contributed to all-reduces (the global-TIES histograms)
        self.host = socket.gethostname()
        Group._merges += 1
        self.tag = f"fastmerge/merge-{Group._merges}/"
        import torch.distributed as dist

        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if distributed is False:
            return
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # no store: failures are learnt at the sync points only
                self.store = None
        elif env_world > 1:
            if not dist.is_available():
                raise MergeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
            td = datetime.timedelta(seconds=self.timeout)
            self.store, self.rank, self.world = next(dist.rendezvous("env://", timeout=td))
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            backend = "gloo"
            if self.cuda:
                torch.cuda.set_device(self.local_rank)
                backend = "cpu:gloo,cuda:nccl"
            # each merge's group gets its own keys: a process that merges twice must not meet the first
            # group's addresses in the store
            self.store = dist.PrefixStore(self.tag, self.store)
            dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.world, timeout=td)
            self.owns = True
        if self.world > 1 and self.store is not None:
            import json

            try:  # who runs each rank: a rank that dies without a word can then be named (see gone())
                self.store.set(self.tag + f"who/{self.rank}", json.dumps({"host": self.host, "pid": os.getpid()}))
            except Exception:
                pass
        elif distributed:
            raise MergeError("distributed=True, but this process was not started by torchrun (WORLD_SIZE is not set "
                             "above 1) and no process group is initialised")

    @property
    def device(self) -> Optional[torch.device]:
        """``cuda:LOCAL_RANK`` for a CUDA merge, else None (the caller's device stands)."""
        return torch.device("cuda", self.local_rank) if self.cuda and self.world > 1 else None

    # ------------------------------------------------------------------ failures between sync points

    def post_failure(self, failure: Failure) -> None:
        """Tell the other ranks (through the store) that this rank failed; the first post wins."""
        if self.store is None or self.world == 1:
            return
        import json

        try:
            self.store.compare_set(self.tag + "failed", "", json.dumps(failure.__dict__))
        except Exception:
            pass

    def posted_failure(self) -> Optional[Failure]:
        """The first failure another rank posted, if any (a quick look at the store)."""
        if self.store is None or self.world == 1:
            return None
        import json

        try:
            if not self.store.check([self.tag + "failed"]):
                return None
            return Failure(**json.loads(self.store.get(self.tag + "failed").decode()))
        except Exception:
            return None

    def gone(self) -> List[str]:
        """The ranks on this host whose process no longer runs (killed or crashed), as
        "rank R (pid P on HOST)"; ranks on other hosts cannot be checked from here."""
        if self.store is None or self.world == 1:
            return []
        import json

        out = []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                if not self.store.check([self.tag + f"who/{r}"]):
                    continue
                who = json.loads(self.store.get(self.tag + f"who/{r}").decode())
            except Exception:
                continue
            if who.get("host") != self.host:
                continue
            if not _running(int(who.get("pid", 0))):
                out.append(f"rank {r} (pid {who['pid']} on {who['host']})")
        return out

    def gone_text(self) -> str:
        dead = self.gone()
        if not dead:
            return ""
        return f"; {', '.join(dead)} {'is' if len(dead) == 1 else 'are'} no longer running (killed or crashed)"

    # ------------------------------------------------------------------ collectives

    def _lost(self, exc: BaseException, stage: str) -> MergeError:
        posted = self.posted_failure()
        if posted is not None and posted.rank != self.rank:
            return RankFailed(posted.text())
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return CollectiveTimeout(
                f"rank {self.rank} ({self.host}): timed out after {self.timeout:g} s waiting for the other ranks "
                f"({stage}){self.gone_text()}; a rank is stuck or has died (see the launcher's report), or raise "
                f"--timeout if the storage is slow")
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        dead = self.gone_text()
        # A killed peer's sockets close while its process is still exiting, before it turns into a
        # zombie: give a rank of this host a moment to be seen dead.
        deadline = time.monotonic() + LOST_GRACE_S
        while not dead and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = self.gone_text()
        return RankFailed(f"rank {self.rank} ({self.host}): lost contact with the other ranks ({stage}): {first}"
                          + (dead or "; another rank has probably died: see the launcher's report"))

    def gather(self, obj: Any, stage: str) -> List[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise self._lost(e, stage) from None
        return out

    def all_reduce_sum(self, t: torch.Tensor, stage: str) -> torch.Tensor:
        """The elementwise sum of ``t`` over the ranks (counted in :attr:`bytes_reduced`)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        self.bytes_reduced += t.numel() * t.element_size()
        x = t.to(self.device) if self.device is not None else t.clone()
        try:
            dist.all_reduce(x)
        except RuntimeError as e:
            raise self._lost(e, stage) from None
        return x.cpu()

    def exchange(self, stage: str, failure: Optional[Failure], payload: Any = None) -> List[Any]:
        """A sync point: every rank gives its failure (or None) and a payload; returns every rank's
        (failure, payload) in rank order (the caller decides what a failure means there)."""
        return self.gather((failure, payload), stage)

    def close(self) -> None:
        if self.owns:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:
                pass
            self.owns = False


def _running(pid: int) -> bool:
    """Whether a process of this host runs (a zombie, killed but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def first_failure(records: Sequence[Optional[Failure]]) -> Optional[Failure]:
    """The failure to report: a rank's own error before one that only followed another rank's."""
    fails = [f for f in records if f is not None]
    if not fails:
        return None
    primary = [f for f in fails if f.primary]
    return (primary or fails)[0]


__all__ = ["Group", "Failure", "partition", "first_failure", "MergeError", "MergeInterrupted", "RankFailed",
           "CollectiveTimeout"]
