import bitsandbytes as bnb
import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.generation import generate_pages
from htmlgen_utils.model import (
    device_for,
    find_linear_layer_names,
    keep_frozen_embeddings_in,
    load_base_model,
    load_for_training,
    load_tokenizer,
    parameter_summary,
    resolve_precision,
)
from tests.conftest import BASE


def test_tiny_model_loads_in_4bit_and_trains(tiny_config):
    model, tokenizer = load_for_training(tiny_config)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and quantized[0].weight.quant_type == "nf4"
    assert model.base_model.model.config.quantization_config.bnb_4bit_use_double_quant
    summary = parameter_summary(model)
    assert 0 < summary.trainable < summary.total
    assert summary.lora_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    ids = torch.randint(5, 500, (2, 64))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)


def test_linear_layer_discovery_excludes_lm_head(tiny_config):
    model = load_base_model(tiny_config)
    names = find_linear_layer_names(model)
    assert "lm_head" not in names and {"q_proj", "down_proj"} <= set(names)


def test_tokenizer_has_pad_distinct_from_eos(tiny_config):
    tokenizer = load_tokenizer(tiny_config.model_id)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_gpu_preset_without_gpu_says_how_to_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="--preset tiny"):
        device_for(Config.from_preset("colab-t4"))
    assert resolve_precision("auto") == "fp32"


def test_missing_model_message_mentions_token(tmp_path):
    with pytest.raises(OSError, match="HF_TOKEN"):
        load_tokenizer(str(tmp_path / "no-such-model"))


def test_4bit_preparation_keeps_embeddings_in_half_precision_and_norms_in_fp32():
    """The embeddings and head, loaded in the compute dtype, are never upcast (no fp32 copy, ever); the norms
    become fp32 and the whole base is frozen."""
    from transformers import AutoModelForCausalLM

    from htmlgen_utils.model import prepare_4bit_for_training, quantization_config

    config = Config.from_preset("tiny", precision="bf16", gradient_checkpointing=True)

    def prepared(**changes):
        model = AutoModelForCausalLM.from_pretrained(
            BASE, dtype=torch.bfloat16, device_map="cpu", quantization_config=quantization_config(config)
        )
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
