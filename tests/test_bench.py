"""The GPU benchmark scripts run end to end on CPU with the tiny model (`--smoke`), so they cannot rot
between GPU runs. Their figures here mean nothing; the shape of the report does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path, name: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / (name or script.replace(".py", ".json"))).read_text())
    printed = "\n" + done.stdout
    assert json.loads(printed[printed.rindex("\n{\n") + 1:]) == report  # the JSON table is printed last
    return report


def test_training_comparison_runs(tmp_path):
    report = run_bench("train_compare.py", "--systems", "seed-style,ours,levers", "--blocks", "256", "--repeats", "2",
                       "--steps", "2", "--levers", "whole-block", "--work", str(tmp_path / "work"), out=tmp_path)
    systems = [row["system"] for row in report["rows"]]
    assert systems == ["seed-style", "ours", "seed-style", "ours", "ours, whole-block logits (loss_chunk_tokens=0)"]
    for row in report["rows"]:
        assert row["block"] == 256 and row["oom"] is False and row["tokens_per_s"] > 0 and row["measured_steps"] == 2
    ours = [row for row in report["rows"] if row["system"] == "ours"]
    assert all(isinstance(row["levers"], list) for row in ours)  # which levers the row ran with
    # the chunked loss and the whole-block loss train the same run
    assert abs(ours[0]["final_loss"] - report["rows"][-1]["final_loss"]) < 1e-3
    cell = report["summary"]["ours"]["256"]
    assert cell["runs"] == 2 and cell["tokens_per_s_min"] <= cell["tokens_per_s_median"] <= cell["tokens_per_s_max"]
    assert cell["ratio_of_medians_vs_seed-style"] > 0
    assert report["longest_block_under_cap"]["ours"] == 256


def test_generation_comparison_runs(tmp_path):
    report = run_bench("generation_compare.py", "--prompts", "4", "--seed-style-prompts", "1", "--batches", "2",
                       "--work", str(tmp_path / "work"), out=tmp_path)
    rows = report["rows"]
    assert set(rows) == {"seed-style, one at a time", "ours, batch 2, compiled decode", "ours, batch 2, eager decode",
                         "batch-1 decode, compiled"}
    seed = rows["seed-style, one at a time"]
    assert 0 < seed["new_tokens"] <= 256 and seed["prompts"] == 1  # the original's way: no `</html>` stop, EOS only
    assert all(row["examples_per_s"] > 0 for row in rows.values())
    assert set(report["speedups"]) == set(rows)


def test_layer_recompute_runs(tmp_path):
    """One compiled layer three ways: checkpointed it saves (almost) nothing for the backward, and under the
    compiler's activation budget it saves less than the compiler's default."""
    report = run_bench("layer_recompute.py", "--ways", "checkpointed,unchecked,budget-0.2", "--work",
                       str(tmp_path / "work"), out=tmp_path)
    rows = {row["way"]: row for row in report["rows"]}
    assert set(rows) == {"checkpointed", "unchecked", "budget-0.2"}, report
    assert all(row["ms_median"] > 0 for row in rows.values())
    assert rows["checkpointed"]["saved_vectors"] < rows["budget-0.2"]["saved_vectors"] < 0.5 * rows["unchecked"][
        "saved_vectors"]


def test_step_profile_runs(tmp_path):
    report = run_bench("profile_step.py", "--block", "512", "--top", "40", "--work", str(tmp_path / "work"),
                       out=tmp_path)
    assert report["block"] == 512 and len(report["tokens_per_s"]) == 2 and min(report["tokens_per_s"]) > 0
    names = [row["name"] for row in report["top"]]
    assert len(names) == 40 and all(row["ms"] > 0 and row["calls"] > 0 for row in report["top"])
    assert any("dequantize_4bit" in name for name in names)  # the profiled step went through the real 4-bit layers


def test_decode_profile_runs(tmp_path):
    report = run_bench("profile_decode.py", "--tokens", "16", "--ways", "plain,before,bnb-layout,ours", "--repeats",
                       "2", "--work", str(tmp_path / "work"), out=tmp_path)
    rows = report["rows"]
    assert set(rows) == {"plain generate", "before: compiled step (CUDA-graph trees), SDPA, cuBLAS LoRA",
                         "bnb-layout: decode_one(column_words=False), levers + DecodeStep, bitsandbytes' 4-bit kernel",
                         "ours: decode_one, the 4-bit products over the decode layout"}
    assert all(row["new_tokens"] == 16 and 0 < row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
               for row in rows.values())
    assert report["speedup_vs_plain_generate"]["plain generate"] == 1.0 and report["repeats"] == 2
    assert set(report["speedup_vs_before"]) == set(rows) and report["column_words_speedup"] > 0


def test_four_bit_matvec_reference_reads_the_nf4_layout(monkeypatch):
    """`four_bit_matvec.py` needs CUDA and Triton; on CPU its plain-tensor product (what the kernel is checked
    against) must equal the product with bitsandbytes' dequantised weight, or the benchmark checks nothing."""
    import bitsandbytes as bnb
    import torch

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from four_bit_matvec import nf4_matvec

    torch.manual_seed(0)
    rows, cols = 96, 1280
    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, cols), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")
    x = torch.randn(1, 1, cols)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(nf4_matvec(x, layer), x.reshape(-1) @ weight.T, rtol=1e-5, atol=1e-4)


