"""htmlgen: fine-tune a Llama-2-7B-class model with 4-bit QLoRA to write HTML from a description.

One module per concern of the data flow:
    config      -> the `Config` dataclass and its presets
    data        -> load, validate, dedupe, split              (notebook 01)
    packing     -> prompt template, tokenisation, packing     (notebook 02)
    model       -> 4-bit load, LoRA                           (notebook 03)
    loss, train, checkpoints, tracking, export
                -> the hand-written amp training loop         (notebook 04)
    distributed -> the same loop data-parallel under torchrun
    generation, evaluation, layout, rendering, plots          (notebook 05)
    levers      -> speed and memory levers, apart from the plain path
    stages      -> the run directory between notebooks
    colab, notebook, repository -> Colab, the notebooks' helpers, the repository's address
    cli, pipeline, serve -> the command lines, the five notebooks with papermill, the HTTP query API
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes announces, on every CPU import, that an optional hub-hosted CPU kernel is missing; the standard
# kernels it falls back to are what we use, so the notice is noise in every notebook.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# Offline (HF_HUB_OFFLINE: the CPU chain, the tests), the `kernels` package that bitsandbytes' import asks for its
# hub-hosted kernels logs that it skips a publisher check it cannot make offline: nothing a user can act on.
_logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "Skipping publisher trust check" not in record.getMessage()
)
