"""Run by test_export: merge RUN_DIR's adapter in shards of SHARD_BYTES and print the resident memory before and the
peak during the merge (Linux's VmRSS and VmHWM, the peak reset after the imports)."""

import importlib
import json
import sys
from pathlib import Path

from htmlgen_utils import export

for module in ("safetensors.torch", "peft", "transformers", "huggingface_hub", "accelerate"):
    importlib.import_module(module)  # what the merge imports, loaded before measuring


def status(field: str) -> int:
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


Path("/proc/self/clear_refs").write_text("5")  # forget the peak of the imports
before = status("VmRSS:")
export.merge_to_16bit(sys.argv[1], shard_bytes=int(sys.argv[2]))
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
