"""Stage 4: the hand-written mixed-precision training loop (no Trainer, on purpose: it is the lesson).

Read `train()` top to bottom. One optimiser step is `gradient_accumulation_steps` micro-batches, each a forward
pass under autocast and a (scaled) backward pass of its *summed* loss divided by the step's target tokens
(`forward_backward`); then unscale -> clip -> step -> update the scaler -> zero the gradients -> advance the
schedule (`optimizer_step`). Logging, validation and checkpoints happen in `after_step`. Notebook 04 builds one
step by hand from the same pieces, then runs this loop.

    python -m htmlgen_utils.train --preset tiny --run-dir runs/tiny
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .checkpoints import (
    CHECKPOINT_DIR,
    TrainState,
    cadence,
    describe_cadence,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config
from .distributed import (
    SINGLE,
    Ranks,
    any_rank,
    data_parallel,
    describe_data_parallel,
    end_process_group,
    launched_ranks,
    main_rank_first,
    mean_over_ranks,
    start_process_group,
)
from .export import check_merge_possible, merge_to_16bit, push_adapter_to_hub, save_outputs
from .levers import apply_training_levers, stop_compiling
from .loss import count_targets, evaluate_blocks, next_token_loss
from .model import autocast_context, device_for, device_name, load_for_training, load_tokenizer, resolve_precision
from .model_card import write_model_card
from .packing import load_packed, make_dataloader
from .stages import ensure_packed
from .tracking import start_wandb

TRAINING_SUMMARY = "training_summary.json"  # written when a run has finished all its steps


# ---------------------------------------------------------------------------------------------- pieces
def build_optimizer(model, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW: optimiser states take a quarter of fp32 Adam's memory. Paged on CUDA so a
    memory spike pages states to CPU instead of crashing."""
    import bitsandbytes as bnb

    optimizer_class = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
    return optimizer_class(trainable_parameters(model), lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, total_steps: int):
    """Linear warm-up, then cosine decay to zero at the last step."""
    return get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps), total_steps)


