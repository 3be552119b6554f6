"""The ``ctlens`` command as a user meets it, and the package face it stands on.

Imports are checked in fresh interpreters (``sys.modules`` after the fact, never the clock):
``import ctlens`` and every ``--help`` must not load torch, plotly or the tuner. Bad
arguments and environments end in one line on stderr and exit status 2, before any work.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ctlens
from ctlens import cli
from ctlens.cli import support as cli_support
from ctlens.cli.support import UsageError, check_output, default_threads, physical_cores

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ctlens"
HEAVY = ("torch", "transformers", "plotly", "tokenizers")


def _fresh(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a new interpreter with this checkout first on the path; its stdout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _loaded(imports: str) -> set[str]:
    """Names in ``sys.modules`` after running ``imports`` in a fresh interpreter."""
    out = _fresh(f"{imports}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")
    return set(json.loads(out.splitlines()[-1]))


# --- the lazy face -----------------------------------------------------------------------


def test_import_ctlens_loads_nothing_heavy() -> None:
    loaded = _loaded("import ctlens")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert not {m for m in loaded if m.startswith("ctlens.") and m not in
                {"ctlens._lazy", "ctlens._version"}}


def test_import_graph_loads_no_plotly_tuner_or_zoo() -> None:
    loaded = _loaded("import ctlens.graph")
    assert "plotly" not in loaded and "transformers" not in loaded
    bad = {m for m in loaded if m.startswith(("ctlens.tuning", "ctlens.zoo", "ctlens.viz"))}
    assert not bad, bad


def test_every_help_loads_no_torch() -> None:
    """``ctlens --help`` and each sub-command's (nested ones too) in one fresh process."""
    out = _fresh(
        "import argparse, json, sys\n"
        "from ctlens.cli import build_parser, main\n"
        "def commands(parser, prefix):\n"
        "    yield prefix\n"
        "    for action in parser._actions:\n"
        "        if isinstance(action, argparse._SubParsersAction):\n"
        "            for name, child in action.choices.items():\n"
        "                yield from commands(child, prefix + [name])\n"
        "seen = []\n"
        "for argv in commands(build_parser(), []):\n"
        "    try:\n"
        "        main(argv + ['--help'])\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, argv\n"
        "    seen.append(' '.join(argv))\n"
        f"print(json.dumps([seen, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    seen, heavy = json.loads(out.splitlines()[-1])
    assert {"", "discover", "tune", "report", "diff", "zoo", "zoo list", "zoo train"} <= set(seen)
    assert heavy == []


def test_python_dash_m_ctlens_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "ctlens", "--version"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"ctlens {ctlens.__version__}"


def _type_checking_names(init: Path) -> dict[str, str]:
    """Name -> module of the imports under ``if TYPE_CHECKING:`` in a package ``__init__``."""
    names: dict[str, str] = {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.module:
                    names |= {alias.asname or alias.name: stmt.module for alias in stmt.names}
    return names


@pytest.mark.parametrize("package", ["ctlens", "ctlens.tasks", "ctlens.tuning", "ctlens.viz"])
def test_lazy_names_resolve_and_match_the_static_list(package: str) -> None:
    """Every ``__all__`` name resolves, ``dir()`` lists it, the TYPE_CHECKING imports (what
    type checkers and the API docs see) name the same objects, and unknown names fail."""
    import importlib

    module = importlib.import_module(package)
    init = PACKAGE.joinpath(*package.split(".")[1:], "__init__.py")
    static = _type_checking_names(init)
    assert set(static) <= set(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is not None and name in dir(module)
        if name in static:
            source = importlib.import_module(static[name])
            assert getattr(source, name) is value, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_public_names_are_the_defining_objects() -> None:
    from ctlens.attribution import attribute
    from ctlens.circuit import Circuit
    from ctlens.tuning.runner import CircuitTuner

    assert ctlens.attribute is attribute and ctlens.Circuit is Circuit
    assert ctlens.CircuitTuner is CircuitTuner and ctlens.tasks.load.__module__ == (
        "ctlens.tasks.bundle")


def test_tasks_tokenizer_is_the_function_even_after_its_module_loads() -> None:
    out = _fresh("import ctlens.tasks.tokenizer, ctlens.tasks, inspect\n"
                 "print(inspect.isfunction(ctlens.tasks.tokenizer))")
    assert out.strip() == "True"


def _package_faces() -> dict[str, set[str]]:
    """For each package ``__init__``: the names it re-exports (imports or lazy tables)."""
    faces: dict[str, set[str]] = {}
    for init in PACKAGE.rglob("__init__.py"):
        name = ".".join(init.relative_to(ROOT).parent.parts)
        tree = ast.parse(init.read_text())
        exported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
                exported |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Dict):
                exported |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        faces[name] = exported - {"TYPE_CHECKING", "lazy_exports", "annotations"}
    return faces


def test_library_never_imports_upward_through_a_package_face() -> None:
    """Inside ctlens, names come from their defining modules: no ``import ctlens``, and no
    name that ``ctlens/__init__`` (or the module's own package's ``__init__``) only
    re-exports, so no face sits in an import cycle. Submodules may be imported by name."""
    faces = _package_faces()
    offences = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        upward = {".".join(parts[:i]) for i in range(1, len(parts))}
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                offences += [f"{where} import {a.name}" for a in node.names if a.name == "ctlens"]
            elif isinstance(node, ast.ImportFrom) and node.module in upward:
                package_dir = ROOT.joinpath(*node.module.split("."))
                bad = {a.name for a in node.names if a.name in faces[node.module]
                       and not (package_dir / a.name).is_dir()
                       and not (package_dir / f"{a.name}.py").is_file()}
                offences += [f"{where} from {node.module} import {n}" for n in sorted(bad)]
    assert not offences, offences


def test_zoo_training_does_not_import_the_zoo_command_line() -> None:
    source = (PACKAGE / "zoo" / "train.py").read_text()
    assert "ctlens.cli.zoo" not in source


# --- shared command-line plumbing --------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    """Exit status 2 and one error line, the last on stderr (finished phases may precede it)."""
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert "Traceback" not in "".join(lines), lines
    assert [line for line in lines if "error" in line] == [err], lines
    assert err.startswith(f"ctlens {argv[0]}"), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a command gets as far as loading a model: the checks come first."""
    import ctlens.model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command loaded a model before checking its arguments")

    monkeypatch.setattr(ctlens.model, "load_model", refuse)


@pytest.mark.usefixtures("no_model_load")
def test_out_of_the_wrong_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    _one_line_error(capsys, ["discover", "--out", str(tmp_path)], "is a directory")
    _one_line_error(capsys, ["discover", "--out", str(a_file / "c.json")], "is a file")
    _one_line_error(capsys, ["diff", "a.json", "b.json", "-o", str(tmp_path)], "is a directory")
    _one_line_error(capsys, ["report", str(tmp_path), "-o", str(tmp_path)], "is a directory")
    _one_line_error(capsys, ["tune", "--out", str(a_file)], "is a file")
    _one_line_error(capsys, ["zoo", "train", "tiny-gpt2", "--out", str(a_file)], "is a file")
    assert a_file.read_text() == "mine"


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/ro`` behaves as on a read-only file system (the tests run as root, which a
    chmod would not stop): creating anything inside it raises EROFS."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def open_(path: str | os.PathLike, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).startswith(str(ro)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return ro


@pytest.mark.usefixtures("no_model_load")
def test_read_only_file_system(read_only: Path, capsys: pytest.CaptureFixture) -> None:
    run = read_only / "run"
    run.mkdir()
    _one_line_error(capsys, ["discover", "--out", str(read_only / "c.json")], "read-only")
    _one_line_error(capsys, ["report", str(run)], "read-only", "RUN_DIR")
    _one_line_error(capsys, ["report", str(run), "-o", str(read_only / "r.html")], "read-only")
    _one_line_error(capsys, ["diff", "a.json", "b.json", "-o", str(read_only / "d.html")],
                    "read-only")
    _one_line_error(capsys, ["tune", "--out", str(read_only / "tuned")], "read-only")
    _one_line_error(capsys, ["tune", "--out", str(run)], "read-only")  # resuming there
    assert sorted(p.name for p in read_only.iterdir()) == ["run"]


def test_nothing_is_left_by_the_write_check(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new" / "deeper" / "c.json", "file") == (
        tmp_path / "new" / "deeper" / "c.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_model_load")
def test_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                           tmp_path: Path) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["discover", "--device", "cuda"],
                 ["tune", "--device", "cuda:0", "--out", str(tmp_path / "run")]):
        _one_line_error(capsys, argv, "CUDA is not available, use --device cpu")
    _one_line_error(capsys, ["discover", "--device", "gpu"], "not a torch device")


def test_bad_counts_are_usage_errors(capsys: pytest.CaptureFixture) -> None:
    for argv in (["discover", "--n", "0"], ["discover", "--threads", "-1"],
                 ["report", "run", "--top", "x"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == max(1, physical_cores() - 1)
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_every_command_gets_the_default_threads() -> None:
    """A command that never loads torch still passes the count on to what it starts."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", "import os, sys\nfrom ctlens.cli import main\n"
         "code = main(['zoo', 'list'])\n"
         "print(os.environ['OMP_NUM_THREADS'], 'torch' in sys.modules)\nsys.exit(code)"],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        timeout=120)
    assert done.returncode == 0, done.stderr
    threads, torch_loaded = done.stdout.splitlines()[-1].split()
    assert int(threads) == max(1, physical_cores() - 1) and torch_loaded == "False"


