"""What every ``ctlens`` sub-command shares: errors, threads, devices, outputs, progress.

Light on purpose (standard library only at import time): the command line imports it to
build its parsers, and ``ctlens --help`` must answer without loading torch.

- `UsageError`: a bad argument or environment; ``ctlens`` prints it as one line and exits 2.
- `lazy_runner`: a sub-command's ``func`` that imports its implementation only when run.
- `HelpFormatter`: every option's help states its default once.
- `DEFAULT_MODEL`, `add_n_examples`, `check_model_and_task`: what ``discover`` and ``tune``
  share (one default model, one name for the example count, names checked before torch).
- `positive_int`: an argparse ``type`` for counts.
- `default_threads` / `apply_threads`: the CPU thread count every command runs with.
- `check_device`: ``--device cuda`` on a machine without CUDA fails before any work.
- `check_output`: ``--out`` must be writable and of the right kind (file or directory).
- `phase`: a phase name on stderr, then its wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from ctlens.files import describe_path
from ctlens.types import DEVICE_TYPES

OutputKind = Literal["file", "dir"]

DEFAULT_MODEL = "zoo:tiny-gpt2"
"""The model ``discover`` and ``tune`` use without ``--model``: one story across both, with
``discover`` finding its agreement circuit and ``tune`` flipping that behaviour."""


class UsageError(ValueError):
    """A bad argument, device or output path; the message says what to change."""


class HelpFormatter(argparse.HelpFormatter):
    """Ends an option's help with ``(default: X)`` unless its text already names the default,
    the default is unset (None, False) or the option is required: said once, never twice."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (text is None or text == argparse.SUPPRESS or "default" in text
                or not action.option_strings or action.required or action.default is None
                or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_n_examples(parser: argparse.ArgumentParser, default: int, help_text: str) -> None:
    """``--n-examples N`` (into ``args.n``), the one documented spelling; ``--n`` stays as a
    hidden alias (torchrun, the documented launcher, takes a bare ``--n`` as its own)."""
    parser.add_argument("--n-examples", dest="n", type=positive_int, default=default,
                        metavar="N", help=help_text)
    parser.add_argument("--n", dest="n", type=positive_int, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


def check_model_and_task(args: argparse.Namespace) -> None:
    """Refuse an unknown ``--model`` or ``--task`` before torch is imported (a typo then
    fails in a fraction of a second, not after the 3 s import and a model load)."""
    from ctlens.model_source import check_source
    from ctlens.tasks.catalog import check_name

    check_source(args.model)
    check_name(args.task)


def lazy_runner(target: str) -> Callable[[argparse.Namespace], int]:
    """A sub-command ``func`` that imports ``"package.module:function"`` when it runs.

    Lets a command module stay light (its parser is built for every ``ctlens --help``)
    while its implementation pulls in torch and friends only when the command is used.
    """
    module_name, _, attr = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module_name), attr)(args) or 0)

    run.__qualname__ = run.__name__ = f"lazy_runner({target!r})"
    return run


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1 (argparse turns the error into a usage line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def memory_size(text: str) -> int:
    """argparse ``type`` of ``--max-memory``: bytes or a size such as ``8GB`` or ``7.5GiB``
    (`ctlens.memory.parse_bytes`, imported only when the flag is given)."""
    from ctlens.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a memory size such as 8GB, 7.5GiB or 512MiB, got {text!r}"
        ) from None


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once).

    Reads the CPU affinity and Linux's topology files; elsewhere, the logical CPU count.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores: set[str] = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int:
    """CPU threads when ``--threads`` is not given.

    ``OMP_NUM_THREADS`` when set (cluster schedulers set it), otherwise the physical cores
    this process may use minus one, at least 1: torch's own default (every physical core)
    makes its threads wait on each other as soon as anything else runs, which on a small
    shared machine made a tuning run several times slower than one thread.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, physical_cores() - 1)


def apply_threads(threads: int | None) -> int:
    """Use ``threads`` (or `default_threads`) CPU threads for torch; returns the number.

    Before torch is imported this only sets ``OMP_NUM_THREADS`` (torch reads it when it
    loads, and worker processes inherit it), so commands that never need torch stay light.
    """
    n = default_threads() if threads is None else threads
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    elif torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` torch cannot use here, before any model is loaded."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available, use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(
                f"--device {device}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available, use --device cpu")
    elif parsed.type not in DEVICE_TYPES:
        raise UsageError(f"--device {device}: ctlens runs on {', '.join(DEVICE_TYPES)}, not on "
                         f"{parsed.type} devices; use --device cpu or cuda")


def check_output(path: str | Path, kind: OutputKind, flag: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written as a ``kind``; returns it.

    A file output must not be a directory; a directory output must not be a file; and the
    directory that would receive it (the nearest existing ancestor, since missing parents
    are created) must accept a new file, which is tried for real, so a read-only file
    system or a missing permission is reported now and not after minutes of work.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise UsageError(f"{flag} {path} is {describe_path(path)}, not a file; name a file "
                         "(inside it, for example)")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is {describe_path(path)}, not a directory; give a "
                         "directory (new, empty, or one this command wrote before)")
    target = path if kind == "dir" else path.parent
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ctlens-write-check.", dir=existing)
    except OSError as err:
        reason = describe_os_error(err, with_path=False)
        raise UsageError(f"{flag} {path}: cannot write in {existing}: {reason}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path


def describe_os_error(err: OSError, with_path: bool = True) -> str:
    """One line for an ``OSError``: what happened, in words, and (``with_path``) to which path."""
    reasons = {
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "no space left on the device (the disk is full)",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EISDIR: "it is a directory, not a file",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.ENOENT: "no such file or directory",
    }
    reason = reasons.get(err.errno or -1) or err.strerror or str(err)
    return f"{reason} ({err.filename})" if with_path and err.filename else reason


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Print ``name ...`` on stderr, then the phase's wall time when it ends."""
    print(f"{name} ...", end=" ", flush=True, file=sys.stderr)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print("failed", file=sys.stderr)
        raise
    print(f"{time.perf_counter() - start:.2f}s", file=sys.stderr)