def build_scaler(config: Config, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a T4): small gradients would underflow to zero in fp16 without it. bf16 and fp32
    have fp32's range and need none (`enabled=False` makes every scaler call a no-op)."""
    if config.loss_scaling == "auto":
        enabled = resolve_precision(config.precision) == "fp16"
    else:
        enabled = config.loss_scaling == "on"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def plan_steps(num_blocks: int, config: Config, world_size: int = 1) -> tuple[int, int, int]:
    """(accumulation, optimiser steps per epoch, total optimiser steps). The last micro-batches of an epoch that
    do not fill a whole accumulation group are left out of that epoch (the next epoch reshuffles them in). Over
    `world_size` processes each trains on its share of the blocks, and a step takes a group from each."""
    if num_blocks == 0:
        raise ValueError("The training split has no packed blocks: run notebook 02 / check the dataset")
    if num_blocks < world_size:
        raise ValueError(
            f"{num_blocks} training blocks cannot be shared by {world_size} processes: use fewer "
            f"processes (torchrun --nproc_per_node) or more data"
        )
    batches = -(-(num_blocks // world_size) // config.micro_batch_size)
    accumulation = min(config.gradient_accumulation_steps, batches)
    steps_per_epoch = batches // accumulation
    total = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.epochs
    return accumulation, steps_per_epoch, total


def micro_batch_groups(
    blocks, config: Config, accumulation: int, state: TrainState, ranks: Ranks = SINGLE
) -> Iterator[list[dict]]:
    """The micro-batches of each optimiser step in turn (this rank's), epoch after epoch, from where `state`
    stands in the data (a resumed run continues mid-epoch). The order of an epoch depends only on (seed, epoch)."""
    _, steps_per_epoch, _ = plan_steps(len(blocks), config, ranks.world_size)
    while True:
        loader = iter(
            make_dataloader(
                blocks,
                config.micro_batch_size,
                shuffle=True,
                seed=config.seed,
                epoch=state.epoch,
                skip_batches=state.batch_in_epoch,
                rank=ranks.rank,
                world_size=ranks.world_size,
            )
        )
        while state.batch_in_epoch < steps_per_epoch * accumulation:
            group = [next(loader) for _ in range(accumulation)]
            state.batch_in_epoch += accumulation
            yield group
        state.epoch += 1
        state.batch_in_epoch = 0


def forward_backward(
    model, batch: dict, scaler: torch.amp.GradScaler, step_targets: int, config: Config, device: torch.device
) -> torch.Tensor:
    """One micro-batch: forward under autocast, then backward of its summed loss / the whole step's target
    tokens, scaled by the GradScaler. Returns the summed loss (detached), for logging."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast_context(config.precision, device):  # fp16/bf16 matmuls; fp32 where autocast keeps it
        loss_sum = next_token_loss(model, batch, config.loss_chunk_tokens, reduction="sum")
    scaler.scale(loss_sum / step_targets).backward()  # gradients add up over the step's micro-batches
    return loss_sum.detach()


def accumulate_gradients(
    model,
    micro_batches: list[dict],
    scaler: torch.amp.GradScaler,
    step_targets: int,
    config: Config,
    device: torch.device,
) -> torch.Tensor:
    """The micro-batches of one optimiser step, one `forward_backward` each: their gradients add up. Returns the step's
    summed loss. In DDP the processes average their gradients once a step, in the last micro-batch's backward."""
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):  # gradient accumulation
        last = index == len(micro_batches) - 1  # DDP's all-reduce: in the last backward only
        with model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext():
            loss_sum += forward_backward(model, batch, scaler, step_targets, config, device)
    return loss_sum


def optimizer_step(
    parameters: list[torch.nn.Parameter],
    optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float,
    loss_sum: torch.Tensor,
) -> tuple[float, bool]:
    """Unscale -> clip -> step -> update -> zero -> schedule. Returns (gradient norm before clipping, whether the
    step was finite); a non-finite step changes no weight and does not advance the schedule."""
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_sum))  # one sync per step
    if finite or scaler.is_enabled():
        scaler.step(optimizer)  # with loss scaling, skips the update itself when gradients are inf/nan
    scaler.update()  # lowers the scale after an inf/nan step, raises it after a run of good ones
    optimizer.zero_grad(set_to_none=True)
    if finite:
        scheduler.step()
    return float(grad_norm), finite


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainingRun:
    """What `after_step` needs besides the state: the objects the loop built."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    config: Config
    device: torch.device
    run_dir: Path
    validation: Any  # the validation blocks
    total_steps: int
    epoch_micro_batches: int  # micro-batches an epoch trains on
    left_out: int  # micro-batches at an epoch's end that do not fill an accumulation group
    progress: Any
    tracker: Any  # a wandb run, or None
    ranks: Ranks = SINGLE  # rank 0 validates and writes; every rank trains
    compiled: bool = False  # the first step of the process compiles the layers: its cost is printed
    first_step: int = 0  # the step this process started from (a resumed run starts past 0)
    checkpoint_every: int = field(init=False)  # optimiser steps (`cadence`)
    eval_every: int = field(init=False)
    last_checkpoint: float = field(init=False)  # when the last checkpoint was written (or the run began)

    def __post_init__(self) -> None:
        self.checkpoint_every, self.eval_every = cadence(self.config, self.total_steps)
        self.last_checkpoint = time.monotonic()


def after_step(
    run: TrainingRun, state: TrainState, record: dict, stop_when: Callable[[TrainState], bool] | None
) -> bool:
    """Log the step, stop a run of non-finite steps, validate, checkpoint. Returns True when the loop should end
    here (`stop_when` said so, as an interruption would; a checkpoint is written first)."""
    config = run.config
    state.history.append(record)
    timed = [h["seconds"] for h in state.history if "seconds" in h][-2:]
    if run.compiled and run.ranks.is_main and len(timed) == 2 and state.step - run.first_step == 2:  # 2nd step here
        run.progress.write(
            f"compiling the decoder layers took ~{timed[0] - timed[1]:.0f} s, in the first step "
            f"({timed[0]:.1f} s; the second took {timed[1]:.1f} s)"
        )
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
    if run.tracker is not None:
        run.tracker.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
    if state.consecutive_nonfinite >= config.max_nan_steps:
        raise NonFiniteLossError(
            f"{state.consecutive_nonfinite} optimiser steps in a row had a non-finite loss or gradient "
            f"(step {state.step}); stopping without saving an adapter. On a T4 (fp16) lower learning_rate, "
            f"keep max_grad_norm, and make sure loss_scaling is on; check the data for empty examples."
        )
    epoch_done = state.batch_in_epoch >= run.epoch_micro_batches
    validate = state.step % run.eval_every == 0 or epoch_done or state.step == run.total_steps
    if validate and run.ranks.is_main:
        metrics = evaluate_blocks(run.model, run.validation, config, run.device, config.max_eval_batches)
        state.history.append({"step": state.step, "epoch": state.epoch, **metrics})
        run.progress.write(
            f"step {state.step}: eval_loss {metrics['eval_loss']:.4f}, "
            f"token accuracy {metrics['eval_token_accuracy']:.3f}"
        )
        if run.tracker is not None:
            run.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    if epoch_done and run.left_out and run.ranks.is_main:
        run.progress.write(
            f"epoch {state.epoch} done: its last {run.left_out} micro-batch(es) did not fill an "
            f"accumulation group and were left out (the next epoch reshuffles them in)"
        )
    stop = any_rank(stop_when is not None and stop_when(state), run.ranks)  # every rank stops at the same step
    overdue = bool(
        run.checkpoint_every
        and config.checkpoint_minutes
        and time.monotonic() - run.last_checkpoint >= 60 * config.checkpoint_minutes
    )
    due = run.checkpoint_every and (state.step % run.checkpoint_every == 0 or any_rank(overdue, run.ranks))
    if stop or (due and state.step < run.total_steps):
        save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, run.scaler, state, run.ranks)
        run.last_checkpoint = time.monotonic()
    return stop


def step_gradients(
    run: TrainingRun, trainee, micro_batches: list[dict], step_targets: int, state: TrainState
) -> torch.Tensor:
    """`accumulate_gradients`; if the compiled layers fail in a run's first step, once more on the plain layers."""
    try:
        return accumulate_gradients(trainee, micro_batches, run.scaler, step_targets, run.config, run.device)
    except Exception as error:
        if not (run.compiled and state.step == run.first_step):
            raise
        stop_compiling(run.model, error)
        run.compiled = False
        run.optimizer.zero_grad(set_to_none=True)
        return accumulate_gradients(trainee, micro_batches, run.scaler, step_targets, run.config, run.device)


