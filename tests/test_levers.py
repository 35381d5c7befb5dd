"""The memory and speed levers keep the plain path's numbers: same loss, same gradients, same pages."""
from contextlib import nullcontext

import datasets
import pytest
import torch

from htmlgen_utils.config import TINY_BASE_DIR, Config
from htmlgen_utils.generation import clean_page, generate_pages, stream_page
from htmlgen_utils.levers import (COMPILE_MIN_STEPS, PACKED_ATTENTION, CheckpointsOnCPU, apply_training_levers,
                                  compile_decoder_layers, example_spans, leave_layers_unchecked, packed_attention,
                                  memory_plan, plan_recompute)
from htmlgen_utils.levers.recompute import RecomputePlan
from htmlgen_utils.levers.lookahead import LOOKAHEAD_TOKENS, PromptLookup
from htmlgen_utils.loss import next_token_loss
from htmlgen_utils.model import keep_frozen_embeddings_in, load_base_model, load_for_training, load_tokenizer
from htmlgen_utils.packing import build_prompt, make_dataloader, pack_splits
from tests.models import adapted_tiny_model


BASE = str(TINY_BASE_DIR)  # trained weights: its attention matters, so a leak or a wrong mask would show


@pytest.fixture(scope="module")
def packed_batch(bundled_rows):
    """Two packed blocks of several examples each (pages cut to 300 tokens; position ids restart per example)."""
    config = Config.from_preset("tiny", block_size=1024, max_example_tokens=300, run_dir="unused")
    rows = [{"label": r["label"], "html": r["html"]} for r in bundled_rows[:40]]
    splits = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name in ("train", "validation", "test")})
    packed, _ = pack_splits(splits, load_tokenizer(BASE), config)
    batch = next(iter(make_dataloader(packed["train"], 2)))
    assert all(len(spans) >= 4 for spans in example_spans(batch["position_ids"]))  # 3+ examples, then padding
    return batch


@pytest.fixture
def training_model(tiny_config):
    """The 4-bit tiny Llama with LoRA, checkpointing on and dropout off, so two passes are comparable."""
    config = tiny_config.replace(model_id=BASE, gradient_checkpointing=True, lora_dropout=0.0)
    model, _ = load_for_training(config)
    model.train()
    return model


def loss_and_grads(model, batch, chunk_tokens=0, attention_per_example=False, hooks=None):
    model.zero_grad(set_to_none=True)
    with packed_attention(model, attention_per_example):
        with hooks if hooks is not None else nullcontext():
            loss = next_token_loss(model, batch, chunk_tokens)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(reference, other, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert torch.allclose(loss_a, loss_b, atol=atol), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    scale = max(g.abs().max() for g in grads_a.values())
    assert scale > 0
    worst = max((grads_a[k] - grads_b[k]).abs().max() for k in grads_a)
    assert worst <= atol * max(1.0, float(scale)), worst


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the reference, on purpose
def test_flex_attention_matches_the_block_mask_and_skips_the_empty_tiles(training_model, packed_batch, monkeypatch):
    """Block-sparse FlexAttention (its eager reference here: CPU has no FlexAttention backward, so the gradients
    are checked on the GPU, tests/test_gpu.py) gives the loss of SDPA with the block mask through the real 4-bit
    + LoRA path; its `BlockMask` leaves out the tiles between examples; without gradients (evaluation,
    generation) the model is back on SDPA's mask."""
    import torch.nn.attention.flex_attention as flex

    from htmlgen_utils.levers import FLEX_ATTENTION, use_flex_attention

    training_model.get_base_model().disable_input_require_grads()
    training_model.requires_grad_(False)  # a training forward (gradients on) with nothing to differentiate
    masked = next_token_loss(training_model, packed_batch, 256)
    masks = []
    real_flex = flex.flex_attention
    monkeypatch.setattr(flex, "flex_attention", lambda *a, **k: masks.append(k["block_mask"]) or real_flex(*a, **k))
    use_flex_attention(training_model)
    assert training_model.config._attn_implementation == FLEX_ATTENTION
    torch.testing.assert_close(next_token_loss(training_model, packed_batch, 256), masked)
    assert len(masks) == training_model.config.num_hidden_layers
    tiles = masks[0].to_dense()  # [batch, heads, query tiles, key tiles]: 1 where a tile is computed
    assert 0 < tiles.sum() < torch.ones(tiles.shape[-2:]).tril().sum() * tiles.shape[0]  # fewer than causal's
    with torch.no_grad():
        training_model(**packed_batch, use_cache=False)
    assert len(masks) == training_model.config.num_hidden_layers  # no gradients: SDPA


def test_model_loss_is_the_shifted_next_token_loss(training_model, packed_batch):
    model_loss = training_model(**packed_batch, use_cache=False).loss
    ours = next_token_loss(training_model, packed_batch, 300)
    assert torch.allclose(ours, model_loss, atol=1e-6)
    logits = training_model(**{k: v for k, v in packed_batch.items() if k != "labels"}, use_cache=False).logits
    unshifted = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), packed_batch["labels"].flatten())
    assert not torch.allclose(ours, unshifted, atol=1e-3)  # the original's defect would be caught


def test_chunked_loss_matches_whole_block_loss(training_model, packed_batch):
    whole = loss_and_grads(training_model, packed_batch, chunk_tokens=0)
    for chunk in (100, 512):
        assert_same(whole, loss_and_grads(training_model, packed_batch, chunk_tokens=chunk))


