"""Stage 4: the hand-written mixed-precision training loop (no Trainer, on purpose: it is the lesson).

Read `train()` top to bottom: for each micro-batch, a forward pass under autocast, the loss divided by
the accumulation count, a (scaled) backward pass; after every `gradient_accumulation_steps`-th
micro-batch (never the first), unscale, clip, step, update the scaler, zero the gradients, advance the
schedule. The model's own loss shifts labels by one, so every position predicts the *next* token.

    python -m htmlgen_utils.train --preset tiny --run-dir runs/tiny
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import Config
from .model import (autocast_context, compile_decoder_layers, device_for, hf_token, load_for_training, packed_attention,
                    resolve_precision)
from .packing import IGNORE_INDEX, load_packed, make_dataloader

CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE = "training_state.pt"


# ---------------------------------------------------------------------------------------------- pieces
def build_optimizer(model, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW: optimiser states take a quarter of fp32 Adam's memory. Paged on CUDA so a
    memory spike pages states to CPU instead of crashing."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
    return optimizer_class(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def plan_steps(num_blocks: int, config: Config) -> tuple[int, int, int]:
    """(accumulation, optimiser steps per epoch, total optimiser steps). Leftover micro-batches that do not
    fill a whole accumulation group are skipped (they are reshuffled into the next epoch)."""
    batches = batches_per_epoch_for(num_blocks, config.micro_batch_size)
    accumulation = min(config.gradient_accumulation_steps, batches)
    steps_per_epoch = batches // accumulation
    total = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.epochs
    return accumulation, steps_per_epoch, total


def batches_per_epoch_for(num_blocks: int, micro_batch_size: int) -> int:
    if num_blocks == 0:
        raise ValueError("The training split has no packed blocks: run notebook 02 / check the dataset")
    return -(-num_blocks // micro_batch_size)


def use_grad_scaler(config: Config) -> bool:
    if config.loss_scaling == "auto":
        return resolve_precision(config.precision) == "fp16"
    return config.loss_scaling == "on"


def _decoder_outputs(model, batch: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(output head, final hidden states of positions 0..n-2, the tokens they predict at 1..n-1), flattened.

    Runs the decoder without its head; `use_cache=False` matters: with a KV cache transformers ignores the
    restarting position ids and lets packed examples attend to each other."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)  # the one shift: position t predicts token t + 1
    return causal_lm.get_output_embeddings(), hidden, targets


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def next_token_loss(model, batch: dict, chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of every labelled position against the next token: the model's own causal-LM loss.

    `chunk_tokens=0` asks the model for it (the block's whole fp32 [tokens, 32000] logits exist at once:
    0.25 GiB at 2048 tokens, 4 GiB at 32768, plus their gradient). Otherwise the head and the loss run
    `chunk_tokens` positions at a time under checkpointing, so only one chunk's logits ever exist; the
    backward pass recomputes each chunk's logits (one extra head matmul, ~2% of a 7B step's FLOPs)."""
    if chunk_tokens <= 0:
        return model(**batch, use_cache=False).loss
    head, hidden, targets = _decoder_outputs(model, batch)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, head, hidden[piece], targets[piece], use_reentrant=False)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


@functools.cache
def _copy_stream() -> torch.cuda.Stream:
    return torch.cuda.Stream()


