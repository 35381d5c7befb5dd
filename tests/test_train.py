import itertools
import re
import time
import types

import datasets
import pytest
import torch

from htmlgen_utils import train as train_module
from htmlgen_utils.export import save_outputs
from htmlgen_utils.loss import count_targets, evaluate_blocks, next_token_loss
from htmlgen_utils.model import load_for_training
from htmlgen_utils.packing import IGNORE_INDEX, make_dataloader, pack_splits
from htmlgen_utils.train import NonFiniteLossError, build_scaler, forward_backward, latest_checkpoint, plan_steps, train


@pytest.fixture(scope="module")
def small_splits(bundled_rows):
    def split(a, b):
        return datasets.Dataset.from_list([{"label": r["label"], "html": r["html"]} for r in bundled_rows[a:b]])

    return datasets.DatasetDict({"train": split(0, 120), "validation": split(120, 136), "test": split(136, 150)})


def _setup(config, splits):
    model, tokenizer = load_for_training(config)
    packed, _ = pack_splits(splits, tokenizer, config)
    return model, tokenizer, packed


def adapter_weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_training_lowers_validation_loss_and_saves_outputs(tiny_config, small_splits):
    config = tiny_config.replace(max_steps=16, eval_every=16, learning_rate=2e-3)
    model, tokenizer, packed = _setup(config, small_splits)
    before = evaluate_blocks(model, packed["validation"], config, torch.device("cpu"))
    state = train(model, tokenizer, packed, config, config.run_dir, resume=False)
    after = [h for h in state.history if "eval_loss" in h][-1]
    assert after["eval_loss"] < before["eval_loss"] - 0.3, (before, after)
    assert state.step == 16 and state.skipped_steps == 0
    steps = [h for h in state.history if "loss" in h]
    assert steps[0]["lr"] < steps[3]["lr"]  # warm-up
    assert steps[-1]["lr"] < steps[6]["lr"]  # cosine decay
    adapter = save_outputs(model, tokenizer, config, state, config.run_dir)
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "tokenizer_config.json").exists()
    assert (adapter.parent / "htmlgen_config.json").exists() and (adapter.parent / "history.json").exists()


def test_optimiser_steps_after_every_fourth_micro_batch(tiny_config, small_splits, monkeypatch):
    config = tiny_config.replace(max_steps=5, checkpoint_every=0)
    model, tokenizer, packed = _setup(config, small_splits)
    events = []
    model.get_base_model().model.register_forward_pre_hook(lambda module, args: events.append("micro"))  # the decoder
    real_build = train_module.build_optimizer

    def counting_optimizer(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: events.append("step"))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", counting_optimizer)
    monkeypatch.setattr(train_module, "evaluate_blocks", lambda *a, **k: {"eval_loss": 0.0, "eval_token_accuracy": 0.0})
    train(model, tokenizer, packed, config, config.run_dir, resume=False)
    assert events.count("step") == 5 and events.count("micro") == 20
    assert events[:5] == ["micro"] * 4 + ["step"]  # never a step on the first micro-batch
    assert all(events[i] == "step" for i in range(4, 25, 5))


def test_accumulated_micro_batches_give_the_one_big_batch_gradient(tiny_config, small_splits):
    """Four micro-batches, each backward of its summed loss / the step's target tokens, add up to the gradient of
    one batch of all four blocks (fp32, dropout off). Their target counts differ a lot, so a mean of
    per-micro-batch means (the old way) would not match."""
    config = tiny_config.replace(lora_dropout=0.0)
    model, _, packed = _setup(config, small_splits)
    micro_batches = list(make_dataloader(packed["train"], 1))[:4]
    micro_batches[1]["labels"][:, 200:] = IGNORE_INDEX  # far fewer targets in this one
    scaler = build_scaler(config, torch.device("cpu"))
    assert not scaler.is_enabled()

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    model.train()
    step_targets = count_targets(micro_batches)
    for batch in micro_batches:
        forward_backward(model, batch, scaler, step_targets, config, torch.device("cpu"))
    accumulated = grads()
    big = {k: torch.cat([b[k] for b in micro_batches]) for k in micro_batches[0]}
    next_token_loss(model, big, config.loss_chunk_tokens).backward()
    one_batch = grads()
    for batch in micro_batches:  # the mean of means
        (next_token_loss(model, batch, config.loss_chunk_tokens) / len(micro_batches)).backward()
    mean_of_means = grads()

    def worst(a, b):
        return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)

    assert worst(accumulated, one_batch) < 1e-4
    assert worst(mean_of_means, one_batch) > 1e-2