def test_per_example_attention_matches_the_block_mask(training_model, packed_batch):
    masked = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    per_example = loss_and_grads(training_model, packed_batch, chunk_tokens=256, attention_per_example=True)
    assert_same(masked, per_example)
    assert training_model.config._attn_implementation == "sdpa"  # restored after the block
    # and it is really a different path: without restarting position ids the two disagree
    unpacked = {**packed_batch, "position_ids": torch.arange(packed_batch["input_ids"].shape[1]).expand(2, -1)}
    leaked = loss_and_grads(training_model, unpacked, chunk_tokens=256, attention_per_example=True)
    worst = max((leaked[1][k] - per_example[1][k]).abs().max() for k in per_example[1])
    assert worst > 1e-2 * max(g.abs().max() for g in per_example[1].values())
    assert abs(float(leaked[0]) - float(per_example[0])) > 1e-3


def test_example_spans_follow_restarting_position_ids():
    ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert example_spans(ids) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert example_spans(ids) is example_spans(ids)  # read once, reused by every layer


def test_offloaded_checkpoints_give_the_same_gradients(training_model, packed_batch):
    plain = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    hooks = CheckpointsOnCPU(training_model.config.hidden_size, device_type="cpu")  # CPU copies stand in
    offloaded = loss_and_grads(training_model, packed_batch, chunk_tokens=256, hooks=hooks)
    assert_same(plain, offloaded)
    layers = training_model.config.num_hidden_layers
    assert hooks.offloaded >= layers  # at least every layer's checkpoint went through the hook


def test_checkpoint_offload_installed_on_the_decoder_gives_the_same_gradients(training_model, packed_batch):
    """`offload_checkpoints` (what `apply_training_levers` installs) puts the hooks around every training forward of
    the decoder stack, and only there: not in no-grad forwards, and not left on after a forward."""
    from htmlgen_utils.levers import offload_checkpoints

    plain = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    hooks = offload_checkpoints(training_model, device_type="cpu")
    assert_same(plain, loss_and_grads(training_model, packed_batch, chunk_tokens=256))
    moved = hooks.offloaded
    assert moved >= training_model.config.num_hidden_layers
    with torch.no_grad():
        next_token_loss(training_model, packed_batch, 256)
    assert hooks.offloaded == moved  # nothing is saved for backward without gradients
    probe = torch.ones(3, training_model.config.hidden_size, requires_grad=True)
    (probe * probe).sum().backward()  # outside the decoder's forward: no hook is active
    assert hooks.offloaded == moved


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


