"""Training across processes with PyTorch's DistributedDataParallel, started by `torchrun`.

    torchrun --standalone --nproc_per_node 2 -m vaelab train ...

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; `Context.from_env` joins the process group
(`gloo` on CPU, `nccl` on CUDA). Every process runs the same random stream (same permutation,
binarization and noise for the whole global batch) and takes its contiguous share of each batch,
so the global batch and the numbers are those of one process with the same seed; DDP averages the
gradients. Only rank 0 writes the run directory, evaluates and draws figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vaelab.errors import RunError

_joined = False  # this process joined a process group (Context.from_env)


def joined_a_group() -> bool:
    """Whether this process joined a torchrun process group: the command then ends with `os._exit`
    (see `cli.command`)."""
    return _joined


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even with one process: DDP all the same)
    collective_device: str = "cpu"  # where small tensors for collectives live (cuda for nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.launched

    @staticmethod
    def from_env(device: torch.device) -> Context:
        """Join the process group torchrun describes (RANK, WORLD_SIZE); a plain process otherwise."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return Context()
        world = int(os.environ["WORLD_SIZE"])
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if device.type == "cuda" and local_world > (gpus := torch.cuda.device_count()):
            raise RunError(  # torchrun sets LOCAL_WORLD_SIZE: every process refuses before any waits
                f"torchrun started {local_world} processes on this machine but {gpus} CUDA "
                f"device{'s are' if gpus != 1 else ' is'} visible (one per process): pass "
                f"--nproc_per_node {gpus}, or --device cpu"
            )
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
            global _joined
            _joined = True
        on_gpu = device.type == "cuda"
        return Context(rank, world, local_rank, True, f"cuda:{local_rank}" if on_gpu else "cpu")

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: cuda:LOCAL_RANK."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a global batch (shares differ by at most one row)."""
        return torch.tensor_split(t, self.world)[self.rank] if self.active else t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any (to stop all of them at the same step)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @property
    def backend(self) -> str | None:
        """The process group's backend (`gloo` or `nccl`), or None in a plain process."""
        return dist.get_backend() if self.active and dist.is_initialized() else None

    def barrier(self) -> None:
        """Wait for every process of the group (nothing in a plain process)."""
        if self.active and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class _Losses(nn.Module):
    """The model's losses as a `forward`, so DDP sees the pass it synchronises."""

    def __init__(self, model: nn.Module, objective: str, free_bits: float = 0.0):
        super().__init__()
        self.model = model
        self.objective = objective
        self.free_bits = free_bits

    def forward(self, x, target, eps, label, beta):
        if self.free_bits:  # (a DeepVAE's: the classic VAE takes none)
            return self.model.losses(x, target, eps, label, self.objective, beta, free_bits=self.free_bits)
        return self.model.losses(x, target, eps, label, self.objective, beta)


class DDPStep:
    """The autograd step through DistributedDataParallel: gradients averaged over processes.

    Each process is given `scale = world / global_batch`, so the average DDP takes equals the
    gradient of the global batch's mean loss, whatever the shares' sizes.
    """

    def __init__(self, model: nn.Module, ctx: Context, objective: str = "elbo", free_bits: float = 0.0):
        if not ctx.active:
            raise RunError("DDPStep needs a process group (start with torchrun)")
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        losses = _Losses(model, objective, free_bits)
        self.engine = nn.parallel.DistributedDataParallel(losses, device_ids=ids)

    def __call__(self, x, target, eps, beta, scale, autocast, label=None):
        for p in self.engine.parameters():
            p.grad = None
        with autocast():
            loss, recon, kl = self.engine(x, target, eps, label, beta)
        loss, recon, kl = loss.float(), recon.float(), kl.float()
        (loss.sum() * scale).backward()
        return loss.detach().sum(), recon.detach().sum(), kl.detach().sum()
