"""What a run leaves to take away: the model card, the sharded 16-bit merge, GGUF files and their Modelfile."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from htmlgen_utils.config import REPO_DIR, Config
from htmlgen_utils.packing import build_prompt

PROMPTS = [
    build_prompt("A login page for Zephyr, dark colours, with a footer."),
    build_prompt("Write the HTML for Quill's pricing page, minimal style, with an FAQ."),
    build_prompt("An about page for Onyx, playful style, orange colours."),
]


@pytest.fixture(scope="module")
def taken_away(chain, tmp_path_factory):
    """The chain's run as the export command leaves it: card, merge in 1 MB shards, GGUF f16 and q8_0."""
    from htmlgen_utils.export import main

    run_dir = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(chain[0], run_dir, ignore=shutil.ignore_patterns("packed", "checkpoints", "executed", "data"))
    Config.load(run_dir).replace(run_dir=str(run_dir)).save(run_dir)
    main(["--run-dir", str(run_dir), "--merge", "--shard-gb", str(1 / 1024), "--gguf", "f16", "--gguf", "q8_0"])
    return run_dir


def test_sharded_merge_equals_peft_merge_and_unload(taken_away):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    merged_dir = taken_away / "merged"
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4  # 1 MB shards of an 8 MB model
    ours = {k: v for shard in shards for k, v in load_file(merged_dir / shard).items()}
    base = AutoModelForCausalLM.from_pretrained(Config.load(taken_away).model_id, dtype=torch.float16)
    reference = PeftModel.from_pretrained(base, str(taken_away / "adapter")).merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    for key, weight in ours.items():
        assert weight.dtype == torch.float16
        assert torch.equal(weight, reference[key]), key  # the same fp16 arithmetic as peft's merge
    assert AutoModelForCausalLM.from_pretrained(merged_dir).num_parameters() == base.num_parameters()


def _run_with_adapter(run_dir: Path, **shape) -> int:
    """A random fp16 Llama of `shape` saved as a sharded base, with a LoRA adapter in `run_dir`; its size in bytes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from htmlgen_utils.config import TINY_BASE_DIR

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1638, **shape)).half()
    base = run_dir.parent / f"{run_dir.name}-base"
    model.save_pretrained(base, max_shard_size="16MB")
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    tokenizer.save_pretrained(base)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    Config.from_preset("tiny", model_id=str(base), run_dir=str(run_dir)).save(run_dir)
    return sum(p.numel() for p in model.parameters()) * 2


def test_merge_holds_about_one_shard_in_ram_not_the_model(tmp_path):
    """A 58 MB model merged in 4 MB shards: the merge's peak RSS grows by less than 80% of the model (loading the
    model whole, as peft's merge does, grows it by 1.4x the model). A tiny model is merged first, so the imports
    and first-call costs of a fresh machine are not counted."""
    _run_with_adapter(
        tmp_path / "warm", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    shape = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)
    model_bytes = _run_with_adapter(tmp_path / "run", num_key_value_heads=8, **shape)
    result = subprocess.run(
        [sys.executable, "tests/merge_peak_ram.py", str(tmp_path / "warm"), str(tmp_path / "run"), str(4 << 20)],
        cwd=REPO_DIR,
        # a fixed mmap threshold returns every freed tensor to the system; glibc's dynamic one keeps some in the heap,
        # where the peak counts them again
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ram = json.loads(result.stdout.strip().splitlines()[-1])
    assert ram["peak"] - ram["before"] < 0.8 * model_bytes, (ram, model_bytes)
    assert len(list((tmp_path / "run" / "merged").glob("model-*.safetensors"))) >= 10


def test_model_card_parses_and_carries_metrics_json_figures(taken_away):
    from huggingface_hub import ModelCard

    from htmlgen_utils.model_card import CARD_METRICS

    metrics = json.loads((taken_away / "metrics.json").read_text())
    for folder in ("adapter", "merged"):
        card = ModelCard.load(taken_away / folder / "README.md")
        assert card.data.library_name == "peft" and card.data.license == "other"
        assert card.data.pipeline_tag == "text-generation" and "qlora" in card.data.tags
        rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"\(`(\w+)`\) \| ([\d.]+) \| ([\d.]+) \|", card.text)}
        assert set(rows) == set(CARD_METRICS), rows
        for key, (tuned, base) in rows.items():
            assert tuned == f"{metrics[key]:.3f}" and base == f"{metrics['base_model'][key]:.3f}", key
        history = json.loads((taken_away / "history.json").read_text())
        assert f"| `tiny` | {history[-1]['step']} |" in card.text
        assert build_prompt("{description}").rstrip() in card.text and card.text.count("````html") == 2
        assert str(REPO_DIR) not in card.text  # no path of this machine


def test_gguf_loads_back_and_decodes_as_the_merged_model(taken_away):
    """transformers' own GGUF loader reads our files back: the same tokens for the prompts, and greedy decoding
    equal to the merged model's (f16: the same logits; q8_0: at least 90% of the tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(taken_away / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(taken_away / "merged")
    folder = taken_away / "gguf"
    for qtype, least_match in (("f16", 1.0), ("q8_0", 0.9)):
        name = f"model-{qtype}.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        assert gguf_tokenizer.eos_token_id == tokenizer.eos_token_id
        matched = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            assert gguf_tokenizer(prompt).input_ids == ids[0].tolist()
            with torch.no_grad():
                if qtype == "f16":
                    assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-5)
                ours = model.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :]
                theirs = merged.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :]
            matched.append((ours == theirs).float().mean().item() if len(ours) == len(theirs) else 0.0)
        assert min(matched) >= least_match, (qtype, matched)
        modelfile = (folder / f"model-{qtype}.Modelfile").read_text()
        assert f"FROM ./{name}" in modelfile and build_prompt("{{ .Prompt }}") in modelfile


def test_gguf_export_refuses_what_it_cannot_write(taken_away, tmp_path, monkeypatch):
    from htmlgen_utils.gguf_export import write_gguf

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="llama-quantize"):
        write_gguf(taken_away / "merged", tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_notebook_05_export_cell_writes_the_gguf_it_promises(taken_away, tmp_path):
    import nbformat

    run_dir = tmp_path / "run"
    shutil.copytree(taken_away, run_dir, ignore=shutil.ignore_patterns("gguf", "merged"))
    notebook = nbformat.read(str(REPO_DIR / "notebooks" / "05_evaluation_and_rendering.ipynb"), as_version=4)
    cell = next(c for c in notebook.cells if c.id == "05-37")
    namespace = {"config": Config.load(taken_away).replace(run_dir=str(run_dir)), "export_gguf": "q8_0"}
    exec(cell.source, namespace)
    assert namespace["gguf_file"] == run_dir / "gguf" / "model-q8_0.gguf" and namespace["gguf_file"].stat().st_size
    assert namespace["modelfile"].exists() and (run_dir / "merged" / "README.md").exists()