def test_an_activation_budget_keeps_less_for_the_backward_and_gives_the_same_gradients(training_model,
                                                                                      packed_batch):
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
    """The memory model's arithmetic, with a 15 GiB GPU that already holds 4 GiB (the 4-bit 7B weights)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=15 * 2**30))
    gpu = torch.device("cuda", 0)
    training_model.config.hidden_size = 4096  # per-token figures in 7B-sized vectors
    config = Config.from_preset("colab-t4", block_size=2048, max_example_tokens=2048)

    def plan(**changes):
        return plan_recompute(training_model, config.replace(**changes), gpu, checkpoints_offloaded=False,
                              compiled=False)

    roomy, tight = plan(memory_budget_gib=13.0), plan(memory_budget_gib=8.0)
    layers = training_model.config.num_hidden_layers
    assert 0 < tight.unchecked < roomy.unchecked or roomy.unchecked == layers
    assert tight.estimate_gib <= 8.0 and roomy.estimate_gib <= 13.0
    with pytest.warns(UserWarning, match="lower micro_batch_size"):  # 4 GiB + the step's own leave no room at all
        assert plan(memory_budget_gib=5.0).unchecked == 0
    assert plan(memory_budget_gib=0.0).unchecked == 0  # the low-memory mode checkpoints every layer
    assert plan(memory_budget_gib=13.0, block_size=4096, max_example_tokens=4096).unchecked <= roomy.unchecked
    assert plan_recompute(training_model, config, gpu, checkpoints_offloaded=True).unchecked == 0
    assert plan_recompute(training_model, config, torch.device("cpu"), checkpoints_offloaded=False).unchecked == 0
    assert "less matmul time a step" in str(tight) and tight.activation_budget is None  # eager layers
    # Compiled layers may also run under the compiler's activation budget: at 4,096 tokens in 13 GiB that removes
    # more recompute than whole un-checkpointed layers do, within the same budget.
    import htmlgen_utils.levers.recompute as recompute

    monkeypatch.setattr(recompute, "_decoder_layers", lambda model: [None] * 32)  # 7B's 32 layers
    long = dict(memory_budget_gib=13.0, block_size=4096, max_example_tokens=4096)
    whole, budgeted = plan(**long), plan_recompute(training_model, config.replace(**long), gpu, False, compiled=True)
    assert budgeted.activation_budget is not None and budgeted.estimate_gib <= 13.0
    assert budgeted.recompute_saved > whole.recompute_saved > 0
    assert "activation budget" in str(budgeted)


def test_a_run_too_short_to_repay_compiling_runs_eagerly(tiny_config, capsys):
    config = tiny_config.replace(model_id=BASE, compile_training=True)
    model, _ = load_for_training(config)
    assert apply_training_levers(model, config, torch.device("cpu"), total_steps=COMPILE_MIN_STEPS - 1) == []
    assert "not compiling for 9 step(s)" in capsys.readouterr().out
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)
    assert apply_training_levers(model, config, torch.device("cpu"), total_steps=COMPILE_MIN_STEPS) == [
        "compile_training"]


def test_training_levers_apply_once_and_as_configured(tiny_config):
    config = tiny_config.replace(model_id=BASE, packed_attention="on", compile_training=True)
    model, _ = load_for_training(config)
    assert model.config._attn_implementation == "sdpa"  # the plain path has none of them
    assert apply_training_levers(model, config, torch.device("cpu")) == ["packed_attention", "compile_training"]
    assert model.config._attn_implementation == PACKED_ATTENTION
    assert apply_training_levers(model, config, torch.device("cpu")) == ["packed_attention", "compile_training"]
    plain, _ = load_for_training(tiny_config.replace(model_id=BASE))
    assert apply_training_levers(plain, tiny_config, torch.device("cpu")) == []  # offload is for GPUs only
    assert memory_plan(plain) is None  # every layer checkpointed


def test_the_memory_plan_the_layers_follow_is_kept_for_the_estimate(tiny_config, monkeypatch):
    from htmlgen_utils import levers

    config = tiny_config.replace(model_id=BASE, gradient_checkpointing=True)
    model, _ = load_for_training(config)
    plan = RecomputePlan(layers=2, unchecked=1, budget_gib=13.0, estimate_gib=12.0, per_layer_gib=0.5)
    monkeypatch.setattr(levers, "plan_recompute", lambda *args, **kwargs: plan)
    assert apply_training_levers(model, config, torch.device("cpu")) == ["unchecked_layers"]
    assert memory_plan(model) is plan and plan.recompute_saved > 0
    assert sum(not layer.gradient_checkpointing for layer in model.get_base_model().model.layers) == 1


def test_flex_attention_switches_on_where_measured(tiny_config, monkeypatch):
    """`flex_attention: auto` is blocks of 4,096+ on GPUs of compute capability 8.0+ (a T4 keeps the block mask);
    when on, it replaces per-example attention."""
    from htmlgen_utils.levers import FLEX_ATTENTION, wants_flex_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    t4_preset = Config.from_preset("colab-t4")  # 4,096-token blocks
    import htmlgen_utils.config as config_module

    monkeypatch.setattr(config_module, "gpu_capability", lambda: (9, 0))
    assert wants_flex_attention(t4_preset, cuda) and not wants_flex_attention(
        t4_preset.replace(block_size=2048, max_example_tokens=2048), cuda)
    assert not wants_flex_attention(t4_preset, cpu) and not wants_flex_attention(
        t4_preset.replace(flex_attention="off"), cuda)
    monkeypatch.setattr(config_module, "gpu_capability", lambda: (7, 5))
    assert not wants_flex_attention(t4_preset, cuda)
    config = tiny_config.replace(model_id=BASE, packed_attention="on", flex_attention="on")
    model, _ = load_for_training(config)
    assert apply_training_levers(model, config, cpu) == ["flex_attention"]
    assert model.config._attn_implementation == FLEX_ATTENTION
    with pytest.raises(ValueError, match="flex_attention"):
        Config.from_preset("colab-t4", flex_attention=True)


def test_compiled_layers_match_eager_ones(training_model, packed_batch):
    """Regional compilation through the real 4-bit + LoRA + checkpointing path: same loss, same gradients,
    with the block mask and with per-example attention (which runs eagerly between compiled pieces)."""
    eager = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    eager_per_example = loss_and_grads(training_model, packed_batch, chunk_tokens=256, attention_per_example=True)
    compile_decoder_layers(training_model)
    layers = training_model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert_same(eager, loss_and_grads(training_model, packed_batch, chunk_tokens=256))
    assert_same(eager_per_example, loss_and_grads(training_model, packed_batch, chunk_tokens=256,
                                                  attention_per_example=True))
    assert not any(name.startswith("_orig_mod") for name, _ in training_model.named_parameters())


def test_long_block_levers_switch_on_where_measured():
    short = Config.from_preset("ampere-bf16")
    long = Config.from_preset("ampere-bf16", block_size=16384, max_example_tokens=2048)
    assert not short.long_block_lever("offload_activations") and not short.long_block_lever("packed_attention")
    assert long.long_block_lever("offload_activations") and long.long_block_lever("packed_attention")
    assert Config.from_preset("colab-t4-low-memory").long_block_lever("offload_activations")  # at every size
    assert not Config.from_preset("colab-t4").long_block_lever("offload_activations")  # spends memory on speed
    assert not long.replace(packed_attention="off").long_block_lever("packed_attention")
    with pytest.raises(ValueError, match="offload_activations"):
        Config.from_preset("colab-t4", offload_activations=True)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        Config.from_preset("colab-t4", loss_chunk_tokens=-1)
    assert PACKED_ATTENTION != "sdpa"


def test_4bit_preparation_keeps_embeddings_in_half_precision_and_norms_in_fp32():
    """The embeddings and head, loaded in the compute dtype, are never upcast (no fp32 copy, ever); the norms
    become fp32 and the whole base is frozen."""
    from transformers import AutoModelForCausalLM

    from htmlgen_utils.model import prepare_4bit_for_training, quantization_config

    config = Config.from_preset("tiny", precision="bf16", gradient_checkpointing=True)

    def prepared(**changes):
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16, device_map="cpu",
                                                     quantization_config=quantization_config(config))
        prepare_4bit_for_training(model, config.replace(**changes))
        return model

    model = prepared()
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert all(layer.input_layernorm.weight.dtype == torch.float32 for layer in model.model.layers)
    assert not any(p.requires_grad for p in model.parameters()) and model.is_gradient_checkpointing
    assert prepared(embeddings_in_compute_dtype=False).get_input_embeddings().weight.dtype == torch.float32


def test_half_precision_head_still_generates_outside_autocast():
    """k-bit preparation leaves the final norm in fp32; the head kept in half precision must still accept its
    output when generating without autocast (a GPU run crashed on exactly this)."""
    config = Config.from_preset("tiny")
    model = load_base_model(config)
    tokenizer = load_tokenizer(config.model_id)
    model.requires_grad_(False)
    model.model.norm.float()
    keep_frozen_embeddings_in(model, torch.bfloat16)
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    result = generate_pages(model, tokenizer, ["A pricing page for Acme"], max_new_tokens=12)
    assert result.new_tokens == [12]


def test_static_cache_decoding_writes_the_same_pages():
    config = Config.from_preset("tiny")
    model = load_base_model(config)
    model.eval()
    tokenizer = load_tokenizer(config.model_id)
    descriptions = ["A modern landing page for Acme in blue", "Build a retro 404 error page for Nova.",
                    "A login page for Orbit", "A blog about cats with a dark theme", "Portfolio"]
    eager = generate_pages(model, tokenizer, descriptions, max_new_tokens=48, batch_size=2)
    static = generate_pages(model, tokenizer, descriptions, max_new_tokens=48, batch_size=2, compile_decode=True)
    assert static.pages == eager.pages and static.new_tokens == eager.new_tokens
    assert static.settings["compile_decode"] is True
    caches = model.__dict__["_htmlgen_static_caches"]
    assert list(caches) == [(2, 256)]  # one cache (every batch filled to 2 rows) reused by all three batches
    two = descriptions[:2]
    longer = generate_pages(model, tokenizer, two, max_new_tokens=300, batch_size=2, compile_decode=True)
    assert list(caches) == [(2, 256), (2, 512)]  # a longer request builds a longer cache ...
    shorter = generate_pages(model, tokenizer, two, max_new_tokens=48, batch_size=2, compile_decode=True)
    assert list(caches) == [(2, 256), (2, 512)]  # ... which a shorter one then reuses, with the same pages
    assert shorter.pages == generate_pages(model, tokenizer, two, max_new_tokens=48, batch_size=2).pages
    assert longer.pages == generate_pages(model, tokenizer, two, max_new_tokens=300, batch_size=2).pages
    streamed = "".join(stream_page(model, tokenizer, descriptions[1], max_new_tokens=48, compile_decode=True))
    assert streamed.strip().startswith(eager.pages[1][:40])


def test_own_decode_loop_writes_what_generate_writes():
    """Batch 1 with `compile_decode` runs `decode_one` (on CPU its step runs eagerly): the same greedy pages and
    token counts as `generate`, cut at `</html>` or EOS at the exact token even when that falls mid-piece."""
    from htmlgen_utils.levers.decoding import STOP_CHECK_TOKENS, decode_one

    config = Config.from_preset("tiny")
    model = load_base_model(config)
    model.eval()
    tokenizer = load_tokenizer(config.model_id)
    descriptions = ["A modern landing page for Acme in blue", "Build a retro 404 error page for Nova."]
    for stop in (True, False):  # `</html>` stop string, then EOS only
        plain = generate_pages(model, tokenizer, descriptions, max_new_tokens=900, stop_at_html_end=stop)
        ours = generate_pages(model, tokenizer, descriptions, max_new_tokens=900, batch_size=1, compile_decode=True,
                              stop_at_html_end=stop)
        assert ours.pages == plain.pages and ours.new_tokens == plain.new_tokens
        assert all(n < 900 for n in plain.new_tokens) and any(n % STOP_CHECK_TOKENS for n in plain.new_tokens)
    ids = tokenizer(build_prompt(descriptions[0]), return_tensors="pt").input_ids
    pieces = list(decode_one(model, tokenizer, ids, max_new_tokens=40, stop_at_html_end=False))
    assert [len(p) for p in pieces] == [16, 16, 8]  # read back every STOP_CHECK_TOKENS, and the rest at the limit
    streamed = "".join(stream_page(model, tokenizer, descriptions[1], max_new_tokens=900, compile_decode=True))
    assert clean_page(streamed) == plain.pages[1]


def test_one_query_attention_equals_sdpa_and_hands_prompts_to_it():
    """A decode step's attention as two matmuls and a softmax gives SDPA's output, with SDPA's bool mask (unfilled
    cache slots hidden) and with grouped-query heads; more than one query goes to SDPA itself."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from htmlgen_utils.levers.decoding import one_query_attention

    torch.manual_seed(0)
    for heads, kv_heads in ((4, 4), (8, 2)):
        module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
        key, value = torch.randn(2, kv_heads, 40, 16), torch.randn(2, kv_heads, 40, 16)
        query = torch.randn(2, heads, 1, 16)
        mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
        mask[0, ..., :25], mask[1, ..., :7] = True, True  # a static cache filled to 25 and to 7 slots
        ours = one_query_attention(module, query, key, value, mask, scaling=0.25)[0]
        sdpa = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)[0]
        torch.testing.assert_close(ours, sdpa)
        key[1, :, 7:] = 1e4  # what a hidden slot holds must not matter
        torch.testing.assert_close(one_query_attention(module, query, key, value, mask, scaling=0.25)[0], sdpa)
        queries = torch.randn(2, heads, 3, 16)  # a lookahead check: three queries, each seeing one more slot
        filled = torch.tensor([24, 6])[:, None, None, None] + torch.arange(3)[None, None, :, None]
        check_mask = torch.arange(40)[None, None, None, :] <= filled
        torch.testing.assert_close(one_query_attention(module, queries, key, value, check_mask, scaling=0.25)[0],
                                   sdpa_attention_forward(module, queries, key, value, check_mask, scaling=0.25)[0])
    prompt = torch.randn(1, 4, 5, 16)
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    torch.testing.assert_close(one_query_attention(module, prompt, prompt, prompt, None, scaling=0.25)[0],
                               sdpa_attention_forward(module, prompt, prompt, prompt, None, scaling=0.25)[0])


