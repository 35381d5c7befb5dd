"""`python -m htmlgen_utils.train` as torchrun starts it on each rank, watched: every file or folder a rank other
than 0 creates or opens for writing under the run directory is listed in HTMLGEN_TEST_WRITES/rank<N>.txt
(Python's audit hooks see each open, mkdir, rename and removal, also those of the libraries), each micro-batch
run under DDP's `no_sync` adds a line to HTMLGEN_TEST_WRITES/no_sync_rank<N>.txt, and with HTMLGEN_TEST_STOP_AT
the run stops after that many steps, as an interrupted run would (`train`'s `stop_when`)."""

import os
import sys

from torch.nn.parallel import DistributedDataParallel

from htmlgen_utils import train as train_module
from htmlgen_utils.cli import run_cli

rank = int(os.environ["RANK"])
run_dir = os.path.realpath(os.environ["HTMLGEN_TEST_RUN_DIR"])
record = os.path.join(os.environ["HTMLGEN_TEST_WRITES"], f"rank{rank}.txt")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside_run_dir(path) -> bool:
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(run_dir + os.sep)
    except (TypeError, ValueError):
        return False  # a file descriptor


def watch(event: str, args: tuple) -> None:
    path, writes = None, False
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        path, mode, flags = args
        writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
    elif event == "os.mkdir":
        path, writes = args[0], not os.path.exists(os.fsdecode(args[0]))
    elif event in ("os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        path, writes = args[0], True
    if writes and _inside_run_dir(path):
        with open(record, "a") as handle:  # outside the run directory: not itself recorded
            handle.write(f"{event} {os.fsdecode(path)}\n")


if rank != 0:
    sys.addaudithook(watch)

real_no_sync = DistributedDataParallel.no_sync


def counted_no_sync(self):
    with open(os.path.join(os.environ["HTMLGEN_TEST_WRITES"], f"no_sync_rank{rank}.txt"), "a") as handle:
        handle.write("no_sync\n")
    return real_no_sync(self)


DistributedDataParallel.no_sync = counted_no_sync

if os.environ.get("HTMLGEN_TEST_STOP_AT"):
    stop_at = int(os.environ["HTMLGEN_TEST_STOP_AT"])
    real_train = train_module.train

    def train_until(*args, **kwargs):
        return real_train(*args, **kwargs, stop_when=lambda state: state.step >= stop_at)

    train_module.train = train_until

run_cli(train_module.main)
