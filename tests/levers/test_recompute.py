"""Less checkpoint recompute gives the same gradients, and the memory plan's arithmetic holds."""

import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.levers import (
    apply_training_levers,
    compile_decoder_layers,
    leave_layers_unchecked,
    memory_plan,
    plan_recompute,
)
from htmlgen_utils.levers.recompute import RecomputePlan
from htmlgen_utils.model import (
    load_for_training,
)
from tests.conftest import BASE
from tests.gradients import assert_same, loss_and_grads


def test_layers_left_unchecked_give_the_same_gradients_without_the_recompute(training_model, packed_batch):
    layers = training_model.get_base_model().model.layers
    runs = []
    for layer in layers:  # a sub-module's hook: it sees the recompute too (the layer's own hooks run outside it)
        layer.mlp.register_forward_pre_hook(lambda module, args, layer=layer: runs.append(layer))
    checkpointed = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    assert len(runs) == 2 * len(layers)  # each layer ran twice: forward, then its recompute in the backward
    runs.clear()
    leave_layers_unchecked(training_model, 1)
    unchecked = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    assert len(runs) == 2 * len(layers) - 1 and runs.count(layers[-1]) == 1  # the last layer: no recompute
    assert_same(checkpointed, unchecked)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes a forward saves for its backward (compiled layers' saved tensors included)."""

    def __init__(self):
        self.bytes = 0

        def pack(tensor):
            self.bytes += tensor.numel() * tensor.element_size()
            return tensor

        super().__init__(pack, lambda tensor: tensor)


def test_an_activation_budget_keeps_less_for_the_backward_and_gives_the_same_gradients(training_model, packed_batch):
    """Un-checkpointed compiled layers under the compiler's activation budget recompute their cheap parts in the
    backward: the numbers of the plain checkpointed path, with a fraction of what the compiler keeps by default."""
    checkpointed = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    leave_layers_unchecked(training_model, training_model.config.num_hidden_layers)
    kept = {}
    for budget in (0.2, None):
        torch._dynamo.reset()  # a graph compiles once per shape: forget the other budget's
        compile_decoder_layers(training_model, activation_budget=budget)
        saved = SavedBytes()
        assert_same(checkpointed, loss_and_grads(training_model, packed_batch, chunk_tokens=256, hooks=saved))
        kept[budget] = saved.bytes
    torch._dynamo.reset()
    assert kept[0.2] < 0.5 * kept[None], kept


def test_memory_plan_fits_layers_into_the_budget(training_model, monkeypatch):
    """The memory model's arithmetic on the 7B shape (32 layers of 4,096), with a 15 GiB GPU that already holds
    4 GiB (the 4-bit weights): each budget gets as many un-checkpointed layers as fit, and not one more (the
    estimate plus one more layer's activations would pass the budget); a larger budget fits strictly more."""
    from types import SimpleNamespace

    import htmlgen_utils.levers.recompute as recompute

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=15 * 2**30))
    monkeypatch.setattr(recompute, "_decoder_layers", lambda model: [None] * 32)  # 7B's 32 layers
    gpu = torch.device("cuda", 0)
    training_model.config.hidden_size = 4096  # per-token figures in 7B-sized vectors
    config = Config.from_preset("colab-t4", block_size=2048, max_example_tokens=2048)

    def plan(**changes):
        return plan_recompute(
            training_model, config.replace(**changes), gpu, checkpoints_offloaded=False, compiled=False
        )

    plans = {budget: plan(memory_budget_gib=budget) for budget in (8.0, 10.0, 12.0)}
    counts = [plans[budget].unchecked for budget in sorted(plans)]
    assert 0 < counts[0] < counts[1] < counts[2] < 32, counts
    for budget, fitted in plans.items():
        assert fitted.estimate_gib <= budget < fitted.estimate_gib + fitted.per_layer_gib + 0.01, (budget, fitted)
    tight, roomy = plans[8.0], plans[12.0]
    with pytest.warns(UserWarning, match="lower micro_batch_size"):  # 4 GiB + the step's own leave no room at all
        assert plan(memory_budget_gib=5.0).unchecked == 0
    assert plan(memory_budget_gib=0.0).unchecked == 0  # the low-memory mode checkpoints every layer
    assert plan(memory_budget_gib=13.0, block_size=4096, max_example_tokens=4096).unchecked <= roomy.unchecked
    assert plan_recompute(training_model, config, gpu, checkpoints_offloaded=True).unchecked == 0
    assert plan_recompute(training_model, config, torch.device("cpu"), checkpoints_offloaded=False).unchecked == 0
    assert "less matmul time a step" in str(tight) and tight.activation_budget is None  # eager layers
    # Compiled layers may also run under the compiler's activation budget: at 4,096 tokens in 13 GiB that removes
    # more recompute than whole un-checkpointed layers do, within the same budget.
    long = dict(memory_budget_gib=13.0, block_size=4096, max_example_tokens=4096)
    whole, budgeted = plan(**long), plan_recompute(training_model, config.replace(**long), gpu, False, compiled=True)
    assert budgeted.activation_budget is not None and budgeted.estimate_gib <= 13.0
    assert budgeted.recompute_saved > whole.recompute_saved > 0
    assert "activation budget" in str(budgeted)


def test_the_memory_plan_the_layers_follow_is_kept_for_the_estimate(tiny_config, monkeypatch):
    from htmlgen_utils import levers

    config = tiny_config.replace(model_id=BASE, gradient_checkpointing=True)
    model, _ = load_for_training(config)
    plan = RecomputePlan(layers=2, unchecked=1, budget_gib=13.0, estimate_gib=12.0, per_layer_gib=0.5)
    monkeypatch.setattr(levers, "plan_recompute", lambda *args, **kwargs: plan)
    assert apply_training_levers(model, config, torch.device("cpu")) == ["unchecked_layers"]
    assert memory_plan(model) is plan and plan.recompute_saved > 0
    assert sum(not layer.gradient_checkpointing for layer in model.get_base_model().model.layers) == 1
