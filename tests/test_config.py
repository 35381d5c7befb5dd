import pytest

from htmlgen_utils.config import PRESETS, Config


def test_presets_are_valid_and_distinct():
    for name in PRESETS:
        config = Config.from_preset(name)
        assert config.preset == name
    assert Config.from_preset("colab-t4").precision == "fp16"
    assert Config.from_preset("ampere-bf16").precision == "bf16"
    assert Config.from_preset("ampere-bf16").micro_batch_size > Config.from_preset("colab-t4").micro_batch_size
    assert Config.from_preset("tiny").precision == "fp32"
    t4 = Config.from_preset("colab-t4")
    assert (t4.lora_r, t4.lora_alpha, t4.gradient_accumulation_steps) == (16, 64, 4)
    assert t4.block_size == t4.max_example_tokens == 4096 and t4.gradient_checkpointing  # Llama-2's whole context


def test_presets_list_only_what_they_change():
    defaults = Config().to_dict()
    for name, values in PRESETS.items():
        assert not {k for k, v in values.items() if defaults[k] == v}, name


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 0),
        ("lora_r", -1),
        ("precision", "fp8"),
        ("wandb_mode", "sometimes"),
        ("validation_fraction", 0.7),
        ("learning_rate", 0),
        ("max_steps", 0),
        ("long_page_policy", "ignore"),
        ("label_column", ""),
        ("gradient_accumulation_steps", 1.5),
        ("max_example_tokens", 99999),
        ("loss_scaling", "maybe"),
        ("lora_dropout", 1.0),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Config\.{field}="):
        Config.from_preset("tiny", **{field: value})


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        Config.from_preset("nope")
    with pytest.raises(ValueError, match="lora_rank"):
        Config.from_preset("tiny", lora_rank=8)


def test_json_round_trip(tmp_path):
    config = Config.from_preset("colab-t4", max_steps=7, extra={"note": "x"})
    path = config.save(tmp_path)
    assert path.name == "htmlgen_config.json"
    assert Config.load(tmp_path) == config
    path.write_text(path.read_text().replace('"lora_r": 16', '"lora_r": 0'))
    with pytest.raises(ValueError, match="lora_r"):
        Config.load(tmp_path)


def test_parse_value():
    assert Config.parse_value("3") == 3
    assert Config.parse_value("true") is True
    assert Config.parse_value("2e-4") == 2e-4
    assert Config.parse_value("runs/x") == "runs/x"