def test_one_token_lora_matrices_compute_what_linear_computes():
    """`OneTokenLinear` multiplies one token as a multiply-and-sum and anything larger as `nn.Linear`: both give
    the layer's own product; `use_one_token_lora` switches every LoRA matrix in place, once."""
    from htmlgen_utils.levers.decoding import OneTokenLinear, use_one_token_lora

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=True)
    x_one, x_many = torch.randn(1, 1, 64), torch.randn(3, 5, 64)
    expected = linear(x_one), linear(x_many)
    linear.__class__ = OneTokenLinear
    torch.testing.assert_close(linear(x_one), expected[0])
    torch.testing.assert_close(linear(x_many), expected[1])
    model, _ = load_for_training(Config.from_preset("tiny"))
    layers = model.config.num_hidden_layers
    assert use_one_token_lora(model) == 2 * 7 * layers  # A and B of q, k, v, o, gate, up, down in every layer
    assert use_one_token_lora(model) == 0
    assert all(type(m) is OneTokenLinear for name, m in model.named_modules()
               if ".lora_A." in name or ".lora_B." in name)


def test_own_decode_loop_with_a_trained_adapter_writes_what_generate_writes():
    """With LoRA adapters that change the pages (random B matrices), `decode_one` (one-query attention, one-token
    LoRA matrices, its `DecodeStep` from fixed token and position buffers) writes `generate`'s pages; a second
    page reuses the step its cache was built with."""
    model, tokenizer = adapted_tiny_model()
    descriptions = ["A modern landing page for Acme in blue", "Build a retro 404 error page for Nova."]
    with model.disable_adapter():
        base_pages = generate_pages(model, tokenizer, descriptions, max_new_tokens=150).pages
    plain = generate_pages(model, tokenizer, descriptions, max_new_tokens=150)
    assert plain.pages != base_pages  # the adapter matters
    ours = generate_pages(model, tokenizer, descriptions, max_new_tokens=150, batch_size=1, compile_decode=True)
    assert ours.pages == plain.pages and ours.new_tokens == plain.new_tokens
    steps = list(model.__dict__["_htmlgen_decode_steps"].values())
    assert len(steps) == 1  # both pages ran on one cache and its one step ...
    assert len(steps[0].groups) == 4 * model.config.num_hidden_layers  # ... with q/k/v, o, gate/up, down grouped
    for name, parameter in model.named_parameters():  # the adapter changes (back to its start): pages see it
        if "lora_B" in name:
            parameter.data.zero_()
    ours = generate_pages(model, tokenizer, descriptions, max_new_tokens=150, batch_size=1, compile_decode=True)
    assert ours.pages == base_pages