def test_decode_tuning_runs(tmp_path):
    """`decode_tuning.py`'s builds decode the same greedy tokens on CPU (where every build runs eagerly): its
    candidate attention computes the package's, and the stacked step the layers' own products."""
    report = run_bench("decode_tuning.py", "--tokens", "16", "--repeats", "1", "--builds",
                       "before,candidate,stacked", "--work", str(tmp_path / "work"), out=tmp_path)
    rows = report["rows"]
    assert len(rows) == 3 and all(row["tokens_per_s"] > 0 for row in rows.values())
    assert all(row["tokens_equal_to_first_until"] == 16 for row in rows.values())


def test_decode_anatomy_cuts_tokens_and_layers(monkeypatch):
    """`decode_anatomy.py` cuts a profile's kernel list into tokens (at each greedy pick) and a token into layers
    (seven 4-bit products each, the generated kernels named after the 4-bit op not counted as products)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from decode_anatomy import anatomy

    layer = [["triton_red_fused_add_mean_rsqrt", 2.0], ["triton_per_fused_add_gemm_4bit_mul", 1.0]] + \
        [["void gemm_4bit_simt<__half, 1>", 10.0]] * 7
    token = layer * 3 + [["nvjet_lm_head", 60.0], ["void at::native::reduce_kernel<ArgMaxOp>", 5.0]]
    kernels, clock = [], 0.0
    for name, duration in [["prefill", 100.0], ["reduce_kernel<ArgMaxOp>", 5.0]] + token * 4:
        kernels.append([name, clock, duration])
        clock += duration + 0.5  # a gap between kernels
    report = anatomy(kernels, layers=3)
    assert report["tokens_seen"] == 4 and report["kernels_per_token"] == len(token)
    assert report["four_bit_products_per_token"] == 21
    assert report["token_busy_us"] == 3 * 73 + 65
    assert report["token_span_us"] == report["token_busy_us"] + 0.5 * (len(token) - 1)  # its gaps inside
    assert report["layer"]["kernels"] == 9 and report["layer"]["four_bit_us"] == 70
    assert report["layer"]["other_kernels"] == 2 and report["layer"]["other_us"] == 3
    # the decode layout's kernel (`decode_one`'s default) counts as a 4-bit product too
    ours = anatomy([[name.replace("void gemm_4bit_simt<__half, 1>", "nf4_column_words"), *rest]
                    for name, *rest in kernels], layers=3)
    assert ours["four_bit_products_per_token"] == 21 and ours["layer"]["four_bit_us"] == 70


def test_lookahead_decode_runs(tmp_path):
    """The lookahead's timing script, with its page oracle: the lookahead way follows the page (so its drafts
    are checked and some kept: fewer steps than tokens)."""
    report = run_bench("lookahead_decode.py", "--tokens", "64", "--pages", "2", "--repeats", "1", "--work",
                       str(tmp_path / "work"), out=tmp_path)
    assert list(report["rows"]) == ["one-token loop", "lookahead 4"]
    assert all(row["tokens_per_s"] > 0 for row in report["rows"].values())
    assert report["lookahead"]["checks"] > 0 and report["lookahead"]["tokens_per_step"] > 1.0
    assert report["replayed_ms"] == {"step": None, "check of 5 tokens": None}  # no CUDA graphs on CPU


def test_few_token_kernel_compiles_to_tensor_core_products_without_asynchronous_copies(tmp_path):
    """The few-token kernel compiled for an H100 (sm_90) on this CPU, through the instruction-count script:
    tensor-core products, and no asynchronous copies, which software pipelining makes of the table lookups
    feeding the products (one 4-byte copy per weight: 13x slower than bitsandbytes on an H100)."""
    pytest.importorskip("triton")
    report = run_bench("kernel_instructions.py", "--targets", "90", out=tmp_path)
    (counts,) = report["targets"]["sm_90"].values()
    assert counts["asynchronous copies"] == 0 and counts["tensor-core products"] > 0, counts
    assert counts["global loads, 8-16 bytes"] > 0  # the packed weights are read 16 bytes at a time


def test_column_words_kernel_compiles_for_a_t4_with_its_lookup_in_registers(tmp_path):
    """The column-words kernel compiled for a T4 (sm_75) on this CPU, through the instruction-count script:
    NVIDIA's assembler accepts its inline PTX, the lookup is byte permutes and three-input logic in registers
    (7 and 2 for four codes), and the only narrow global loads are the token's values (one per input of the
    tile), not a table load per code; the codes come 16 bytes at a time."""
    pytest.importorskip("triton")
    report = run_bench("kernel_instructions.py", "--kernel", "column-words", "--targets", "75", out=tmp_path,
                       name="kernel_instructions_column_words.json")
    (counts,) = report["targets"]["sm_75"].values()
    codes = counts["weights a thread"]
    assert counts["machine code bytes"] > 0
    assert counts["byte permutes"] == 7 * codes // 4 and counts["three-input logic"] == 2 * codes // 4, counts
    assert counts["global loads, 1-4 bytes"] == 32 and counts["global loads, 8-16 bytes"] > 0, counts
