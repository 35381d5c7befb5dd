"""The Colab path, with what only Colab has faked: a stub `google.colab` (Drive mounted on a temp folder, secrets,
the kernel-port proxy recorded) and a faked GPU for the preset choice."""

import json
import re
import shutil
import sys
import types

import nbformat
import pytest
import requests
import torch

from htmlgen_utils import colab
from htmlgen_utils.config import REPO_DIR, TINY_BASE_DIR, Config, choose_preset
from htmlgen_utils.pipeline import NOTEBOOKS
from htmlgen_utils.repository import REPOSITORY_URL, colab_badge_url, point_at


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """`google.colab` with drive, userdata and output; Drive 'mounts' under tmp_path/drive."""
    calls = {"mounted": [], "served": [], "secrets": {}}
    google = types.ModuleType("google")
    google.__path__ = []
    package = types.ModuleType("google.colab")
    package.__path__ = []
    drive = types.ModuleType("google.colab.drive")
    userdata = types.ModuleType("google.colab.userdata")
    output = types.ModuleType("google.colab.output")

    def mount(point):
        calls["mounted"].append(point)
        (tmp_path / "drive" / "MyDrive").mkdir(parents=True, exist_ok=True)

    class SecretNotFoundError(Exception):
        pass

    def get(name):
        if name not in calls["secrets"]:
            raise SecretNotFoundError(name)
        return calls["secrets"][name]

    drive.mount = mount
    userdata.get = get
    output.serve_kernel_port_as_window = lambda port, path="/": calls["served"].append((port, path))
    package.drive, package.userdata, package.output = drive, userdata, output
    google.colab = package
    for name, module in {
        "google": google,
        "google.colab": package,
        "google.colab.drive": drive,
        "google.colab.userdata": userdata,
        "google.colab.output": output,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(colab, "DRIVE_MOUNT_POINT", str(tmp_path / "drive"))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    return calls


def fake_gpu(monkeypatch, capability, name="Tesla T4"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # True on a T4 too


# ---------------------------------------------------------------------------------------------- 2. the preset
@pytest.mark.parametrize(
    "capability, preset, precision",
    [
        ((7, 5), "colab-t4", "fp16"),
        ((8, 0), "ampere-bf16", "bf16"),
        ((9, 0), "ampere-bf16", "bf16"),
        (None, "tiny", "fp32"),
    ],
)
def test_auto_preset_follows_compute_capability_not_bf16_emulation(monkeypatch, capability, preset, precision):
    from htmlgen_utils.model import resolve_precision

    fake_gpu(monkeypatch, capability)
    chosen, why = choose_preset()
    assert chosen == preset
    assert resolve_precision("auto") == precision
    if capability == (7, 5):
        assert "compute capability 7.5" in why and "no native bfloat16" in why


def test_setup_prints_the_gpu_the_preset_and_why(monkeypatch, capsys, tmp_path):
    from htmlgen_utils.notebook import setup

    fake_gpu(monkeypatch, (7, 5))
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=0: types.SimpleNamespace(total_memory=15 * 2**30)
    )
    config = setup("auto", str(tmp_path / "run"))
    printed = capsys.readouterr().out
    assert config.preset == "colab-t4" and config.precision == "fp16"
    assert "Tesla T4, compute capability 7.5, 15.0 GiB" in printed and "'colab-t4'" in printed


# ---------------------------------------------------------------------------------------------- 1. install source
def notebook_sources(name):
    return nbformat.read(str(REPO_DIR / "notebooks" / f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_badges_and_install_cells_name_the_one_repository(name):
    notebook = notebook_sources(name)
    assert colab_badge_url(name) in notebook.cells[0].source
    parameters = notebook.cells[1].source
    assert f'repo_url: str = "{REPOSITORY_URL}"' in parameters
    readme = (REPO_DIR / "README.md").read_text()
    assert colab_badge_url(name) in readme
    assert not re.search(r"github\.com/(?!htmlgen/htmlgen)[\w-]+/[\w-]+/blob", readme)  # no stray copies


def test_setup_cell_installs_from_repo_url_with_visible_pip_output(fake_colab, monkeypatch, tmp_path):
    """The setup cell as IPython runs it: on Colab without the package it runs `%pip install` (whose output shows
    in the cell) from `repo_url`; then `setup` puts the run directory on the fake Drive."""
    import importlib.util

    from IPython.core.inputtransformer2 import TransformerManager

    magics = []
    source = TransformerManager().transform_cell(notebook_sources("02_prompts_and_packing").cells[2].source)
    namespace = {
        "preset": "tiny",
        "run_dir": "my-run",
        "dataset": "bundled",
        "overrides": {},
        "use_drive": True,
        "repo_url": REPOSITORY_URL,
    }
    # IPython expands {names} in a magic's line from the cell's namespace, then runs it
    namespace["get_ipython"] = lambda: types.SimpleNamespace(
        run_line_magic=lambda name, line, *a: magics.append((name, line.format(**namespace)))
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "htmlgen_utils" else real_find_spec(name, *a)
    )
    exec(source, namespace)
    assert magics == [("pip", f'install "git+{REPOSITORY_URL}"')]
    assert namespace["config"].run_dir == str(tmp_path / "drive" / "MyDrive" / "htmlgen" / "my-run")
    assert fake_colab["mounted"] == [str(tmp_path / "drive")]
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)  # installed: no second install
    exec(source, {**namespace, "get_ipython": None})


def test_run_dir_stays_on_the_runtime_disk_only_when_asked(fake_colab, capsys, tmp_path, monkeypatch):
    from htmlgen_utils.notebook import setup

    monkeypatch.chdir(tmp_path)  # the relative run directory (and the settings saved in it) land here
    config = setup("tiny", "local-run", use_drive=False)
    assert config.run_dir == "local-run" and fake_colab["mounted"] == []
    assert "lost on disconnect" in capsys.readouterr().out
    absolute = setup("tiny", str(tmp_path / "elsewhere"))
    assert absolute.run_dir == str(tmp_path / "elsewhere")


def test_a_fork_rewrites_every_badge_and_setup_cell(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(REPO_DIR / "notebooks", clone / "notebooks")
    (clone / "htmlgen_utils").mkdir()
    shutil.copy(REPO_DIR / "htmlgen_utils" / "repository.py", clone / "htmlgen_utils" / "repository.py")
    shutil.copy(REPO_DIR / "README.md", clone / "README.md")
    changed = point_at("https://github.com/someone/htmlgen-fork", "dev", clone)
    assert len(changed) == 2 + 2 * len(NOTEBOOKS)  # the notebooks and their executed copies
    for name in NOTEBOOKS:
        notebook = nbformat.read(str(clone / "notebooks" / f"{name}.ipynb"), as_version=4)
        assert (
            "colab.research.google.com/github/someone/htmlgen-fork/blob/dev/notebooks/" + name
            in notebook.cells[0].source
        )
        assert 'repo_url: str = "https://github.com/someone/htmlgen-fork"' in notebook.cells[1].source
        assert "htmlgen/htmlgen" not in json.dumps(notebook)
    assert (
        'REPOSITORY_URL = "https://github.com/someone/htmlgen-fork"'
        in (clone / "htmlgen_utils" / "repository.py").read_text()
    )
    assert "github/htmlgen/htmlgen" not in (clone / "README.md").read_text()
    with pytest.raises(ValueError, match="GitHub repository"):
        point_at("https://gitlab.com/x/y", "main", clone)


# ---------------------------------------------------------------------------------------------- 6. the checklist
def test_checklist_says_what_to_do_on_a_cpu_colab_runtime(fake_colab, monkeypatch, tmp_path):
    from htmlgen_utils.notebook import checklist, setup

    fake_gpu(monkeypatch, None)
    lines = checklist(Config.from_preset("colab-t4", run_dir="local"))
    assert lines[0].startswith("TODO") and "Change runtime type -> T4 GPU" in lines[0]
    assert lines[1].startswith("TODO") and "HF_TOKEN" in lines[1] and "NousResearch/Llama-2-7b-hf" in lines[1]
    assert lines[2].startswith("TODO") and "Google Drive" in lines[2]
    fake_colab["secrets"]["HF_TOKEN"] = "hf_secret_value"
    config = setup("tiny", "run")  # on the fake Drive
    lines = checklist(config.replace(model_id="meta-llama/Llama-2-7b-hf"))
    assert lines[1].startswith("ok") and lines[2].startswith("ok") and "(Google Drive)" in lines[2]
    assert "hf_secret_value" not in "\n".join(lines)


def test_gated_model_message_uses_the_notebook_syntax_inside_a_notebook(monkeypatch):
    from htmlgen_utils.model import gated_help

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert "-p model_id NousResearch/Llama-2-7b-hf" in gated_help("meta-llama/Llama-2-7b-hf")
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert 'overrides={"model_id": "NousResearch/Llama-2-7b-hf"}' in gated_help("meta-llama/Llama-2-7b-hf")


# ---------------------------------------------------------------------------------------------- 5. 4-bit checkpoints
def test_training_starts_from_a_checkpoint_saved_in_4bit(tiny_config, tmp_path):
    """A model saved already quantised (like a hub '...-bnb-4bit' copy: a third of the download) loads as it is and
    trains; merging refuses it, with the reason."""
    from htmlgen_utils.export import check_merge_possible
    from htmlgen_utils.model import load_base_model, load_tokenizer, saved_quantization
    from htmlgen_utils.train import run_training

    base = Config.from_preset("tiny", run_dir=str(tmp_path / "unused"))
    saved = tmp_path / "tiny-bnb-4bit"
    load_base_model(base).save_pretrained(saved)
    load_tokenizer(base.model_id).save_pretrained(saved)
    size = sum(p.stat().st_size for p in saved.iterdir())
    original = sum(p.stat().st_size for p in TINY_BASE_DIR.iterdir())
    assert saved_quantization(str(saved))["load_in_4bit"] and saved_quantization(str(TINY_BASE_DIR)) is None
    assert size < original
    config = tiny_config.replace(model_id=str(saved), max_steps=2, checkpoint_every=0)
    state = run_training(config)
    assert state.step == 2 and all(not h["skipped"] for h in state.history if "loss" in h)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="stored in 4-bit"):
        check_merge_possible(config)


def test_merge_refuses_when_the_16bit_base_does_not_fit_in_ram(monkeypatch):
    from htmlgen_utils import export

    config = Config.from_preset("tiny")
    export.check_merge_possible(config)  # the tiny model fits anywhere
    monkeypatch.setattr(export, "available_ram_bytes", lambda: 1_000_000)
    with pytest.raises(ValueError, match=r"needs about 0\.0 GB of RAM and this machine has 0\.0 GB"):
        export.check_merge_possible(config)
    with pytest.raises(ValueError, match="merge_after_training"):
        from htmlgen_utils.train import run_training

        run_training(config.replace(merge_after_training=True, run_dir="/nonexistent/run"))  # before any training


# ---------------------------------------------------------------------------------------------- 7. time
def test_training_time_estimate_shows_its_arithmetic(capsys):
    from htmlgen_utils.notebook import estimate_training_time

    config = Config.from_preset("colab-t4", block_size=2048, max_example_tokens=2048)
    estimate = estimate_training_time(config, train_blocks=268, base_parameters=6_738_415_616)
    assert estimate["tokens_per_step"] == 4 * 2048 and estimate["steps_per_epoch"] == 67
    assert estimate["seconds_per_step"] == pytest.approx(8192 * 6 * 6_738_415_616 / 20e12)
    printed = capsys.readouterr().out
    assert "estimate" in printed and "assumed 20 TFLOP/s" in printed and "~17 s a step" in printed
    planned = estimate_training_time(config, train_blocks=268, base_parameters=6_738_415_616, recompute_saved=0.25)
    assert planned["seconds_per_step"] == pytest.approx(0.75 * estimate["seconds_per_step"])
    assert "(1 - 25% recompute the memory plan removes)" in capsys.readouterr().out


def test_quick_evaluation_is_the_default_on_a_t4():
    from htmlgen_utils.notebook import evaluation_settings

    t4, quick = evaluation_settings(Config.from_preset("colab-t4", max_new_tokens=4096), None, "auto")
    assert quick and t4.max_test_examples == 8 and t4.max_new_tokens == 768
    full, quick = evaluation_settings(Config.from_preset("colab-t4", max_new_tokens=4096), None, "off")
    assert not quick and full.max_test_examples == 32 and full.max_new_tokens == 4096
    assert not evaluation_settings(Config.from_preset("tiny", max_new_tokens=700), None, "auto")[1]


# ---------------------------------------------------------------------------------------------- 8. the API from Colab
def test_api_started_from_the_notebook_is_shown_through_the_colab_proxy(fake_colab):
    from htmlgen_utils.model import load_base_model, load_tokenizer
    from htmlgen_utils.serve import BackgroundServer, create_app

    config = Config.from_preset("tiny")
    app = create_app(load_base_model(config).eval(), load_tokenizer(config.model_id), max_new_tokens_cap=16)
    api = BackgroundServer(app, port=8765)
    try:
        colab.show_server_link(api.port)
        assert fake_colab["served"] == [(8765, "/")]
        assert requests.get(f"{api.url}/health", timeout=10).json()["status"] == "ok"
        answer = requests.post(f"{api.url}/query", json={"user_prompt": "A login page"}, timeout=60).json()
        assert answer["tokens"] <= 16
    finally:
        api.stop()
    assert not api.thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{api.url}/health", timeout=5)


# ------------------------------------------------------------------------------------------ 9. one place for settings
def test_later_notebooks_read_the_run_directorys_settings(monkeypatch, capsys, tmp_path):
    """The first notebook saves the run's settings; a later one (preset 'auto', none repeated) gets them back, with
    only its own overrides on top, and says so."""
    from htmlgen_utils.notebook import setup

    fake_gpu(monkeypatch, None)
    first = setup("tiny", str(tmp_path / "run"), overrides={"block_size": 512, "max_example_tokens": 512})
    assert (tmp_path / "run" / "htmlgen_config.json").exists()
    capsys.readouterr()
    later = setup("auto", str(tmp_path / "run"), overrides={"max_new_tokens": 24})
    assert "run directory's htmlgen_config.json" in capsys.readouterr().out
    assert later.replace(max_new_tokens=0) == first and later.max_new_tokens == 24


def test_auto_on_a_cpu_runtime_keeps_a_t4_run_and_colab_cpu_picks_the_t4_preset(fake_colab, monkeypatch, tmp_path):
    """A learner saving GPU quota: on a Colab runtime without a GPU `auto` picks `colab-t4` (01-02 need only the
    tokenizer), a run directory set up for a T4 keeps its settings there, and 03-05 say how to get a GPU."""
    from htmlgen_utils.notebook import setup

    fake_gpu(monkeypatch, None)
    assert choose_preset()[0] == "colab-t4"
    first = setup("auto", str(tmp_path / "t4-run"))
    assert first.preset == "colab-t4" and first.block_size == 4096
    monkeypatch.delitem(sys.modules, "google.colab")  # a CPU machine elsewhere: auto alone would say 'tiny'
    assert choose_preset()[0] == "tiny"
    assert setup("auto", str(tmp_path / "t4-run")) == first
    with pytest.raises(RuntimeError, match="needs a GPU"):
        setup("auto", str(tmp_path / "t4-run"), needs_gpu=True)


def test_notebook_05_leaves_the_api_running_and_honours_its_overrides():
    """Run all must not stop the server whose link it just printed; its generation settings come from `config`
    (the run's settings with the notebook's overrides), not from the config notebook 04 saved."""
    notebook = notebook_sources("05_evaluation_and_rendering")
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "api.stop()" not in code.replace("# api.stop()", "")
    assert "api.stop()" in notebook.cells[-1].source  # told, in words, how to stop it
    assert "trained." not in code  # every setting is read from `config`


def test_checkpoints_a_learner_can_count_on():
    """The colab-t4 plan for the bundled data (162 blocks of 4,096 Llama-2 tokens, bench/results'
    token_counts_llama2 file) writes at least 4 checkpoints before its last step, and validates a few times."""
    from htmlgen_utils.train import cadence, describe_cadence, plan_steps

    counts = json.loads(next((REPO_DIR / "bench" / "results").glob("*_token_counts_llama2_cpu.json")).read_text())
    config = Config.from_preset("colab-t4")
    _, _, total = plan_steps(counts["blocks"]["train"], config)
    every, validate = cadence(config, total)
    assert len(range(every, total, every)) >= 4 and 3 <= len(range(validate, total + 1, validate)) <= 5
    assert config.checkpoint_minutes <= 10 and "10 minutes" in describe_cadence(config, total)
    for steps in (5, 7, 40, 41, 333):
        every, _ = cadence(config, steps)
        assert len(range(every, steps, every)) >= 4, steps