def test_stacked_layers_compute_what_the_layers_compute():
    """q/k/v and gate/up stacked, o and down as groups of one (one 4-bit product and one LoRA product a group
    for one token or a few) give the model's own logits, with the adapter mattering; the members' 4-bit
    weights are views into the stacked one (no second copy), and the stacked absmax and LoRA B are what ran
    (doubling either changes the logits); prompts of more than FEW_TOKENS run the layers themselves; a member
    called out of order is refused; afterwards the model's modules are their own again."""
    from htmlgen_utils.levers.few_tokens import FEW_TOKENS
    from htmlgen_utils.levers.stacking import shared_input_groups, stacked_layers

    model, tokenizer = load_for_training(Config.from_preset("tiny"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    groups = shared_input_groups(model)
    assert len(groups) == 4 * model.config.num_hidden_layers and [len(g.members) for g in groups[:4]] == [3, 1, 2, 1]
    assert groups[1].weight.data_ptr() == groups[1].members[0].get_base_layer().weight.data_ptr()  # no copy
    assert shared_input_groups(model) is groups  # built once, kept on the model
    stacked = groups[0].weight
    for member in groups[0].members:
        weight = member.get_base_layer().weight
        assert weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    modules_before = {name: type(module) for name, module in model.named_modules()}
    model.eval()
    ids = tokenizer("Below is an instruction that describes a task.", return_tensors="pt").input_ids

    def next_logits(stacked_now: bool, tokens: int = 1) -> torch.Tensor:
        prompt = model(input_ids=ids[:, :-tokens], use_cache=True)
        with stacked_layers(groups) if stacked_now else torch.no_grad():
            return model(input_ids=ids[:, -tokens:], cache=prompt.past_key_values).logits

    with torch.no_grad():
        plain = next_logits(False)
        with model.disable_adapter():
            assert (next_logits(False) - plain).abs().max() > 1e-3  # the adapter matters
            torch.testing.assert_close(next_logits(True), next_logits(False))  # ... and is off when disabled
        torch.testing.assert_close(next_logits(True), plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(next_logits(True, 5), next_logits(False, 5), rtol=1e-5, atol=1e-5)  # a check
        long_prompt = ids.repeat(1, 1 + FEW_TOKENS // ids.shape[1])
        whole_prompt = model(input_ids=long_prompt).logits
        with stacked_layers(groups):  # a prompt runs the layers themselves
            torch.testing.assert_close(model(input_ids=long_prompt).logits, whole_prompt)
        for tensor in (groups[0].state.absmax, groups[0].lora_b):
            tensor *= 2
            assert (next_logits(True) - plain).abs().max() > 1e-3
            tensor /= 2
        member = groups[0].members[1]
        with stacked_layers(groups), pytest.raises(RuntimeError, match="out of order"):
            member(torch.randn(1, 1, model.config.hidden_size))
    assert {name: type(module) for name, module in model.named_modules()} == modules_before


def test_compiled_decoding_lifts_the_training_hook_for_the_call():
    """A model prepared for training carries transformers' hook that makes the embeddings' output require grad;
    torch 2.11's compiler cannot trace it and splits the decode step around it, so compiled decoding takes it
    off for each step and puts it back (training after generation still gets it)."""
    from htmlgen_utils.levers import compiled_decoding
    from htmlgen_utils.model import load_for_training

    model, tokenizer = load_for_training(Config.from_preset("tiny", gradient_checkpointing=True))
    embeddings = model.get_input_embeddings()
    hook_names = lambda: [hook.__name__ for hook in embeddings._forward_hooks.values()]  # noqa: E731
    assert hook_names() == ["make_inputs_require_grads"]
    with compiled_decoding(model):
        assert hook_names() == []
    assert hook_names() == ["make_inputs_require_grads"]
    model.eval()
    plain = generate_pages(model, tokenizer, ["A login page for Orbit"], max_new_tokens=24)
    ours = generate_pages(model, tokenizer, ["A login page for Orbit"], max_new_tokens=24, batch_size=1,
                          compile_decode=True)
    assert ours.pages == plain.pages and hook_names() == ["make_inputs_require_grads"]


def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    """The longest run of last tokens (up to three) that occurred before decides; its latest occurrence wins;
    a last token never seen before gives no draft; the draft grows as tokens are appended."""
    lookup = PromptLookup([5, 6, 7, 8, 9, 6, 7, 1, 2, 5, 6])
    assert lookup.draft(3) == [7, 8, 9]  # "5 6" occurred at the start; "6" alone, more lately, loses to it
    lookup.extend([7])
    assert lookup.draft(4) == [8, 9, 6, 7]  # "5 6 7" -> 8 at the start, not "6 7" -> 1 later: the longest
    lookup.extend([1])
    assert lookup.draft(2) == [2, 5]  # "6 7 1" occurred once; the "7 1" and "1" after it are the same run
    lookup.extend([3])
    assert lookup.draft(2) == []
    assert PromptLookup([4, 4]).draft(3) == [4]  # the run ends where the text ends
    strict = PromptLookup([5, 6, 7, 8, 9, 6, 7, 1, 2, 5, 6], shortest=2)
    assert strict.draft(3) == [7, 8, 9]  # "5 6" is long enough
    strict.extend([3, 6])
    assert strict.draft(3) == []  # only "6" alone occurred before: too short to draft from


def test_lookahead_decoding_writes_the_one_token_loops_pages():
    """Greedy `decode_one` with its lookahead check writes the pages of the one-token loop, with the adapter
    mattering (random LoRA B): drafts were checked and some of their tokens kept (fewer steps than tokens), and
    a check that kept fewer tokens than it ran left the cache where the next step overwrites the rest. The
    pieces are read back as the one-token loop reads them."""
    from htmlgen_utils.levers.decoding import STOP_CHECK_TOKENS, decode_one

    model, tokenizer = adapted_tiny_model()
    for description in ("A modern landing page for Acme in blue", "A pricing table for Orbit with three plans"):
        ids = tokenizer(build_prompt(description), return_tensors="pt").input_ids
        plain = list(decode_one(model, tokenizer, ids, 200, stop_at_html_end=False, lookahead=0))
        counts: dict = {}
        ours = list(decode_one(model, tokenizer, ids, 200, stop_at_html_end=False, lookahead=LOOKAHEAD_TOKENS,
                               counts=counts))
        assert ours == plain and [len(p) for p in ours] == [STOP_CHECK_TOKENS] * 12 + [8]
        assert counts["checks"] > 10 and counts["steps"] < 0.9 * (counts["tokens"] - 1), counts
    ended = list(decode_one(model, tokenizer, ids, 900, lookahead=LOOKAHEAD_TOKENS))  # stops where the plain
    assert ended == list(decode_one(model, tokenizer, ids, 900))  # loop stops: at </html> or EOS
    steps = model.__dict__["_htmlgen_decode_steps"].values()
    assert {step.token.shape[1] for step in steps} == {1, 1 + LOOKAHEAD_TOKENS}  # steps and checks, one per cache


def test_column_words_kernel_computes_the_four_bit_product(tmp_path):
    """The decode layout (eight codes a word, the words of one input for all outputs contiguous) and its Triton
    kernel (run by Triton's CPU interpreter here) give one token's product with bitsandbytes' dequantised
    weights, to float32 rounding, for outputs that leave a partial tile, one program's inputs within one absmax
    block (32) or spanning two (128), the rows re-laid 64 at a time (the last slice partial). A code in the
    wrong nibble or an absmax of the wrong block would be far off."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import bitsandbytes as bnb
        import torch
        from htmlgen_utils.levers.column_words import _kernel, column_words
        from htmlgen_utils.levers.stacking import unnested_absmax

        torch.manual_seed(0)
        rows, cols = 200, 384  # 200 outputs: a partial tile of 64 or 128
        weight = bnb.nn.Params4bit(torch.randn(rows, cols) * 0.02, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
        weight._quantize("cpu")
        state = weight.quant_state
        x = torch.randn(cols, dtype=torch.float16)
        expected = bnb.functional.dequantize_4bit(weight.data, state).float() @ x.float()
        words, absmax = column_words(weight.data, unnested_absmax(state), rows, cols, codes_at_once=64 * cols)
        for block_n, block_k in ((64, 32), (128, 128)):
            out = torch.zeros(rows)
            _kernel()[(-(-rows // block_n), cols // block_k)](x, words, absmax, state.code.float(), out, rows, cols,
                                                               BLOCK_N=block_n, BLOCK_K=block_k, ASM="")
            print(((out - expected).abs().max() / expected.abs().max()).item())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [float(line) for line in done.stdout.split()]
    assert len(errors) == 2 and max(errors) < 1e-5, errors


def test_decoding_over_the_column_words_layout_writes_the_same_pages(monkeypatch):
    """`decode_one` (`column_words=True`, the default from compute capability 8.0): every group of the step gets the decode layout and its
    one-token products read it (here through the op's CPU form, the same sums in tensor operations; on CUDA the
    Triton kernel), and the pages are those of the step over bitsandbytes' layout (`column_words=False`), with
    the adapter mattering. The layout is what ran: with its absmax doubled the pages change, and the other
    step's do not. The custom op passes torch's op checks (its shape-only form is what the compiler traces)."""
    from htmlgen_utils.levers import column_words
    from htmlgen_utils.levers.decoding import decode_one

    monkeypatch.setattr(column_words.ColumnWords, "fits",  # the layout is built on CUDA only; here on CPU too
                        staticmethod(lambda packed, state: column_words.ColumnWords.fits_format(state)))
    model, tokenizer = adapted_tiny_model()
    ids = tokenizer(build_prompt("A modern landing page for Acme in blue"), return_tensors="pt").input_ids
    plain = list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=False))
    groups = model.__dict__["_htmlgen_shared_inputs"]
    assert all(group.columns is None for group in groups)  # asked not to, nothing is built
    ours = list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=True))
    assert ours == plain
    assert len(groups) == 4 * model.config.num_hidden_layers and all(group.columns is not None for group in groups)
    with model.disable_adapter():
        assert list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=False)) != plain
    for group in groups:
        group.columns.absmax *= 2
    assert list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=True)) != plain
    assert list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=False)) == plain
    # the op as the compiled step traces it: schema, fake (shape-only) form and real form agree
    group = groups[0]
    x = torch.randn(1, 1, group.columns.words.shape[0] * 8, dtype=torch.float16)
    out = torch.zeros(group.columns.rows)
    checks = torch.library.opcheck(column_words._nf4_column_words_add,
                                   (out, x, group.columns.words, group.columns.absmax, group.columns.table, ""))
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_decode_layout_is_built_only_where_a_quarter_of_the_gpu_stays_free():
    """The rule the default decode layout is built by, group after group, on a T4 (14.7 GiB) holding a 7B
    model: right after loading (~11 GiB free) all 128 groups get their copy (~3.6 GB) and more than a quarter
    stays free; with a training run's memory still in use (6 GiB free) only some do, and the quarter is kept."""
    from types import SimpleNamespace

    from htmlgen_utils.levers.column_words import column_words_bytes
    from htmlgen_utils.levers.stacking import KEEP_FREE_SHARE, room_for_copy

    shapes = [(3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008)] * 32  # q/k/v, o, gate/up, down
    sizes = [column_words_bytes(SimpleNamespace(shape=torch.Size(shape), blocksize=64)) for shape in shapes]
    total = int(14.7 * 2**30)

    def build(free: int) -> tuple[int, int]:
        built = 0
        for size in sizes:
            if room_for_copy(size, free, total):
                free, built = free - size, built + 1
        return built, free

    assert 3.5e9 < sum(sizes) < 3.7e9
    built, left = build(11 * 2**30)
    assert built == len(sizes) and left >= KEEP_FREE_SHARE * total
    built, left = build(6 * 2**30)
    assert 0 < built < len(sizes) and left >= KEEP_FREE_SHARE * total


def _run_ptx(asm: str, word: int) -> list[int]:
    """Run the few PTX instructions `prmt_lookup_asm` writes (mov, shl, shr, and, prmt, lop3, cvt) on one 32-bit
    word, as the PTX manual defines them; returns the eight outputs' fp16 bits (before the conversion to
    float32, which is exact)."""
    registers = {"$8": word}

    def value(operand: str) -> int:
        return registers[operand] if operand in registers else int(operand, 0)

    def prmt(a: int, b: int, select: int) -> int:  # byte i of the result: byte (select nibble i & 7) of {b, a},
        source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):  # or, with the nibble's top bit set, that byte's sign replicated
            nibble = (select >> 4 * i) & 0xF
            byte = source[nibble & 7]
            out |= ((0xFF if byte & 0x80 else 0) if nibble & 8 else byte) << 8 * i
        return out

    def lop3(a: int, b: int, c: int, table: int) -> int:  # bit j: table's bit (a_j b_j c_j) read as a number
        return sum(((table >> ((a >> j & 1) << 2 | (b >> j & 1) << 1 | (c >> j & 1))) & 1) << j for j in range(32))

    for line in asm.splitlines():
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(" ", 1)
        args = [arg.strip() for arg in rest.replace("{", "").replace("}", "").split(",")]
        if op == "mov.b32" and len(args) == 3:  # unpack a register's two halves
            registers[args[0]], registers[args[1]] = value(args[2]) & 0xFFFF, value(args[2]) >> 16
        elif op == "mov.b32":
            registers[args[0]] = value(args[1])
        elif op == "shl.b32":
            registers[args[0]] = (value(args[1]) << value(args[2])) & 0xFFFFFFFF
        elif op == "shr.u32":
            registers[args[0]] = value(args[1]) >> value(args[2])
        elif op == "and.b32":
            registers[args[0]] = value(args[1]) & value(args[2])
        elif op == "prmt.b32":
            registers[args[0]] = prmt(value(args[1]), value(args[2]), value(args[3]))
        elif op == "lop3.b32":
            registers[args[0]] = lop3(value(args[1]), value(args[2]), value(args[3]), value(args[4]))
        elif op == "cvt.f32.f16":
            registers[args[0]] = value(args[1])
        else:
            raise AssertionError(f"an instruction the test does not know: {line}")
    return [registers[f"${i}"] for i in range(8)]


def test_column_words_lookup_in_registers_gives_the_nf4_table():
    """The PTX that looks a word's eight codes up in registers (the GPU kernel's lookup; Triton's interpreter
    cannot run it), executed instruction by instruction as the PTX manual defines them, gives each code's NF4
    value in fp16, for every code in every position of the word. A wrong byte select, mask or half would give
    another code's value."""
    import random

    import bitsandbytes.functional as F

    from htmlgen_utils.levers.column_words import prmt_lookup_asm

    table = F.get_4bit_type("nf4", device="cpu").float()
    fp16_bits = [int(b) & 0xFFFF for b in table.half().view(torch.int16).tolist()]
    asm = prmt_lookup_asm(table)
    rng = random.Random(0)
    words = [[(code + shift) % 16 for shift in range(8)] for code in range(16)]  # every code in every position
    words += [[rng.randrange(16) for _ in range(8)] for _ in range(200)]
    for codes in words:
        word = sum(code << 4 * j for j, code in enumerate(codes))
        assert _run_ptx(asm, word) == [fp16_bits[code] for code in codes], codes


def test_few_token_kernel_computes_the_four_bit_product(tmp_path):
    """The Triton kernel for a few tokens (run by Triton's CPU interpreter here) gives the product with
    bitsandbytes' dequantised weights (rounded to fp16, as the tensor cores take them), for the absmax
    double-quantised (as loaded) and as float32 (as stacked), with rows and columns that leave partial tiles
    and uneven shares of the columns."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import bitsandbytes as bnb
        import torch
        from htmlgen_utils.levers.few_tokens import _kernel
        from htmlgen_utils.levers.stacking import unnested_absmax

        torch.manual_seed(0)
        rows, cols, tokens = 80, 320, 3  # 2.5 tiles of 32 rows; 5 blocks of 64 columns in 2 shares
        for nested in (True, False):
            weight = bnb.nn.Params4bit(torch.randn(rows, cols) * 0.02, requires_grad=False, quant_type="nf4",
                                       compress_statistics=True)
            weight._quantize("cpu")
            state = weight.quant_state
            x = torch.randn(tokens, cols, dtype=torch.float16)
            weights = bnb.functional.dequantize_4bit(weight.data, state).half().float()
            expected = x.float() @ weights.T
            absmax = state.absmax if nested else unnested_absmax(state)
            code2, absmax2 = (state.state2.code, state.state2.absmax) if nested else (absmax, absmax)
            offset = state.offset.reshape(1).float() if nested else absmax
            out = torch.zeros(tokens, rows)
            _kernel().fn[(3, 2)](x, weight.data.view(-1), absmax, code2, absmax2, offset, state.code, out, rows,
                                 cols, TOKENS=tokens, NESTED=nested, OUTER_BLOCK=256, BLOCK_N=32, BLOCKS=2,
                                 SPLIT_K=2)
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            print(nested, error)
            assert error < 1e-5, error
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", done.stdout.split()[1], "False", done.stdout.split()[3]]
