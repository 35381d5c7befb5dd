import bitsandbytes as bnb
import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.model import (device_for, find_linear_layer_names, load_base_model, load_for_training,
                                 load_tokenizer, parameter_summary, resolve_precision)


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
