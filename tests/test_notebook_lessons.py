"""The lines a notebook is named for are written in its own cells, and they compute what the package computes:
notebook 03's 4-bit load and LoRA config give `model.py`'s model; notebook 04's hand-written optimiser step leaves
the LoRA weights the package's loop leaves. The cells are run here as they are in the notebook."""

import nbformat
import pytest
import torch
from peft import get_peft_model_state_dict

from htmlgen_utils.config import REPO_DIR
from htmlgen_utils.model import load_for_training, quantization_config


def cells(name: str, containing: str = "", tag: str = "") -> list[str]:
    notebook = nbformat.read(str(REPO_DIR / "notebooks" / f"{name}.ipynb"), as_version=4)
    return [
        cell.source
        for cell in notebook.cells
        if cell.cell_type == "code" and containing in cell.source and (not tag or tag in cell.metadata.get("tags", []))
    ]


def source(name: str) -> str:
    return "\n".join(cells(name))


def test_notebook_03_builds_the_quantisation_and_lora_configs_in_its_cells():
    text = source("03_qlora_model_setup")
    for line in (
        "BitsAndBytesConfig(",
        'bnb_4bit_quant_type="nf4"',
        "bnb_4bit_use_double_quant=True",
        "LoraConfig(",
        "prepare_model_for_kbit_training(",
        "get_peft_model(",
    ):
        assert line in text, line


def test_notebook_04_writes_the_amp_step_in_its_cells():
    text = source("04_training_loop")
    for line in (
        "torch.autocast(",
        "scaler.scale(",
        ".backward()",
        "scaler.unscale_(",
        "clip_grad_norm_(",
        "scaler.step(",
        "scaler.update()",
        "zero_grad(",
        "scheduler.step()",
    ):
        assert line in text, line
    assert "show_source(train)" not in text  # the loop's plumbing is not the lesson


def test_notebook_03_cells_make_the_model_the_package_makes(tiny_config):
    """Cells 'The base model in 4 bits', 'LoRA on every linear layer' and 'Ready for training', run as written:
    the same quantisation settings, LoRA targets, trainable parameters and parameter dtypes as
    `load_for_training`."""
    namespace = {"config": tiny_config}
    for code in (
        cells("03_qlora_model_setup", "BitsAndBytesConfig(")
        + cells("03_qlora_model_setup", "LoraConfig(")
        + cells("03_qlora_model_setup", "get_peft_model(")
    ):
        exec(code, namespace)
    package_model, _ = load_for_training(tiny_config)
    assert namespace["bnb_config"].to_dict() == quantization_config(tiny_config).to_dict()
    ours_lora = package_model.peft_config["default"]
    theirs_lora = namespace["lora_config"]
    for field in ("target_modules", "r", "lora_alpha", "lora_dropout", "bias", "task_type"):
        assert getattr(theirs_lora, field) == getattr(ours_lora, field), field
    theirs = {name: (p.dtype, p.requires_grad, tuple(p.shape)) for name, p in namespace["model"].named_parameters()}
    ours = {name: (p.dtype, p.requires_grad, tuple(p.shape)) for name, p in package_model.named_parameters()}
    assert theirs == ours
    assert namespace["summary"].trainable == sum(p.numel() for p in package_model.parameters() if p.requires_grad)
    for name, parameter in package_model.named_parameters():  # the same initial adapters (seeded the same)
        assert torch.equal(parameter, dict(namespace["model"].named_parameters())[name]), name


@pytest.fixture
def lesson_run(tiny_config):
    from htmlgen_utils.stages import prepare_data

    # dropout and the scaler in play; no warm-up, since its first step has a learning rate of 0 (no weight moves)
    config = tiny_config.replace(lora_dropout=0.1, loss_scaling="on", warmup_steps=0)
    prepare_data(config)
    return config


def _after_lesson_step(config, lesson_cells: list[str]) -> dict:
    namespace = {"config": config}
    for code in cells("04_training_loop", "build_optimizer(") + lesson_cells:
        torch.manual_seed(0)  # the same dropout masks in both runs
        exec(code, namespace)
    return get_peft_model_state_dict(namespace["model"])


def _after_package_step(config) -> dict:
    from htmlgen_utils.checkpoints import TrainState
    from htmlgen_utils.loss import count_targets
    from htmlgen_utils.model import device_for
    from htmlgen_utils.stages import ensure_packed
    from htmlgen_utils.train import (
        accumulate_gradients,
        build_optimizer,
        build_scaler,
        build_scheduler,
        micro_batch_groups,
        optimizer_step,
        plan_steps,
        trainable_parameters,
    )

    device = device_for(config)
    model, tokenizer = load_for_training(config)
    packed = ensure_packed(config, tokenizer)
    accumulation, _, total_steps = plan_steps(len(packed["train"]), config)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, config, total_steps)
    scaler = build_scaler(config, device)
    micro_batches = next(micro_batch_groups(packed["train"], config, accumulation, TrainState()))
    model.train()
    torch.manual_seed(0)
    loss_sum = accumulate_gradients(model, micro_batches, scaler, count_targets(micro_batches), config, device)
    optimizer_step(trainable_parameters(model), optimizer, scheduler, scaler, config.max_grad_norm, loss_sum)
    return get_peft_model_state_dict(model)


def test_notebook_04_hand_written_step_equals_the_package_loop(lesson_run):
    """The cells tagged `lesson` (the micro-batches, then unscale -> clip -> step -> update -> zero -> schedule),
    run as written after the notebook's 'pieces' cell, leave exactly the LoRA weights of the package's
    `accumulate_gradients` + `optimizer_step` on the same blocks. Control: a lesson that drifted (its loop over
    the first micro-batch only, gradient accumulation lost) leaves other weights. (A change of the loss's scale
    alone would not show after one step: Adam's first update is the same for any scale of the gradients.)"""
    lesson = cells("04_training_loop", tag="lesson")
    assert len(lesson) == 2
    initial = get_peft_model_state_dict(load_for_training(lesson_run)[0])
    package = _after_package_step(lesson_run)
    assert not all(torch.equal(package[name], initial[name]) for name in package)  # the step moved the weights
    notebook = _after_lesson_step(lesson_run, lesson)
    assert package.keys() == notebook.keys()
    assert all(torch.equal(package[name], notebook[name]) for name in package)
    mutated = [lesson[0].replace("enumerate(micro_batches)", "enumerate(micro_batches[:1])"), lesson[1]]
    assert mutated[0] != lesson[0]
    drifted = _after_lesson_step(lesson_run, mutated)
    assert not all(torch.equal(package[name], drifted[name]) for name in package)