class CheckpointsOnCPU(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, residual-stream tensors saved for backward (the layer checkpoints: one
    [batch, block, hidden] tensor per layer) wait in pinned CPU memory instead of on the GPU.

    With gradient checkpointing those checkpoints are most of what grows with the block: 32 x 2048 x 4096 fp16
    = 0.5 GiB at 2048 tokens, 8 GiB at 32768. Only tensors on `device_type` whose last dimension is the hidden
    size move; masks, rotary tables and ids stay (they are shared by every layer). On CUDA the copies out run
    on a side stream, beside the layers' kernels instead of between them; they come back in backward, layer
    by layer, on the compute stream (which needs them at once).
    """

    def __init__(self, hidden_size: int, device_type: str = "cuda"):
        self.offloaded = 0
        side = _copy_stream() if device_type == "cuda" else None

        def pack(tensor: torch.Tensor):
            if (tensor.device.type != device_type or tensor.dim() < 2 or tensor.shape[-1] != hidden_size
                    or not tensor.is_floating_point() or isinstance(tensor, torch.nn.Parameter)):
                return tensor
            parked = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=side is not None)
            if side is None:
                parked.copy_(tensor)
            else:
                side.wait_stream(torch.cuda.current_stream())  # the tensor is written
                with torch.cuda.stream(side):
                    parked.copy_(tensor, non_blocking=True)
                tensor.record_stream(side)  # its memory is not reused before the copy has read it
            self.offloaded += 1
            return tensor.device, parked

        def unpack(packed):
            if isinstance(packed, tuple):
                device, parked = packed
                if side is not None:
                    torch.cuda.current_stream().wait_stream(side)  # the copy out has finished
                return parked.to(device, non_blocking=True)
            return packed

        super().__init__(pack, unpack)


def activation_context(model, config: Config, device: torch.device):
    """`CheckpointsOnCPU` on a GPU when `offload_activations` is `on`, or `auto` with blocks of 16384 tokens
    or more (where the checkpoints outgrow everything else); otherwise nothing."""
    if config.long_block_lever("offload_activations") and device.type == "cuda":
        return CheckpointsOnCPU(model.config.hidden_size)
    return nullcontext()


@torch.no_grad()
def evaluate_blocks(model, blocks, config: Config, device: torch.device, max_batches: int | None = None) -> dict:
    """Token-weighted mean loss and next-token accuracy over packed blocks (teacher forcing).

    Runs eagerly even when training compiled the layers: a few validation batches would not repay a second
    compilation (for no-grad, eval-mode calls)."""
    per_example = config.long_block_lever("packed_attention")
    with packed_attention(model, per_example), torch.compiler.set_stance("force_eager"):
        return _evaluate_blocks(model, blocks, config, device, max_batches)


def _evaluate_blocks(model, blocks, config: Config, device: torch.device, max_batches: int | None) -> dict:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = torch.zeros((), device=device, dtype=torch.long)
    for index, batch in enumerate(make_dataloader(blocks, config.micro_batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(config.precision, device):
            head, hidden, targets = _decoder_outputs(model, batch)
            chunk = config.loss_chunk_tokens or targets.numel()
            for start in range(0, targets.numel(), chunk):  # one chunk's fp32 logits at a time
                piece_targets = targets[start:start + chunk]
                logits = head(hidden[start:start + chunk]).float()
                mask = piece_targets != IGNORE_INDEX
                loss_sum += torch.nn.functional.cross_entropy(
                    logits, piece_targets, ignore_index=IGNORE_INDEX, reduction="sum").double()
                correct += (logits.argmax(-1)[mask] == piece_targets[mask]).sum()
                count += mask.sum()
    if was_training:
        model.train()
    n = max(1, int(count))
    return {"eval_loss": float(loss_sum) / n, "eval_token_accuracy": float(correct) / n, "eval_tokens": int(count)}


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a restarted run continues the same trajectory."""

    step: int = 0  # optimiser steps done (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, scaler, state: TrainState) -> Path:
    """Adapter + optimiser + schedule + scaler + RNG + data position, written to a temporary folder and
    renamed into place, so an interruption never leaves a half-written checkpoint behind."""
    root = run_dir / CHECKPOINT_DIR
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(), "state": asdict(state)}, tmp / TRAINING_STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in root.glob("step-*"):  # keep only the newest checkpoint
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINT_DIR).glob("step-*"))
    found = [p for p in found if (p / TRAINING_STATE).exists()]
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    saved = torch.load(path / TRAINING_STATE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    return TrainState(**saved["state"])


# ---------------------------------------------------------------------------------------------- logging
def wandb_mode(config: Config) -> str:
    """`auto`: online when a key is available (env or Colab secret), otherwise disabled."""
    if config.wandb_mode != "auto":
        return config.wandb_mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from google.colab import userdata  # type: ignore

        if userdata.get("WANDB_API_KEY"):
            os.environ["WANDB_API_KEY"] = userdata.get("WANDB_API_KEY")
            return "online"
    except Exception:
        pass
    return "disabled"


def start_wandb(config: Config, run_dir: Path):
    mode = wandb_mode(config)
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project=config.wandb_project, config=config.to_dict(), dir=str(run_dir), mode=mode,
                      name=run_dir.name, resume="allow")


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- the loop
def train(model, tokenizer, packed, config: Config, run_dir: str | Path, resume: bool = True,
          stop_after_steps: int | None = None,
          corrupt_loss: Callable[[int], bool] | None = None) -> TrainState:
    """Train the LoRA adapters on `packed["train"]`, validating on `packed["validation"]`.

    `stop_after_steps` ends the call early (as an interruption would) after that many optimiser steps and
    their checkpoint; `corrupt_loss(micro_step)` returning True turns that micro-batch's loss into NaN
    (a test hook for the non-finite guard).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = device_for(config)
    train_blocks, val_blocks = packed["train"], packed["validation"]
    accumulation, steps_per_epoch, total_steps = plan_steps(len(train_blocks), config)

    optimizer = build_optimizer(model, config, device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_grad_scaler(config))
    trainable = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(config.seed)
    state = TrainState()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
        print(f"Resuming from {checkpoint} (step {state.step}/{total_steps})")
    wandb_run = start_wandb(config, run_dir)

    model.train()  # gradient checkpointing and LoRA dropout only act in train mode
    if config.compile_training:
        compile_decoder_layers(model)
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step")
    tokens_in_step, step_started = 0, time.perf_counter()
    running_loss = torch.zeros((), device=device)
    micro_step = 0
    while state.step < total_steps:
        loader = make_dataloader(train_blocks, config.micro_batch_size, shuffle=True, seed=config.seed,
                                 epoch=state.epoch, skip_batches=state.batch_in_epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # the same attention for the forward and for the backward's checkpoint recompute
            with packed_attention(model, config.long_block_lever("packed_attention")):
                with autocast_context(config.precision, device), activation_context(model, config, device):
                    loss = next_token_loss(model, batch, config.loss_chunk_tokens) / accumulation
                if corrupt_loss is not None and corrupt_loss(micro_step):
                    loss = loss * float("nan")
                scaler.scale(loss).backward()
            running_loss += loss.detach()
            tokens_in_step += batch["input_ids"].numel()
            state.batch_in_epoch += 1
            micro_step += 1
            if state.batch_in_epoch % accumulation != 0:
                continue  # keep accumulating: the optimiser steps after every `accumulation`-th micro-batch

            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(running_loss))  # one sync per step
            if finite or scaler.is_enabled():
                scaler.step(optimizer)  # with loss scaling, skips the update itself when gradients are inf/nan
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if finite:
                scheduler.step()
                state.consecutive_nonfinite = 0
            else:
                state.skipped_steps += 1
                state.consecutive_nonfinite += 1
            state.step += 1

            elapsed = time.perf_counter() - step_started
            record = {"step": state.step, "epoch": state.epoch, "loss": float(running_loss),
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": tokens_in_step / max(elapsed, 1e-9), "seconds": elapsed,
                      "skipped": not finite, "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0}
            state.history.append(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            if wandb_run is not None:
                wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
            running_loss = torch.zeros((), device=device)
            tokens_in_step = 0

            if state.consecutive_nonfinite >= config.max_nan_steps:
                progress.close()
                raise NonFiniteLossError(
                    f"{state.consecutive_nonfinite} optimiser steps in a row had a non-finite loss or gradient "
                    f"(step {state.step}); stopping without saving an adapter. On a T4 (fp16) lower learning_rate, "
                    f"keep max_grad_norm, and make sure loss_scaling is on; check the data for empty examples.")

            epoch_done = state.batch_in_epoch >= steps_per_epoch * accumulation
            if state.step % config.eval_every == 0 or epoch_done or state.step == total_steps:
                metrics = evaluate_blocks(model, val_blocks, config, device, config.max_eval_batches)
                state.history.append({"step": state.step, "epoch": state.epoch, **metrics})
                progress.write(f"step {state.step}: eval_loss {metrics['eval_loss']:.4f}, "
                               f"token accuracy {metrics['eval_token_accuracy']:.3f}")
                if wandb_run is not None:
                    wandb_run.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
            if epoch_done:
                state.epoch += 1
                state.batch_in_epoch = 0
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < total_steps:
                save_checkpoint(run_dir, model, optimizer, scheduler, scaler, state)
            if stop_after_steps is not None and state.step >= stop_after_steps:
                save_checkpoint(run_dir, model, optimizer, scheduler, scaler, state)
                progress.close()
                return state
            step_started = time.perf_counter()
            if state.step >= total_steps or epoch_done:
                break
        else:  # the loader ran out (partial last batch): next epoch
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    if wandb_run is not None:
        wandb_run.finish()
    return state


# ---------------------------------------------------------------------------------------------- outputs
def save_outputs(model, tokenizer, config: Config, state: TrainState, run_dir: str | Path) -> Path:
    """The adapter and the tokenizer in one folder, plus the exact config and the history, in the run dir."""
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    config.save(run_dir)
    config.save(adapter_dir)
    (run_dir / "history.json").write_text(json.dumps(state.history, indent=1) + "\n")
    return adapter_dir


def merge_to_16bit(run_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Merge the adapter into a *16-bit* copy of the base (merging into 4-bit weights would be lossy) and save it
    in `run_dir/merged`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    config = Config.load(run_dir)
    base = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=dtype, token=hf_token())
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    out = run_dir / "merged"
    merged.save_pretrained(out)
    from .model import load_tokenizer

    load_tokenizer(str(run_dir / "adapter")).save_pretrained(out)
    return out


def push_adapter_to_hub(run_dir: str | Path, repo_id: str) -> str:
    """Upload the adapter folder; needs a write token in HF_TOKEN (or the Colab secret)."""
    from huggingface_hub import HfApi

    token = hf_token()
    if not token:
        raise RuntimeError("push_to_hub needs a Hugging Face write token: set HF_TOKEN (or the Colab secret HF_TOKEN)")
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(folder_path=str(Path(run_dir) / "adapter"), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"


def run_training(config: Config, resume: bool = True) -> TrainState:
    """What notebook 04 and the command line run: packed data from the run dir -> trained adapter saved."""
    run_dir = Path(config.run_dir)
    packed = load_packed(run_dir)
    config.save(run_dir)
    model, tokenizer = load_for_training(config)
    state = train(model, tokenizer, packed, config, run_dir, resume=resume)
    save_outputs(model, tokenizer, config, state, run_dir)
    if config.merge_after_training:
        merge_to_16bit(run_dir)
    if config.push_to_hub:
        push_adapter_to_hub(run_dir, config.push_to_hub)
    return state


def config_from_args(argv: list[str] | None = None, description: str = "") -> tuple[Config, argparse.Namespace]:
    """The shared command line: --preset, --dataset, --run-dir, -p KEY VALUE (any Config field)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default=None, help="colab-t4 | ampere-bf16 | tiny (default: tiny without a GPU)")
    parser.add_argument("--dataset", default=None, help="'bundled', a hub id, or a local .json/.jsonl/.csv file")
    parser.add_argument("--run-dir", default=None, help="where every artifact goes")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override any Config field, e.g. -p max_steps 20")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
    args = parser.parse_args(argv)
    preset = args.preset or default_preset()
    overrides = {key: Config.parse_value(value) for key, value in args.p}
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    return Config.from_preset(preset, **overrides), args


def default_preset() -> str:
    """The preset that fits this machine: tiny on CPU, colab-t4 on GPUs without bf16, ampere-bf16 otherwise."""
    if not torch.cuda.is_available():
        return "tiny"
    return "ampere-bf16" if torch.cuda.is_bf16_supported() else "colab-t4"


def main(argv: list[str] | None = None) -> None:
    config, args = config_from_args(argv, "Train LoRA adapters with the hand-written QLoRA loop.")
    from .stages import prepare_data

    if not (Path(config.run_dir) / "packed" / "dataset_dict.json").exists():
        prepare_data(config)
    state = run_training(config, resume=not args.no_resume)
    evals = [h for h in state.history if "eval_loss" in h]
    print(json.dumps({"steps": state.step, "skipped_steps": state.skipped_steps,
                      "final_eval": evals[-1] if evals else None, "run_dir": config.run_dir}, indent=2))


if __name__ == "__main__":
    main()
