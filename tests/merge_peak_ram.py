"""Run by test_export: merge WARM_RUN_DIR (a tiny model: the imports and first-call costs), then RUN_DIR's adapter in
shards of SHARD_BYTES, and print the resident memory before and the peak during that second merge (Linux's VmRSS and
VmHWM, the peak reset after the warm-up)."""

import importlib
import json
import sys
from pathlib import Path

from htmlgen_utils import export

for module in ("safetensors.torch", "peft", "transformers", "huggingface_hub", "accelerate"):
    importlib.import_module(module)  # what the merge imports, loaded before measuring
export.merge_to_16bit(sys.argv[1], shard_bytes=int(sys.argv[3]))  # and what it imports lazily


def status(field: str) -> int:
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


Path("/proc/self/clear_refs").write_text("5")  # forget the peak of the imports and the warm-up
before = status("VmRSS:")
export.merge_to_16bit(sys.argv[2], shard_bytes=int(sys.argv[3]))
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
