"""Run the five notebooks in order, headless, with papermill.

    python -m htmlgen_utils.pipeline --preset tiny --run-dir runs/tiny
    python -m htmlgen_utils.pipeline --dataset my_pages.json -p max_steps 20

Executed copies go to `RUN_DIR/executed/`, every artifact (splits, packed blocks, adapter, history,
plots, metrics.json) to RUN_DIR. The chain stops at the first failing notebook and names it and the
failing cell.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import PACKAGE_DIR, REPO_DIR, Config

NOTEBOOKS = ("01_dataset_exploration", "02_prompts_and_packing", "03_qlora_model_setup", "04_training_loop",
             "05_evaluation_and_rendering")


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
                return (f"cell {index} ({source[0][:80] if source else ''!r}...): "
                        f"{output.get('ename')}: {output.get('evalue')}")
    return "no error cell recorded"


def run_pipeline(config: Config, notebooks: tuple[str, ...] = NOTEBOOKS, log_output: bool = False,
                 notebook_parameters: dict | None = None) -> dict:
    """Execute `notebooks` in order with the run's parameters (plus `notebook_parameters`, e.g.
    {"fresh_start": True}); return metrics.json's content (if written)."""
    import papermill as pm

    run_dir = Path(config.run_dir).resolve()
    executed_dir = run_dir / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    defaults = Config.from_preset(config.preset).to_dict()
    overrides = {k: v for k, v in config.to_dict().items()
                 if v != defaults.get(k) and k not in ("preset", "run_dir", "dataset")}
    parameters = {"preset": config.preset, "run_dir": str(run_dir), "dataset": config.dataset, "overrides": overrides,
                  **(notebook_parameters or {})}
    source_dir = notebook_dir()
    timings = {}
    for name in notebooks:
        started = time.perf_counter()
        output = executed_dir / f"{name}.ipynb"
        print(f"==> {name}", flush=True)
        try:
            pm.execute_notebook(str(source_dir / f"{name}.ipynb"), str(output), parameters=parameters,
                                cwd=str(source_dir), progress_bar=True, log_output=log_output, kernel_name="python3")
        except pm.PapermillExecutionError as error:
            where = " ".join(_failing_cell(output).split())  # one line, however long the error
            raise NotebookFailed(f"Notebook {name} failed at {where}. The executed copy with the full error is "
                                 f"{output}") from error
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"    done in {timings[name]} s", flush=True)
    (run_dir / "pipeline_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    metrics_file = run_dir / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.exists() else {}


def main(argv: list[str] | None = None) -> int:
    from .cli import config_from_args

    config, args = config_from_args(argv, "Run notebooks 01-05 in order with papermill.", pipeline=True)
    notebooks = NOTEBOOKS
    if args.notebooks:
        wanted = [n.strip() for n in args.notebooks.split(",") if n.strip()]
        notebooks = tuple(name for name in NOTEBOOKS if any(name.startswith(w) for w in wanted))
        unknown = [w for w in wanted if not any(name.startswith(w) for name in NOTEBOOKS)]
        if unknown or not notebooks:
            raise ValueError(f"--notebooks {args.notebooks!r}: no notebook starts with {unknown or wanted}; they are "
                             f"{', '.join(NOTEBOOKS)} (e.g. --notebooks 04,05)")
    if config.preset == "tiny":
        print("Running the 'tiny' preset on the CPU: the small pre-trained Llama shipped with the package and "
              f"the {config.dataset!r} dataset.")
    started = time.perf_counter()
    try:
        metrics = run_pipeline(config, notebooks)
    except NotebookFailed as error:
        print(f"\nFAILED: {error}", file=sys.stderr)
        return 1
    keys = ("rouge1", "rouge2", "rougeL", "token_accuracy", "html_valid_rate", "eval_loss")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    print(f"Chain finished in {time.perf_counter() - started:.0f} s; artifacts in {Path(config.run_dir).resolve()}")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
