"""What only Colab has: Google Drive for the run directory, secrets, and the kernel-port proxy for a server.

Each notebook opened from a Colab badge runs in its own runtime with its own disk, lost on disconnect, so on
Colab the run directory lives on Google Drive (`MyDrive/htmlgen/<run name>`), where every notebook of the series
and every later session finds it. Everything here is a no-op elsewhere; tests fake `google.colab`.
"""

from __future__ import annotations

import sys
from pathlib import Path

DRIVE_MOUNT_POINT = "/content/drive"
DRIVE_FOLDER = "htmlgen"  # runs live in MyDrive/htmlgen/<run name>


def on_colab() -> bool:
    return "google.colab" in sys.modules


def drive_run_dir(run_dir: str, mount_point: str | None = None) -> str:
    """Mount Google Drive (Colab asks the user to authorise the first time) and return where `run_dir` lives
    on it: an absolute `run_dir` is kept as given, a relative one becomes `MyDrive/htmlgen/<its last part>`."""
    from google.colab import drive  # type: ignore

    mount_point = mount_point or DRIVE_MOUNT_POINT
    if Path(run_dir).is_absolute():
        return run_dir
    drive.mount(mount_point)
    return str(Path(mount_point) / "MyDrive" / DRIVE_FOLDER / Path(run_dir).name)


def flush_drive(run_dir: str) -> None:
    """On Colab, with `run_dir` on Google Drive: write everything this runtime wrote there to Drive now and unmount
    it (`drive.flush_and_unmount`, Colab's way to be sure), so the next notebook, opened at once in its own runtime,
    finds every file. Elsewhere it does nothing."""
    if not on_colab() or not str(run_dir).startswith(DRIVE_MOUNT_POINT):
        return
    from google.colab import drive  # type: ignore

    drive.flush_and_unmount()
    print(
        f"Google Drive: {run_dir} written and unmounted; the next notebook can start (run this notebook's setup "
        f"cell again to use Drive here)"
    )


def colab_secret(name: str) -> str | None:
    """A Colab secret's value, or None when it is missing or this notebook may not read it (never printed)."""
    if not on_colab():
        return None
    try:
        from google.colab import userdata  # type: ignore

        return userdata.get(name) or None
    except Exception:  # SecretNotFoundError, NotebookAccessError: treated as absent, the checklist says what to do
        return None


def show_server_link(port: int, path: str = "/") -> str:
    """Make a server on this machine's `port` reachable from the user's browser and say where.

    On Colab the browser cannot reach the VM's 127.0.0.1; Colab's kernel-port proxy can, and
    `serve_kernel_port_as_window` prints a link through it. Elsewhere the local address is the link."""
    if on_colab():
        from google.colab import output  # type: ignore

        output.serve_kernel_port_as_window(port, path=path)
        return f"(Colab proxy to port {port}{path}: the link above)"
    url = f"http://127.0.0.1:{port}{path}"
    print(f"open {url}")
    return url
