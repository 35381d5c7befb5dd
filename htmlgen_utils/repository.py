"""Where htmlgen lives: the one place the repository's address is written, and the way to point a fork's badges
and notebook setup cells at the fork.

    python -m htmlgen_utils.repository https://github.com/YOU/htmlgen [--branch main]

rewrites this constant, every notebook's "Open in Colab" badge and `repo_url` parameter, and the README's badges.
A test checks that all of them agree with `REPOSITORY_URL`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

REPOSITORY_URL = "https://github.com/htmlgen/htmlgen"
BRANCH = "main"

_GITHUB = re.compile(r"^https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?$")


def colab_badge_url(notebook: str, repository_url: str = REPOSITORY_URL, branch: str = BRANCH) -> str:
    """The address that opens `notebooks/<notebook>.ipynb` of the repository in Colab."""
    owner, name = _owner_and_name(repository_url)
    return f"https://colab.research.google.com/github/{owner}/{name}/blob/{branch}/notebooks/{notebook}.ipynb"


def _owner_and_name(repository_url: str) -> tuple[str, str]:
    match = _GITHUB.match(repository_url)
    if not match:
        raise ValueError(
            f"{repository_url!r} is not a GitHub repository address like https://github.com/OWNER/NAME "
            f"(Colab opens notebooks from GitHub)"
        )
    return match.group(1), match.group(2)


def point_at(repository_url: str, branch: str, repo_dir: Path) -> list[Path]:
    """Rewrite the constant, the notebooks and the README under `repo_dir` to `repository_url`; returns the files
    changed."""
    _owner_and_name(repository_url)
    old_owner, old_name = _owner_and_name(REPOSITORY_URL)
    new_owner, new_name = _owner_and_name(repository_url)
    old_badge = re.compile(
        rf"colab\.research\.google\.com/github/{re.escape(old_owner)}/{re.escape(old_name)}/blob/"
        rf"{re.escape(BRANCH)}/"
    )
    new_badge = f"colab.research.google.com/github/{new_owner}/{new_name}/blob/{branch}/"
    changed = []
    files = [
        repo_dir / "htmlgen_utils" / "repository.py",
        repo_dir / "README.md",
        *sorted((repo_dir / "notebooks").glob("*.ipynb")),
        *sorted((repo_dir / "notebooks" / "executed").glob("*.ipynb")),
    ]  # their copies with outputs too
    for path in files:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        new = old_badge.sub(new_badge, text).replace(f'"{REPOSITORY_URL}"', f'"{repository_url}"')
        new = new.replace(f'\\"{REPOSITORY_URL}\\"', f'\\"{repository_url}\\"')  # inside notebook JSON strings
        if path.name == "repository.py":
            new = new.replace(f'BRANCH = "{BRANCH}"', f'BRANCH = "{branch}"')
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> None:
    from .config import REPO_DIR

    parser = argparse.ArgumentParser(description="Point the notebooks' badges and setup cells at a fork.")
    parser.add_argument("url", help="the fork, e.g. https://github.com/YOU/htmlgen")
    parser.add_argument("--branch", default="main", help="the branch Colab opens (default main)")
    parser.add_argument("--repo-dir", default=str(REPO_DIR), help="the clone to rewrite (default: this one)")
    args = parser.parse_args(argv)
    for path in point_at(args.url, args.branch, Path(args.repo_dir)):
        print(f"rewrote {path}")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
