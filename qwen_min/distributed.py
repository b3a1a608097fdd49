"""Data parallel training over the processes torchrun starts: which one am I, and the sums across them.

    torchrun --nproc-per-node 2 train.py ...      # 2 processes (GPUs: one each; CPU: gloo)

torchrun starts N copies of the script and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, and where rank 0 listens). Every copy loads the same model and data and
draws the same global batch of windows each step; rank r takes the r-th contiguous slice of it.
After the backward pass the LoRA gradients are summed across ranks (one all-reduce), so every rank
applies the same update and the weights stay identical everywhere, with no broadcast of weights.
That is all of data parallelism for an adapter of half a million numbers; DistributedDataParallel
adds bucketing and overlap that pay only for large models.

Nothing here runs when WORLD_SIZE is unset or 1: a plain `python train.py` is one rank of a world
of one, and every function below is then the identity.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's place among all of them
    size: int = 1  # how many processes train together
    local_rank: int = 0  # its place on this machine: which GPU it takes

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder and prints."""
        return self.rank == 0

    def shard(self, items):
        """This rank's contiguous slice of `items` (an array or list); slices differ in length by at most one."""
        bounds = np.linspace(0, len(items), self.size + 1).round().astype(int)
        return items[bounds[self.rank]:bounds[self.rank + 1]]


def join(gpus=True, timeout=timedelta(minutes=30)) -> World:
    """The world torchrun's environment describes, its process group started: NCCL between GPUs and
    gloo between CPU tensors where there are GPUs (gpus=False: gloo alone). Each process makes GPU
    LOCAL_RANK its current one, so "cuda" means its own GPU. A collective waits `timeout` for the
    slowest rank before it fails. Without torchrun: a world of one, and nothing is started."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpus and torch.cuda.is_available() else "gloo", timeout=timeout)
    return world


def check_gpus(device, world: World):
    """A GPU run needs a GPU per process on each machine; -> a sentence saying what is wrong, or None."""
    if world.size == 1 or torch.device(device).type != "cuda":
        return None
    if torch.device(device).index is not None:
        return f"--device {device} would put every process on one GPU; under torchrun pass --device cuda (each process takes GPU LOCAL_RANK)"
    if world.local_rank >= torch.cuda.device_count():
        return f"torchrun started more processes on this machine than its {torch.cuda.device_count()} GPU(s); use --nproc-per-node {torch.cuda.device_count()}"
    return None


def require_gpus(device, world: World):
    """check_gpus as the one sentence a user sees: raises UserError when the run cannot go on."""
    problem = check_gpus(device, world)
    if problem:
        raise UserError(problem + ".")


def leave(world: World):
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World):
    if world.size > 1:
        dist.barrier()


def same_everywhere(value, world: World):
    """Rank 0's value of a picklable Python object, on every rank (e.g. a default run folder named
    after the time, which the ranks would each read off their own clock)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def everyones(value, world: World) -> list:
    """Each rank's value of a picklable Python object, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def sum_over_ranks(values, world: World, device="cpu") -> list:
    """Python numbers (one list per rank) -> their elementwise sums over all ranks, as floats."""
    if world.size == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params, world: World):
    """Every parameter's .grad becomes the sum of the ranks' .grad: one all-reduce of all of them
    flattened into one buffer (96 small LoRA tensors: one message, not 96)."""
    if world.size == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def step_seed(seed, step, world: World):
    """A seed for the random draws (LoRA dropout) of one step on one rank, from (seed, step, rank)
    alone: a resumed run draws what the run never killed would have, with no per-rank RNG saved."""
    return int(np.random.SeedSequence([seed, step, world.rank]).generate_state(1)[0])