# ---------------------------------------------------------------------------------------------- the loop
def train(
    model,
    tokenizer,
    packed,
    config: Config,
    run_dir: str | Path,
    resume: bool = True,
    stop_when: Callable[[TrainState], bool] | None = None,
) -> TrainState:
    """Train the LoRA adapters on `packed["train"]`, validating on `packed["validation"]`; resume from the run
    directory's last checkpoint when there is one. `stop_when(state)` returning True ends the call after that
    step and its checkpoint (e.g. a time budget); the same call later continues from there.

    Started by torchrun on several processes, each trains on its share of the blocks and the gradients are
    averaged over them (`distributed.py`); one process runs it all otherwise."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ranks = start_process_group()  # a world of one unless torchrun started this process
    device = device_for(config)
    accumulation, steps_per_epoch, total_steps = plan_steps(len(packed["train"]), config, ranks.world_size)
    levers = apply_training_levers(model, config, device, total_steps)  # speed and memory levers (levers/)
    parameters = trainable_parameters(model)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, config, total_steps)
    scaler = build_scaler(config, device)
    trainee = data_parallel(model, ranks, device)  # the model; its loss inside DDP on several processes

    torch.manual_seed(config.seed + ranks.rank)  # each process its own dropout masks
    state = TrainState()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, ranks)
        if ranks.is_main:
            print(f"Resuming from {checkpoint} (step {state.step}/{total_steps})")
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", disable=not ranks.is_main)
    epoch_micro_batches = steps_per_epoch * accumulation
    left_out = -(-(len(packed["train"]) // ranks.world_size) // config.micro_batch_size) - epoch_micro_batches
    run = TrainingRun(
        model,
        optimizer,
        scheduler,
        scaler,
        config,
        device,
        run_dir,
        packed["validation"],
        total_steps,
        epoch_micro_batches,
        left_out,
        progress,
        start_wandb(config, run_dir) if ranks.is_main else None,
        ranks,
        compiled="compile_training" in levers,
        first_step=state.step,
    )
    if ranks.is_main:
        print(
            f"plan: {total_steps} optimiser steps; {describe_cadence(config, total_steps)}"
            + (
                f"\n{describe_data_parallel(ranks, config, accumulation, len(packed['train']))}"
                if ranks.distributed
                else ""
            )
        )

    model.train()  # gradient checkpointing and LoRA dropout only act in train mode
    optimizer.zero_grad(set_to_none=True)
    groups = micro_batch_groups(packed["train"], config, accumulation, state, ranks)
    try:
        while state.step < total_steps:
            micro_batches = next(groups)
            started = time.perf_counter()
            # every target token of the step weighs the same (of every process: DDP averages over them)
            step_targets = mean_over_ranks(count_targets(micro_batches), ranks)
            loss_sum = mean_over_ranks(step_gradients(run, trainee, micro_batches, step_targets, state), ranks)
            grad_norm, finite = optimizer_step(parameters, optimizer, scheduler, scaler, config.max_grad_norm, loss_sum)
            state.step += 1
            state.skipped_steps += not finite
            state.consecutive_nonfinite = 0 if finite else state.consecutive_nonfinite + 1
            seconds = time.perf_counter() - started
            tokens = sum(batch["input_ids"].numel() for batch in micro_batches) * ranks.world_size
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": float(loss_sum) / max(step_targets, 1),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
                "skipped": not finite,
                "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
            }
            if after_step(run, state, record, stop_when):
                break
    finally:
        progress.close()
    if run.tracker is not None:
        run.tracker.finish()
    return state


# ---------------------------------------------------------------------------------------------- a whole run
def finished_training(config: Config) -> TrainState | None:
    """The final state of a run in `config.run_dir` that already trained as many steps as `config` plans (and
    saved its adapter), or None."""
    run_dir = Path(config.run_dir)
    summary = run_dir / TRAINING_SUMMARY
    if not summary.exists() or not (run_dir / "adapter" / "adapter_config.json").exists():
        return None
    state = TrainState(**json.loads(summary.read_text())["state"])
    _, _, total_steps = plan_steps(len(load_packed(run_dir)["train"]), config, launched_ranks().world_size)
    return state if state.step >= total_steps else None


def start_over(run_dir: str | Path) -> None:
    """Forget a previous run's training in `run_dir` (checkpoints, adapter, history), keeping its data."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_DIR, "adapter", "merged"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (TRAINING_SUMMARY, "history.json"):
        (run_dir / name).unlink(missing_ok=True)