def _resume_setup(tiny_config, small_splits, monkeypatch):
    """A 6-step run with LoRA dropout and loss scaling whose second step overflows (a NaN in one chosen block), so
    the RNG, the optimiser's moments, the schedule and the scaler's backed-off scale all matter after step 3."""
    config = tiny_config.replace(
        max_steps=6, eval_every=3, checkpoint_every=0, lora_dropout=0.1, loss_scaling="on", warmup_steps=4
    )
    _, _, packed = _setup(config, small_splits)
    from htmlgen_utils.checkpoints import TrainState

    groups = train_module.micro_batch_groups(packed["train"], config, 4, TrainState())
    next(groups)
    poisoned = next(groups)[0]["input_ids"]  # the first micro-batch of step 2

    def loss_with_one_overflow(model, batch, *args, **kwargs):
        loss = next_token_loss(model, batch, *args, **kwargs)
        return loss * float("inf") if torch.equal(batch["input_ids"].cpu(), poisoned) else loss

    monkeypatch.setattr(train_module, "next_token_loss", loss_with_one_overflow)
    return config


def _interrupted_then_resumed(config, small_splits, run_dir):
    first_model, tokenizer, packed = _setup(config, small_splits)
    interrupted = train(first_model, tokenizer, packed, config, run_dir, stop_when=lambda state: state.step >= 3)
    assert interrupted.step == 3 and latest_checkpoint(run_dir) is not None
    del first_model
    torch.manual_seed(12345)  # a fresh process would start from another RNG state: the checkpoint must restore it
    second_model, _, _ = _setup(config, small_splits)
    return second_model, train(second_model, tokenizer, packed, config, run_dir, resume=True)


def _trajectory(state) -> list[float]:
    """Every step's loss, learning rate and loss scale, and every validation loss, in order."""
    keys = ("loss", "lr", "loss_scale", "eval_loss")
    return [float(h[k]) for h in state.history for k in keys if k in h]


@pytest.fixture
def uninterrupted(tiny_config, small_splits, monkeypatch, tmp_path):
    config = _resume_setup(tiny_config, small_splits, monkeypatch)
    model, tokenizer, packed = _setup(config, small_splits)
    state = train(model, tokenizer, packed, config, tmp_path / "full", resume=False)
    assert state.skipped_steps == 1 and [h["loss_scale"] for h in state.history if "loss" in h][1] == 2.0**15
    return config, model, state


def test_resumed_run_matches_uninterrupted_run(uninterrupted, small_splits, tmp_path):
    config, full_model, full = uninterrupted
    resumed_model, resumed = _interrupted_then_resumed(config, small_splits, tmp_path / "resumed")
    assert resumed.step == 6 and resumed.skipped_steps == 1
    assert _trajectory(resumed) == pytest.approx(_trajectory(full), rel=1e-5)
    full_weights, resumed_weights = adapter_weights(full_model), adapter_weights(resumed_model)
    for name, weight in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("restore", ["rng", "optimizer", "scheduler", "scaler"])
def test_resume_test_notices_each_missing_restore(uninterrupted, small_splits, tmp_path, monkeypatch, restore):
    """The comparison above fails when any one part of the checkpoint is not restored."""
    import bitsandbytes as bnb

    from htmlgen_utils import checkpoints

    skip = lambda *args, **kwargs: None  # noqa: E731
    target = {
        "rng": (checkpoints, "_set_rng_state"),
        "optimizer": (bnb.optim.AdamW8bit, "load_state_dict"),
        "scheduler": (torch.optim.lr_scheduler.LambdaLR, "load_state_dict"),
        "scaler": (torch.amp.GradScaler, "load_state_dict"),
    }[restore]
    monkeypatch.setattr(*target, skip)
    config, full_model, full = uninterrupted
    resumed_model, resumed = _interrupted_then_resumed(config, small_splits, tmp_path / "resumed")
    same_trajectory = _trajectory(resumed) == pytest.approx(_trajectory(full), rel=1e-5)
    same_weights = all(
        torch.allclose(weight, adapter_weights(resumed_model)[name], rtol=1e-5, atol=1e-6)
        for name, weight in adapter_weights(full_model).items()
    )
    assert not (same_trajectory and same_weights)


