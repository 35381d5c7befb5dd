"""What Triton writes for our 4-bit kernels on each GPU generation, read without a GPU.

    python bench/kernel_instructions.py --out bench/results [--targets 75,80,90]   # CPU, ~1 minute
    python bench/kernel_instructions.py --smoke --out /tmp/b                       # one configuration
    python bench/kernel_instructions.py --kernel column-words --out bench/results  # the decode layout's kernel

Triton ships NVIDIA's `ptxas`, so a kernel compiles for any compute capability on a machine with no GPU. This
compiles `levers/few_tokens.py`'s kernel with each of its tuned configurations, for five tokens of a
double-quantised weight, with every pointer and size divisible by 16 (what Triton assumes at run time of
aligned tensors and of a 7B layer's sizes, and what lets it widen loads), and counts the instructions of the
compiled kernel (its loop body appears once) that decide its speed: global loads by width, shared-memory
stores, loads and barriers, tensor-core products, scalar multiply-adds, and asynchronous copies in the TTGIR.
Counts, not timings. They showed why the kernel's first tensor-core form ran 13x slower than bitsandbytes
(software pipelining had made one 4-byte asynchronous copy of each table lookup) and that for a T4 (sm_75)
Triton writes its products as scalar multiply-adds (bench/README.md, "Looking ahead").

`--kernel column-words` compiles `levers/column_words.py`'s one-token kernel instead, with its lookup in
registers (inline PTX, which NVIDIA's assembler then checks for each target), and counts its byte permutes and
three-input logic operations (the lookup), loads, multiply-adds and atomic adds.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from common import REPO, write_report

COUNTED = {  # name: pattern on a PTX line
    "global loads, 1-4 bytes": r"^\s*(@%p\d+\s+)?ld\.global(\.[a-z]+)*\.b(8|16|32)\b",
    "global loads, 8-16 bytes": r"^\s*(@%p\d+\s+)?ld\.global(\.[a-z]+)*\.v[24]\.b32\b",
    "shared stores": r"^\s*(@%p\d+\s+)?st\.shared",
    "shared loads": r"^\s*(@%p\d+\s+)?(ld\.shared|ldmatrix)",
    "barriers": r"^\s*bar\.sync",
    "tensor-core products": r"^\s*(@%p\d+\s+)?(mma|wgmma)\.",
    "scalar multiply-adds": r"^\s*fma\.rn\.f32",
    "byte permutes": r"^\s*prmt\.b32",
    "three-input logic": r"^\s*lop3\.b32",
    "atomic adds": r"^\s*(@%p\d+\s+)?(atom|red)\.global",
}
SIGNATURE = {"x_ptr": "*fp16", "packed_ptr": "*u8", "absmax_ptr": "*u8", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32",
             "offset_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": "*fp32", "rows": "i32", "cols": "i32"}


def compiled_counts(kernel, signature: dict, constants: dict, aligned: list[str], capability: int, warps: int,
                    stages: int):
    """Compile the Triton `kernel` (its pointer and size arguments typed by `signature`, those in `aligned` taken
    as divisible by 16) with `constants` for compute capability `capability` (75, 80, 90, ...); returns the
    COUNTED instructions of its PTX and the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    names = list(signature) + list(constants)
    source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    compiled = triton_compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": warps, "num_stages": stages})
    lines = compiled.asm["ptx"].splitlines()
    return {name: sum(bool(re.match(pattern, line)) for line in lines) for name, pattern in COUNTED.items()}, compiled


def instruction_counts(config, capability: int, tokens: int = 5) -> dict:
    """Compile the few-token kernel with one tuned `config` for compute capability `capability`."""
    from htmlgen_utils.levers.few_tokens import _kernel

    constants = {"TOKENS": tokens, "NESTED": True, "OUTER_BLOCK": 256, **config.kwargs}
    counts, compiled = compiled_counts(_kernel().fn, SIGNATURE, constants,
                                       [name for name in SIGNATURE if name != "offset_ptr"], capability,
                                       config.num_warps, config.num_stages)
    counts["asynchronous copies"] = compiled.asm["ttgir"].count("async_copy_global_to_local")
    return counts


COLUMN_WORDS_SIGNATURE = {"x_ptr": "*fp16", "words_ptr": "*i32", "absmax_ptr": "*fp32", "table_ptr": "*fp32",
                          "out_ptr": "*fp32", "rows": "i32", "cols": "i32"}


def column_words_counts(block_n: int, block_k: int, warps: int, capability: int) -> dict:
    """Compile the column-words kernel (NF4 lookup in registers) with one tile for compute capability
    `capability`."""
    import bitsandbytes.functional as F

    from htmlgen_utils.levers.column_words import _kernel, prmt_lookup_asm

    constants = {"BLOCK_N": block_n, "BLOCK_K": block_k, "ASM": prmt_lookup_asm(F.get_4bit_type("nf4", device="cpu"))}
    counts, compiled = compiled_counts(_kernel(), COLUMN_WORDS_SIGNATURE, constants, list(COLUMN_WORDS_SIGNATURE),
                                       capability, warps, 1)
    counts["weights a thread"] = block_n * block_k // (32 * warps)
    counts["machine code bytes"] = len(compiled.asm["cubin"])  # NVIDIA's assembler accepted the inline PTX
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--targets", default="75,80,90", help="compute capabilities")
    parser.add_argument("--smoke", action="store_true", help="the first configuration only")
    parser.add_argument("--kernel", choices=("few-tokens", "column-words"), default="few-tokens")
    args = parser.parse_args()
    import triton

    if args.kernel == "column-words":
        from htmlgen_utils.levers.column_words import CONFIGS

        report = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "targets": {}}
        for capability in [int(t) for t in args.targets.split(",")]:
            rows = report["targets"][f"sm_{capability}"] = {}
            for block_n, block_k, warps in CONFIGS[:1] if args.smoke else CONFIGS:
                key = f"BLOCK_N={block_n} BLOCK_K={block_k} warps={warps}"
                rows[key] = column_words_counts(block_n, block_k, warps, capability)
                print(f"sm_{capability} {key}: {rows[key]}", flush=True)
        write_report(report, args.out, "kernel_instructions_column_words.json")
        return

    from htmlgen_utils.levers.few_tokens import _kernel

    configs = _kernel().configs[:1] if args.smoke else _kernel().configs
    report: dict = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "tokens": 5, "targets": {}}
    for capability in [int(t) for t in args.targets.split(",")]:
        rows = report["targets"][f"sm_{capability}"] = {}
        for config in configs:
            key = (f"BLOCK_N={config.kwargs['BLOCK_N']} BLOCKS={config.kwargs['BLOCKS']} "
                   f"SPLIT_K={config.kwargs['SPLIT_K']} warps={config.num_warps} stages={config.num_stages}")
            rows[key] = instruction_counts(config, capability)
            print(f"sm_{capability} {key}: {rows[key]}", flush=True)
    write_report(report, args.out, "kernel_instructions.json")


if __name__ == "__main__":
    main()
