"""torch.distributed plumbing, nanoGPT style: one process per device, launched by `torchrun`.

    torchrun --nproc_per_node 2 -m crossdict.cli extract --config configs/embedded.yaml
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 --nproc_per_node 8 -m crossdict.cli train ...

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs as one process and
no process group is created, so single-process runs behave exactly as before. Rank 0 writes the
shared files (manifests, checkpoints, CSVs); every rank must see the same `output_dir` (a shared
filesystem across nodes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import torch
import torch.distributed as tdist

from .utils import resolve_device, stable_hash


class DistributedConfigError(ValueError):
    """The ranks of one job disagree (config, world size vs work): refused before any work."""


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process sits in the job. `Dist()` is the single-process default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Several ranks share this work (a process group exists); collectives below are no-ops otherwise."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (JSON-able values only: no pickles cross the wire we can avoid)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, json.dumps(obj))
        return [json.loads(o) for o in out]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (JSON-able)."""
        if not self.enabled:
            return obj
        box = [json.dumps(obj) if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return json.loads(box[0])

    def sum_int(self, n: int) -> int:
        if not self.enabled:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        tdist.all_reduce(t)  # gloo and nccl both reduce int64; CPU tensor is fine for gloo
        return int(t)


SINGLE = Dist()


def init_dist(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes, or return the single-process `Dist`.

    `device` is the config's `auto|cpu|cuda`; under torchrun a CUDA rank takes `cuda:LOCAL_RANK`
    and the NCCL backend, a CPU rank gloo. Calling it twice is harmless.
    """
    rank = int(os.environ.get("RANK", -1))
    if rank == -1 or (int(os.environ.get("WORLD_SIZE", 1)) == 1 and not tdist.is_initialized()):
        return Dist(device=resolve_device(device))
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if tdist.get_world_size() != world or tdist.get_rank() != rank:
        raise DistributedConfigError(f"process group says rank {tdist.get_rank()}/{tdist.get_world_size()}, "
                                     f"environment says {rank}/{world}")
    return Dist(rank, world, local, dev)


def local(dist: Dist) -> Dist:
    """This rank alone (same device): for work a rank does by itself, e.g. one SAE per rank."""
    return Dist(device=dist.device)


def destroy(dist: Dist, finished: bool = True) -> None:
    """Leave the process group; after a finished run, only once every rank is done with it.

    Without the barrier a fast rank can tear down its gloo pairs while a slow one still has DDP
    work in flight; the slow rank then aborts ("terminate called without an active exception").
    A rank leaving on an error skips it: its peers may be blocked in another collective.
    """
    if dist.enabled and tdist.is_initialized():
        try:
            if finished:
                tdist.barrier()
        finally:
            tdist.destroy_process_group()


def check_same_config(dist: Dist, cfg_dict: dict, what: str = "config") -> str:
    """All-gather a hash of the resolved config; refuse (on every rank) if any rank differs.

    Ranks launched with different YAML files or `--set` overrides would otherwise write one cache or
    train one SAE from two configs. Returns the hash.
    """
    h = stable_hash(cfg_dict)
    hashes = dist.all_gather_object(h)
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for r, x in enumerate(hashes):
            groups.setdefault(x, []).append(r)
        desc = "; ".join(f"ranks {rs} have {what} hash {x}" for x, rs in groups.items())
        raise DistributedConfigError(f"the ranks of this job were given different {what}s ({desc}); launch every "
                                     "rank with the same --config file and the same --set overrides")
    return h


def split_work(n_items: int, dist: Dist, what: str, change: str) -> None:
    """Refuse more ranks than work items; warn when the items do not divide evenly.

    `what` names the items (e.g. "extraction shards"), `change` says how to get more of them.
    """
    W = dist.world_size
    if W > n_items:
        raise DistributedConfigError(f"{W} ranks but only {n_items} {what}: {W - n_items} ranks would sit idle. "
                                     f"Launch with --nproc_per_node {n_items} or fewer, or {change}")
    if n_items % W and dist.is_main:
        warnings.warn(f"{n_items} {what} over {W} ranks: ranks get {n_items // W} or {n_items // W + 1}, so some "
                      f"idle at the end; {change} to balance", stacklevel=2)


# --- SAE batch statistics across ranks -----------------------------------------------------------


class BatchReduce:
    """Sums over the global batch when each rank holds a slice of it (data-parallel SAE training).

    The SAE loss normalises by batch-wide statistics (total variance, token count, BatchTopK
    threshold); with the batch split across ranks each rank needs the *global* value, or the summed
    gradients would not be those of the single-process loss. Every rank holds an equal slice.
    """

    def __init__(self) -> None:
        self.world_size = tdist.get_world_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        tdist.all_reduce(t)
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped per-rank tensors along dim 0, in rank order."""
        parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)