def finish_run(model, tokenizer, config: Config, state: TrainState, run_dir: str | Path) -> Path:
    """Save the adapter, tokenizer, config and history; mark the run finished; merge and push when asked."""
    run_dir = Path(run_dir)
    adapter_dir = save_outputs(model, tokenizer, config, state, run_dir)
    summary = {"state": asdict(state), "world_size": launched_ranks().world_size, "device": device_name()}
    (run_dir / TRAINING_SUMMARY).write_text(json.dumps(summary) + "\n")
    write_model_card(run_dir, adapter_dir)
    if config.merge_after_training:
        merge_to_16bit(run_dir)
    if config.push_to_hub:
        push_adapter_to_hub(run_dir, config.push_to_hub)
    return adapter_dir


def run_training(config: Config, resume: bool = True, fresh_start: bool = False) -> TrainState:
    """What the command line runs (notebook 04 runs the same pieces in cells): packed data from the run dir ->
    trained adapter saved. A run that already finished is reported, not trained again, unless `fresh_start`.
    Under torchrun, rank 0 prepares the data and writes the results; every rank trains."""
    run_dir = Path(config.run_dir)
    ranks = start_process_group()
    if not fresh_start and (done := finished_training(config)) is not None:
        if ranks.is_main:
            print(
                f"The run in {run_dir} already finished its {done.step} steps; its adapter is in "
                f"{run_dir / 'adapter'}. To train again from scratch, pass fresh_start=True (command line: "
                f"--fresh-start)."
            )
        return done
    with main_rank_first(ranks):  # rank 0 packs the data; the others then read it
        if ranks.is_main and fresh_start:
            start_over(run_dir)
        if ranks.is_main and config.merge_after_training:
            check_merge_possible(config)  # before training, not after it
        packed = ensure_packed(config, load_tokenizer(config.model_id))  # the data's problems before the model's
    model, tokenizer = load_for_training(config)
    if ranks.is_main:
        config.save(run_dir)
    state = train(model, tokenizer, packed, config, run_dir, resume=resume and not fresh_start)
    if ranks.is_main:
        finish_run(model, tokenizer, config, state, run_dir)
    return state


def main(argv: list[str] | None = None) -> None:
    from .cli import config_from_args

    config, args = config_from_args(argv, "Train LoRA adapters with the hand-written QLoRA loop.", training=True)
    try:
        state = run_training(config, resume=not args.no_resume, fresh_start=args.fresh_start)
    finally:
        end_process_group()
    evals = [h for h in state.history if "eval_loss" in h]
    if launched_ranks().is_main:
        print(
            json.dumps(
                {
                    "steps": state.step,
                    "skipped_steps": state.skipped_steps,
                    "final_eval": evals[-1] if evals else None,
                    "run_dir": config.run_dir,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
