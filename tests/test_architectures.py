"""The chain on the newer bases: Llama-3.x, Qwen2.5 and Mistral, as tiny random models with tokenizers shaped like
theirs (tests/architectures.py). Each trains in 4-bit with LoRA, generates, merges and exports to GGUF."""

import json
from pathlib import Path

import pytest
import torch

from htmlgen_utils.config import Config
from tests.architectures import build_tiny

KINDS = ("llama3", "qwen2", "mistral")


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory, bundled_rows):
    from htmlgen_utils.train import run_training

    texts = [r["label"] for r in bundled_rows] + [r["html"] for r in bundled_rows]
    folder = tmp_path_factory.mktemp(request.param)
    base = build_tiny(request.param, folder / "base", texts)
    config = Config.from_preset(
        "tiny",
        model_id=str(base),
        run_dir=str(folder / "run"),
        block_size=512,
        max_example_tokens=512,
        max_steps=2,
        eval_every=2,
        checkpoint_every=0,
        max_eval_batches=1,
    )
    from htmlgen_utils.export import merge_to_16bit

    state = run_training(config)
    merge_to_16bit(config.run_dir, dtype=torch.float32)  # fp32, so the merge's comparison is not rounding's
    return request.param, config, state


def test_trains_in_4bit_with_lora_on_every_linear_layer(trained):
    kind, config, state = trained
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = json.loads((Path(config.run_dir) / "adapter" / "adapter_config.json").read_text())
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(adapter["target_modules"]) == expected, kind  # found by looking, not from a list


def test_tokenizer_gets_a_pad_token_that_is_never_taken_for_the_page_end(trained):
    from htmlgen_utils.model import load_tokenizer

    kind, config, _ = trained
    tokenizer = load_tokenizer(config.model_id)
    assert tokenizer.pad_token is not None
    if kind == "mistral":
        assert tokenizer.pad_token == "<unk>"
    if kind == "llama3":  # no unk: a spare special token, not EOS
        assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    if kind == "qwen2":  # the model names its pad token, which is also its EOS: kept as it is
        assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.bos_token is None


def test_generates_pages_and_merges_to_16bit(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from htmlgen_utils.generation import generate_pages
    from htmlgen_utils.model import load_trained

    kind, config, _ = trained
    model, tokenizer, _ = load_trained(config.run_dir)
    result = generate_pages(model, tokenizer, ["A login page for Zephyr.", "A pricing page."], max_new_tokens=16)
    assert len(result.pages) == 2 and all(isinstance(p, str) for p in result.pages)
    merged = AutoModelForCausalLM.from_pretrained(Path(config.run_dir) / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(Path(config.run_dir) / "adapter"))
    ids = torch.randint(5, 500, (1, 24))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-4), kind


def test_exports_to_gguf_that_reads_back_as_the_merged_model(trained, tmp_path):
    """Qwen2 (biased q/k/v, tied embeddings, padded vocabulary) and Mistral (sentencepiece-style vocabulary) load
    back through transformers' GGUF reader with the merged model's logits; Llama-3.1's RoPE scaling, which that
    reader does not apply, is checked in the file against transformers' own scaling."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from htmlgen_utils.gguf_export import write_gguf

    kind, config, _ = trained
    merged_dir = Path(config.run_dir) / "merged"
    path = write_gguf(merged_dir, tmp_path / "model-f16.gguf", "f16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    if kind == "llama3":
        stored = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
        rope = merged.config.rope_parameters
        head_dim = merged.config.hidden_size // merged.config.num_attention_heads
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](merged.config, "cpu")
        assert torch.allclose(torch.tensor(stored.data), plain / scaled, rtol=1e-5)
        assert {1.0, rope["factor"]} <= set(stored.data.tolist())  # some frequencies kept, some divided by 8
        return
    merged = merged.half().float()  # the f16 file's weights
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "<p>A login page for Zephyr, dark colours.</p>"
    assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids, kind
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, merged(ids).logits, atol=1e-5), kind