def test_nonfinite_loss_is_skipped_then_stops_the_run(tiny_config, small_splits, tmp_path, monkeypatch):
    config = tiny_config.replace(max_steps=4, loss_scaling="on", checkpoint_every=0, max_nan_steps=3)
    model, tokenizer, packed = _setup(config, small_splits)
    calls, corrupt = [], {"from": 5, "to": 5}  # micro-batch 5 is one of the second step's

    def corrupted_loss(*args, **kwargs):
        calls.append(1)
        loss = next_token_loss(*args, **kwargs)
        return loss * float("nan") if corrupt["from"] <= len(calls) - 1 <= corrupt["to"] else loss

    monkeypatch.setattr(train_module, "next_token_loss", corrupted_loss)
    state = train(model, tokenizer, packed, config, tmp_path / "once", resume=False)
    steps = [h for h in state.history if "loss" in h]
    assert state.skipped_steps == 1 and [h["skipped"] for h in steps] == [False, True, False, False]
    assert steps[1]["loss_scale"] < steps[0]["loss_scale"]  # the scaler backed off
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)

    calls.clear()
    corrupt.update({"from": 4, "to": 10**9})
    model, tokenizer, packed = _setup(config.replace(max_steps=10), small_splits)
    with pytest.raises(NonFiniteLossError, match="3 optimiser steps in a row"):
        train(model, tokenizer, packed, config.replace(max_steps=10), tmp_path / "always", resume=False)
    assert not (tmp_path / "always" / "adapter").exists()


def test_plan_steps():
    from htmlgen_utils.config import Config

    config = Config.from_preset("tiny", micro_batch_size=2, gradient_accumulation_steps=4, max_steps=-1, epochs=2)
    assert plan_steps(100, config) == (4, 12, 24)  # 50 micro-batches an epoch -> 12 whole groups of 4
    assert plan_steps(3, config.replace(max_steps=7)) == (2, 1, 7)  # fewer batches than the accumulation


def test_a_compiled_run_says_what_compiling_cost(tiny_config, small_splits, monkeypatch, capsys):
    """The second step's line puts the first step's extra time down to compiling (here the compiler is replaced by a
    sleep in the first forward, so the test is quick and the cost known)."""
    import time

    import htmlgen_utils.levers as levers

    def slow_first_call(model, **_):
        def compile_once(module, args):
            time.sleep(1.5)
            handle.remove()

        handle = model.get_base_model().model.register_forward_pre_hook(compile_once)

    monkeypatch.setattr(levers, "compile_decoder_layers", slow_first_call)
    config = tiny_config.replace(
        compile_training=True, max_steps=10, gradient_accumulation_steps=1, eval_every=100, checkpoint_every=0
    )
    model, tokenizer, packed = _setup(config, small_splits)
    train(model, tokenizer, packed, config, config.run_dir, resume=False)
    printed = capsys.readouterr()
    said = [line for line in (printed.err + printed.out).splitlines() if "compiling the decoder layers took" in line]
    assert len(said) == 1 and re.search(r"took ~(1|2) s, in the first step \(\d+\.\d s; the second", said[0]), said


def test_checkpoints_come_by_the_plan_and_by_the_clock(tiny_config, small_splits, monkeypatch):
    """`auto` writes a checkpoint every fifth of the run (4 before the end of a 5-step run); with the steps' rule
    off (a cadence longer than the run), the minutes' rule still writes one once the time has passed."""
    saved = []
    monkeypatch.setattr(
        train_module,
        "save_checkpoint",
        lambda run_dir, model, optimizer, scheduler, scaler, state, ranks: saved.append(state.step),
    )
    monkeypatch.setattr(train_module, "evaluate_blocks", lambda *a, **k: {"eval_loss": 0.0, "eval_token_accuracy": 0.0})
    config = tiny_config.replace(max_steps=5, checkpoint_every=-1, eval_every=-1, gradient_accumulation_steps=1)
    model, tokenizer, packed = _setup(config, small_splits)
    train(model, tokenizer, packed, config, config.run_dir, resume=False)
    assert saved == [1, 2, 3, 4]
    saved.clear()
    clock = itertools.count(0, 250)  # the loop's clock: each reading 250 s after the last
    monkeypatch.setattr(
        train_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter)
    )
    config = config.replace(checkpoint_every=100, checkpoint_minutes=10)
    train(model, tokenizer, packed, config, config.run_dir, resume=False)
    assert saved == [3]  # 750 s after the start: the first step past 10 minutes
