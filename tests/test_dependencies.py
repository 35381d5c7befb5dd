"""The one dependency list tells the truth: its torch lower bound admits no version without an API we call."""

import re

from htmlgen_utils.config import PACKAGE_DIR, REPO_DIR

# torch APIs the package calls, and the release that brought each
TORCH_APIS = {
    "torch.library.custom_op": (2, 4),
    "flex_attention": (2, 5),  # torch.nn.attention.flex_attention with BlockMask and create_block_mask
    "torch.amp.GradScaler": (2, 3),
    "torch.compiler.is_compiling": (2, 3),
    "torch.compiler.disable": (2, 1),
}


def declared(name: str) -> tuple[int, ...]:
    """The lower bound pyproject.toml gives `name` (its dependencies are one quoted requirement a line)."""
    text = (REPO_DIR / "pyproject.toml").read_text()
    bound = re.search(rf'^\s*"{name}>=([\d.]+)"', text, re.MULTILINE).group(1)
    return tuple(int(part) for part in bound.split("."))


def test_torch_lower_bound_covers_every_torch_api_the_package_calls():
    source = "\n".join(path.read_text() for path in PACKAGE_DIR.rglob("*.py"))
    used = {api: version for api, version in TORCH_APIS.items() if api in source}
    assert "flex_attention" in used  # the table reads the package, not itself
    needed = max(used.values())
    assert declared("torch") >= needed, f"torch>={'.'.join(map(str, needed))} is needed by {used}"


def test_requirements_and_setup_install_the_package_with_its_dependencies():
    requirements = [line.split("#")[0].strip() for line in (REPO_DIR / "requirements.txt").read_text().splitlines()]
    assert [line for line in requirements if line] == ["-e .[dev,browser]"]
    setup = (REPO_DIR / "setup.sh").read_text()
    assert '-e ".[dev,browser]"' in setup and "--no-deps" not in setup
