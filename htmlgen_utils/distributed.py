"""Data parallelism: the same training loop on several GPUs (or CPU processes), through `torch.distributed`.

    torchrun --standalone --nproc_per_node 2 -m htmlgen_utils.train --preset ampere-bf16 --run-dir runs/ddp

`torchrun` starts one process a GPU and tells each its rank (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`). Each process
loads its own 4-bit base with the same LoRA adapters on its own GPU, trains on its own shard of the packed
blocks, and torch's `DistributedDataParallel` averages the LoRA gradients over the processes in every backward
pass, so every process takes the same optimiser step. One optimiser step therefore sees
`micro_batch_size x gradient_accumulation_steps x world_size` blocks: to keep a one-GPU run's recipe on N GPUs,
divide `gradient_accumulation_steps` by N. Rank 0 alone logs, validates and writes files.

Started without torchrun (a notebook, `python -m ...`), everything here is a no-op for a world of one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0  # 0 .. world_size - 1; rank 0 writes every file
    world_size: int = 1
    local_rank: int = 0  # which GPU of this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def launched_ranks() -> Ranks:
    """The ranks torchrun (or `accelerate launch`) put in the environment; a world of one without them."""
    return Ranks(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def start_process_group() -> Ranks:
    """Join the other training processes (NCCL between GPUs, gloo between CPU processes); each process takes
    the GPU of its local rank. Returns this process's ranks; a world of one starts nothing."""
    ranks = launched_ranks()
    if ranks.distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            if ranks.local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"torchrun started {ranks.world_size} processes on this machine but it has "
                    f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node "
                    f"{torch.cuda.device_count()} or fewer"
                )
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks


def end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_rank_first(ranks: Ranks):
    """Rank 0 runs the block first (e.g. preparing and packing the data); the others wait for it, then run the
    same block and find its results on disk."""
    if ranks.distributed and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.distributed and ranks.is_main:
        dist.barrier()


def data_parallel(model, ranks: Ranks, device: torch.device):
    """What each micro-batch runs through: the model itself in a world of one; over several processes, its
    loss (`loss.NextTokenLoss`) inside `DistributedDataParallel`, which all-reduces the gradients of the
    trainable (LoRA) parameters as the backward pass produces them, bucket by bucket, overlapping the
    communication with the rest of the backward. `loss.next_token_loss` takes either. The frozen 4-bit base is
    left out of DDP's start-up broadcast: every rank loaded the same checkpoint, and the adapters' initialisation
    is seeded (`prepare_for_training`)."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from .loss import NextTokenLoss

    loss_module = NextTokenLoss(model)
    frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [f"model.{name}" for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, frozen)
    return DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)


def describe_data_parallel(ranks: Ranks, config, accumulation: int, blocks: int) -> str:
    """One line for the start of a data-parallel run: processes, backend, the global batch, blocks a rank."""
    backend = dist.get_backend() if dist.is_initialized() else "not started"
    per_step = config.micro_batch_size * accumulation * ranks.world_size
    return (
        f"data-parallel: {ranks.world_size} processes ({backend}); a step = {config.micro_batch_size} block(s) x "
        f"{accumulation} micro-batches x {ranks.world_size} processes = {per_step} blocks; "
        f"{blocks // ranks.world_size} of the {blocks} training blocks a rank each epoch"
    )


def _collective_device() -> str:
    """Where tensors for a collective must live: on the GPU for NCCL, in CPU memory for gloo."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def mean_over_ranks(value: float | torch.Tensor, ranks: Ranks) -> float | torch.Tensor:
    """The mean of `value` over the processes (a float, or a tensor on this rank's device); itself for one.

    The loop divides each micro-batch's summed loss by the step's target tokens. DDP *averages* gradients over
    the ranks, so the divisor is the mean of the ranks' target counts: the step's gradient is then the mean over
    every target token of every rank, exactly one big batch's."""
    if not ranks.distributed:
        return value
    is_tensor = isinstance(value, torch.Tensor)
    total = value.detach().double() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    total = total.to(_collective_device())
    dist.all_reduce(total)
    total /= ranks.world_size
    return total.to(value.device, value.dtype) if is_tensor else float(total)


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True when any process says True (a stop request must end every rank's loop at the same step)."""
    if not ranks.distributed:
        return flag
    value = torch.tensor(int(flag), device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def gather_to_main(obj, ranks: Ranks) -> list | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere); `[obj]` for one process."""
    if not ranks.distributed:
        return [obj]
    gathered = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered
