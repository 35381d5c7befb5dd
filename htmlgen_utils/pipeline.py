"""Run the five notebooks in order, headless, with papermill.

    python -m htmlgen_utils.pipeline --preset tiny --run-dir runs/tiny
    python -m htmlgen_utils.pipeline --dataset my_pages.json -p max_steps 20
    python -m htmlgen_utils.pipeline --preset tiny --publish   # refresh notebooks/executed/ (committed copies)

Executed copies go to `RUN_DIR/executed/`, every artifact (splits, packed blocks, adapter, history,
plots, metrics.json) to RUN_DIR. The chain stops at the first failing notebook and names it and the
failing cell.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from .config import PACKAGE_DIR, REPO_DIR, Config

NOTEBOOKS = (
    "01_dataset_exploration",
    "02_prompts_and_packing",
    "03_qlora_model_setup",
    "04_training_loop",
    "05_evaluation_and_rendering",
)


def notebook_dir() -> Path:
    for candidate in (REPO_DIR / "notebooks", PACKAGE_DIR / "notebooks"):
        if (candidate / f"{NOTEBOOKS[0]}.ipynb").exists():
            return candidate
    raise FileNotFoundError("The notebooks/ folder was not found: run the pipeline from a clone of the repository")


class NotebookFailed(RuntimeError):
    pass


def _failing_cell(executed: Path) -> str:
    import nbformat

    notebook = nbformat.read(str(executed), as_version=4)
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                source = cell.source.strip().splitlines()
                return (
                    f"cell {index} ({source[0][:80] if source else ''!r}...): "
                    f"{output.get('ename')}: {output.get('evalue')}"
                )
    return "no error cell recorded"


CHAIN_RECORD = "chain_record.json"
FINGERPRINTED = ("htmlgen_utils", "notebooks", "data", "pyproject.toml")
COMPUTING_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers")


def code_fingerprint() -> str:
    """A hash of everything that decides a chain's outputs: the package with its shipped tiny models, the notebooks
    (not their executed copies), the bundled data, and the versions of the packages that compute."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for root in map(REPO_DIR.joinpath, FINGERPRINTED):
        files = sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []
        for file in files:
            if file.is_file() and not {"__pycache__", "executed"} & set(file.parts):
                digest.update(str(file.relative_to(REPO_DIR)).encode() + b"\0" + file.read_bytes())
    for package in COMPUTING_PACKAGES:
        try:
            digest.update(f"{package}=={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package} absent".encode())
    return digest.hexdigest()


