"""What the GPU benchmarks share: a Llama-2-7B-shaped checkpoint, the T4 memory cap, versions, JSON output.

Weights are random (the hub is out of reach on the benchmark machine; values change neither speed nor memory).
The checkpoint gets the tiny base's tokenizer: its ids are < 32000 and BOS/EOS are 1/2 like Llama's, so the
bundled data tokenises into the same kind of blocks a Llama tokenizer gives (fewer tokens per page).
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
)
T4_GIB = 15.0
T4_USABLE_GIB = 14.5  # what a T4 leaves a process once the CUDA context is up (~14.7 GiB shown before it)


def build_checkpoint(
    path: Path, smoke: bool = False, max_position_embeddings: int | None = None, layers: int | None = None
) -> Path:
    """A random-weight Llama-2-7B-shaped checkpoint in fp16 (or, with `smoke`, the tiny base itself); its context
    is 32,768 unless `max_position_embeddings` says otherwise (Llama-2's own is 4,096), its decoder layers 32
    unless `layers` says otherwise."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from htmlgen_utils.config import TINY_BASE_DIR

    if smoke:
        return TINY_BASE_DIR
    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    shape = {
        **LLAMA2_7B,
        **({"max_position_embeddings": max_position_embeddings} if max_position_embeddings else {}),
        **({"num_hidden_layers": layers} if layers else {}),
    }
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    free_memory()
    return path


def cap_memory(gib: float | None) -> None:
    """Limit this process to `gib` of GPU memory (a T4's 15 GiB): an out-of-memory here is one on a T4."""
    if gib and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def interleaved_graph_times(ways: dict, repeats: int, rep: int = 40) -> dict[str, dict[str, float]]:
    """Each way (a function that launches GPU work) timed `repeats` times in a CUDA graph (triton's
    `do_bench_cudagraph`: launch overhead out, as in a captured decode step), the ways interleaved so drift on a
    shared GPU hits them alike: the median, min and max in microseconds."""
    from triton.testing import do_bench_cudagraph

    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, run in ways.items():
            times[way].append(do_bench_cudagraph(run, rep=rep) * 1e3)
    return {
        way: {"us": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}
        for way, values in times.items()
    }


def write_report(report: dict, out_dir: Path, name: str, quiet: bool = False) -> Path:
    """Write the report as JSON under `out_dir` and (unless `quiet`) print it as the last thing on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        print(json.dumps(report, indent=2), flush=True)
    return path


KERNEL_KINDS = [  # (kind, pattern on the kernel's name), first match wins
    ("attention", r"sdpa|flash|fmha|attention"),
    ("4-bit dequantize", r"kDequantize"),
    ("4-bit gemv", r"kgemm_4bit|gemm_4bit_simt"),  # bitsandbytes' (named so from 0.50 on)
    ("16-bit gemv", r"gemv"),
    ("optimizer", r"kOptimizer|kPreconditionOptimizer|adam"),
    ("gemm", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_|ampere_"),
    ("compiled (triton)", r"^triton_"),
]


def kernel_kind(name: str, other: str = "other kernels") -> str:
    """The kind of a kernel, from its name (`KERNEL_KINDS`)."""
    import re

    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name)), other)


def gpu_timeline(profiler, trace_path: Path, steps: int) -> dict:
    """What the GPU did during a profile, from its trace: the time any kernel or copy ran (overlaps counted
    once, so it can be set against the wall time: the rest is the GPU waiting for the host), kernels and
    copies per step, and the time by kind of kernel."""
    profiler.export_chrome_trace(str(trace_path))
    events = [
        e
        for e in json.loads(trace_path.read_text())["traceEvents"]
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    busy, end = 0.0, float("-inf")
    for event in sorted(events, key=lambda e: e["ts"]):
        start, stop = event["ts"], event["ts"] + event.get("dur", 0)
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    kinds: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for event in events:
        if event["cat"] == "kernel":
            totals = by_name.setdefault(event["name"][:120], [0, 0.0])
            totals[0] += 1
            totals[1] += event.get("dur", 0)
        kind = "copies" if event["cat"] != "kernel" else kernel_kind(event["name"])
        kinds[kind] = kinds.get(kind, 0.0) + event.get("dur", 0)
    trace_path.unlink()
    return {
        "gpu_busy_s": round(busy / 1e6, 3),
        "kernels_per_step": round(sum(e["cat"] == "kernel" for e in events) / steps),
        "copies_per_step": round(sum(e["cat"] == "gpu_memcpy" for e in events) / steps),
        "seconds_by_kind": {k: round(v / 1e6, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name, "per_step": round(n / steps, 1), "us_per_step": round(us / steps, 1)}
            for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
        ],
    }


def compiler_counters() -> dict:
    """torch.compile's own account: graphs compiled, graph breaks (with reasons), CUDA-graph skips."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": {reason[:200]: n for reason, n in counters["graph_break"].items()},
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
    }


class CompilerLog(logging.Handler):
    """Collects torch.compile's graph-break, recompile and performance-hint messages (why a CUDA graph was
    skipped, say), each once, for the report."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        torch._logging.set_logs(graph_breaks=True, recompiles=True, perf_hints=True)
        logging.getLogger("torch").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()[:400]
        if message not in self.messages and len(self.messages) < 40:
            self.messages.append(message)


def load_model(model_path: Path, smoke: bool):
    """The 4-bit base with a fresh, unmerged LoRA, as after training (`tiny` preset with `smoke`, else `colab-t4`)."""
    from htmlgen_utils.config import Config
    from htmlgen_utils.model import load_for_training

    config = Config.from_preset("tiny" if smoke else "colab-t4", model_id=str(model_path), run_dir="/tmp/unused")
    model, tokenizer = load_for_training(config)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer, config


def one_prompt_model(work: Path, smoke: bool, layers: int | None = None):
    """What the batch-1 decode benchmarks run: the model (7B shape under a T4's cap, `layers` of its 32 decoder
    layers if given, or the tiny one with `smoke`), its tokenizer, and the first test description's prompt."""
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.packing import build_prompt

    name = f"llama2-7b-shaped{f'-{layers}-layers' if layers else ''}"
    model_path = build_checkpoint(work / name, smoke=smoke, layers=layers)
    cap_memory(None if smoke else T4_GIB)
    description = load_splits(Config.from_preset("colab-t4"))[0]["test"]["label"][0]
    model, tokenizer, _ = load_model(model_path, smoke)
    device = next(model.parameters()).device
    return model, tokenizer, tokenizer([build_prompt(description)], return_tensors="pt").input_ids.to(device)


def random_layer_and_token(rows: int, cols: int, dtype: torch.dtype):
    """A bitsandbytes NF4 layer (double-quantised, as the model loads them) of random weights on the GPU, a random
    token for it, and their product with the dequantised weight (the reference a kernel is checked against)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=dtype) * 0.02, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)  # fmt: skip
    layer = layer.cuda()
    x = torch.randn(1, 1, cols, dtype=dtype, device="cuda")
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer, x, (x.float() @ weight.float().t()).to(dtype)