def test_errors_name_what_happened() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/x")
    assert cli._one_line(full) == "no space left on the device (the disk is full) (/data/run/x)"
    assert cli._one_line(KeyError("unknown task 'x'")) == "unknown task 'x'"
    assert cli._one_line(UsageError("a\nb")) == "a b"


def test_lazy_runner_imports_on_call() -> None:
    run = cli_support.lazy_runner("ctlens.cli.support:positive_int")
    assert run("7") == 7  # type: ignore[arg-type]
    assert "ctlens.cli.support" in run.__name__


# --- discover, end to end on a zoo model -------------------------------------------------


def test_discover_top_n_is_checked_before_attribution(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import ctlens.attribution

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("attribution ran before --top-n was checked")

    monkeypatch.setattr(ctlens.attribution, "attribute", refuse)
    err = _one_line_error(capsys, ["discover", "--model", "zoo:tiny-gpt2", "--top-n", "100000"],
                          "--top-n=100000 is out of range")
    assert "valid edges (802)" in err


def test_discover_prints_phases_and_saves_the_circuit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sub" / "c.json"
    argv = ["discover", "--model", "zoo:tiny-gpt2", "--n", "8", "--batch-size", "8",
            "--top", "5", "--top-n", "7", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    for phase in ("loading zoo:tiny-gpt2 ...", "building task 'agreement' (8 examples) ...",
                  "attributing (eap, corrupt ablation) ..."):
        assert phase in captured.err
    assert captured.err.count("s\n") >= 3
    assert "top 5 edges by |score|" in captured.out
    assert ctlens.Circuit.load(out).n_edges == 7


def test_discover_learned_prints_and_saves_the_learned_circuit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "learned.json"
    argv = ["discover", "--model", "zoo:tiny-gpt2", "--n", "16", "--batch-size", "16",
            "--method", "learned", "--top", "4", "--top-n", "20", "--steps", "150",
            "--lr", "0.3", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "learning a circuit of 20 edges (corrupt ablation) ..." in captured.err
    assert "top 4 edges by open probability" in captured.out
    circuit = ctlens.Circuit.load(out)
    learning = circuit.metadata["learning"]
    assert circuit.n_edges == 20 and learning["steps"] == 150 and learning["lr"] == 0.3
    assert f"faithfulness {learning['faithfulness']:.3f}" in captured.out
    _one_line_error(capsys, ["discover", "--objective", "metric"],
                    "--objective is for --method learned, not eap")
    _one_line_error(capsys, ["discover", "--method", "learned", "--max-memory", "1GB"],
                    "does not use it")


def test_a_write_that_fails_late_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full)
    argv = ["discover", "--model", "zoo:tiny-gpt2", "--n", "4", "--batch-size", "4",
            "--top", "3", "--out", str(tmp_path / "c.json")]
    _one_line_error(capsys, argv, "the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_discover_max_memory_chunks_senders_and_keeps_the_scores(
    capsys: pytest.CaptureFixture,
) -> None:
    """--max-memory reaches attribution: under 150KB one example's buffer of tiny-gpt2's 28
    senders no longer fits, so they are scored in groups, with the same top edges."""
    argv = ["discover", "--model", "zoo:tiny-gpt2", "--n", "4", "--batch-size", "4",
            "--top", "8", "--threads", "1"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert "within max_memory" not in plain
    assert cli.main([*argv, "--max-memory", "150KB"]) == 0
    fitted = capsys.readouterr().out
    assert "within max_memory: float32 sender buffer, batches of 1, senders in groups of 10" \
        in fitted
    assert fitted.split("\nwithin max_memory")[0] == plain  # the same edges and scores
    _one_line_error(capsys, [*argv, "--max-memory", "90KB"], "even with one sender per pass")
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--max-memory", "lots"])
    assert stop.value.code == 2
    assert "expected a memory size such as 8GB" in capsys.readouterr().err


# --- report and diff ---------------------------------------------------------------------


def test_report_and_diff_print_their_phases(tmp_path: Path, capsys: pytest.CaptureFixture
                                            ) -> None:
    from test_viz import make_run  # the run-directory writer of the viz tests

    run = make_run(tmp_path / "run")
    assert cli.main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"reading {run} ..." in err
    assert "drawing 4 circuit snapshots and writing the report ..." in err
    assert (run / "report.html").is_file()
    snapshots = sorted((run / "circuits").iterdir())
    out = tmp_path / "d.html"
    assert cli.main(["diff", str(snapshots[0]), str(snapshots[-1]), "-o", str(out)]) == 0
    assert "drawing and writing the diff ..." in capsys.readouterr().err and out.is_file()


def test_tune_max_memory_reaches_the_config(capsys: pytest.CaptureFixture) -> None:
    """``ctlens tune --max-memory`` is TuneConfig.max_memory (what task discovery passes to
    `ctlens.attribute`); a bad size is a usage error before anything runs."""
    import argparse

    from ctlens.cli.tune import add_tune_command
    from ctlens.tuning.config import TuneConfig

    parser = argparse.ArgumentParser(prog="ctlens")
    add_tune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--out", "run", "--max-memory", "1.5GiB"])
    assert args.max_memory == int(1.5 * 2**30)
    assert parser.parse_args(["tune", "--out", "run"]).max_memory is None
    with pytest.raises(ValueError, match="is not a size"):
        TuneConfig(max_memory="lots")
    with pytest.raises(SystemExit) as stop:
        cli.main(["tune", "--out", "run", "--max-memory", "3 parsecs"])
    assert stop.value.code == 2
    assert "expected a memory size" in capsys.readouterr().err