def run_pipeline(
    config: Config,
    notebooks: tuple[str, ...] = NOTEBOOKS,
    log_output: bool = False,
    notebook_parameters: dict | None = None,
) -> dict:
    """Execute `notebooks` in order with the run's parameters (plus `notebook_parameters`, e.g.
    {"fresh_start": True}); return metrics.json's content (if written)."""
    import papermill as pm

    run_dir = Path(config.run_dir).resolve()
    fresh = not (run_dir / "adapter").exists() and not (run_dir / "data").exists()  # nothing made by older code
    (run_dir / CHAIN_RECORD).unlink(missing_ok=True)
    executed_dir = run_dir / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    defaults = Config.from_preset(config.preset).to_dict()
    overrides = {
        k: v for k, v in config.to_dict().items() if v != defaults.get(k) and k not in ("preset", "run_dir", "dataset")
    }
    parameters = {
        "preset": config.preset,
        "run_dir": str(run_dir),
        "dataset": config.dataset,
        "overrides": overrides,
        **(notebook_parameters or {}),
    }
    source_dir = notebook_dir()
    timings = {}
    for name in notebooks:
        started = time.perf_counter()
        output = executed_dir / f"{name}.ipynb"
        print(f"==> {name}", flush=True)
        try:
            pm.execute_notebook(
                str(source_dir / f"{name}.ipynb"),
                str(output),
                parameters=parameters,
                cwd=str(source_dir),
                progress_bar=True,
                log_output=log_output,
                kernel_name="python3",
            )
        except pm.PapermillExecutionError as error:
            where = " ".join(_failing_cell(output).split())  # one line, however long the error
            raise NotebookFailed(
                f"Notebook {name} failed at {where}. The executed copy with the full error is {output}"
            ) from error
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"    done in {timings[name]} s", flush=True)
    (run_dir / "pipeline_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    if fresh and notebooks == NOTEBOOKS and not notebook_parameters:  # what made this whole run, end to end
        made_by = {"code": code_fingerprint(), "parameters": {k: v for k, v in parameters.items() if k != "run_dir"}}
        (run_dir / CHAIN_RECORD).write_text(json.dumps(made_by, indent=2) + "\n")
    metrics_file = run_dir / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.exists() else {}


EXECUTED_DIR = REPO_DIR / "notebooks" / "executed"
PUBLISHED_NOTE = (
    "> **An executed copy, to read before you run anything.** The outputs below come from the `tiny` preset on a "
    "CPU: a 4M-parameter Llama shipped with the package, fine-tuned on the bundled data in about a minute, made by "
    "`python -m htmlgen_utils.pipeline --preset tiny --publish`. On a Colab T4 the same cells load Llama-2-7B in "
    "4 bits: bigger numbers, minutes per training step, and pages from a real model. To run it, open "
    "[the notebook itself](../{name}.ipynb)."
)


def publish_executed(run_dir: Path, shown_run_dir: str, out_dir: Path = EXECUTED_DIR) -> list[Path]:
    """Copy the executed notebooks of `run_dir/executed` to `out_dir` for readers: a first cell saying where the
    outputs come from, papermill's injected parameters and timing metadata removed (the parameters cell shows the
    defaults a reader starts from), and this machine's paths replaced (the run directory by `shown_run_dir`, the
    repository by nothing)."""
    import site

    import nbformat

    replacements = [
        (str(run_dir.resolve()), shown_run_dir),
        (str(REPO_DIR) + "/", ""),
        (str(REPO_DIR), "."),
        *((path + "/", "") for path in site.getsitepackages()),
        (tempfile.gettempdir() + "/", ""),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in NOTEBOOKS:
        notebook = nbformat.read(str(run_dir / "executed" / f"{name}.ipynb"), as_version=4)
        notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
        for cell in notebook.cells:
            cell.metadata.pop("papermill", None)
            cell.metadata.pop("execution", None)
            if cell.cell_type == "code":
                cell.outputs = [_without_paths(output, replacements) for output in cell.outputs]
        notebook.cells.insert(0, nbformat.v4.new_markdown_cell(PUBLISHED_NOTE.format(name=name)))
        for index, cell in enumerate(notebook.cells):
            cell["id"] = f"{name[:2]}-run-{index:02d}"
        notebook.metadata.pop("papermill", None)
        path = out_dir / f"{name}.ipynb"
        nbformat.write(notebook, str(path))
        written.append(path)
    return written


def _without_paths(output, replacements: list[tuple[str, str]]):
    """A cell output with this machine's absolute paths replaced, in its text and its text-like data."""

    def clean(text: str) -> str:
        for old, new in replacements:
            text = text.replace(old, new)
        return text

    if "text" in output:
        output["text"] = clean(output["text"])
    for key, value in output.get("data", {}).items():
        if key.startswith("text/") and isinstance(value, str):
            output["data"][key] = clean(value)
    if "traceback" in output:
        output["traceback"] = [clean(line) for line in output["traceback"]]
    return output


def main(argv: list[str] | None = None) -> int:
    from .cli import config_from_args

    config, args = config_from_args(argv, "Run notebooks 01-05 in order with papermill.", pipeline=True)
    notebooks = NOTEBOOKS
    if args.notebooks:
        wanted = [n.strip() for n in args.notebooks.split(",") if n.strip()]
        notebooks = tuple(name for name in NOTEBOOKS if any(name.startswith(w) for w in wanted))
        unknown = [w for w in wanted if not any(name.startswith(w) for name in NOTEBOOKS)]
        if unknown or not notebooks:
            raise ValueError(
                f"--notebooks {args.notebooks!r}: no notebook starts with {unknown or wanted}; they are "
                f"{', '.join(NOTEBOOKS)} (e.g. --notebooks 04,05)"
            )
    if config.preset == "tiny":
        print(
            "Running the 'tiny' preset on the CPU: the small pre-trained Llama shipped with the package and "
            f"the {config.dataset!r} dataset."
        )
    started = time.perf_counter()
    publishing = tempfile.TemporaryDirectory() if args.publish else None
    if publishing is not None:  # a fresh run, whatever runs/ holds, so every notebook shows its outputs
        config = config.replace(run_dir=str(Path(publishing.name) / config.preset))
    try:
        metrics = run_pipeline(config, notebooks)
        if publishing is not None:
            for path in publish_executed(Path(config.run_dir), f"runs/{config.preset}"):
                print(f"published {path.relative_to(REPO_DIR)}")
    except NotebookFailed as error:
        print(f"\nFAILED: {error}", file=sys.stderr)
        return 1
    finally:
        if publishing is not None:
            publishing.cleanup()
    keys = ("rouge1", "rouge2", "rougeL", "token_accuracy", "html_valid_rate", "eval_loss")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    what, where = (
        ("executed copies", EXECUTED_DIR.relative_to(REPO_DIR))
        if args.publish
        else ("artifacts", Path(config.run_dir).resolve())
    )
    print(f"Chain finished in {time.perf_counter() - started:.0f} s; {what} in {where}")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
