"""The command line's frame: every command's --help shows an example and cites only what users get;
the parser and the argument checks import no torch (answers in well under a second); every
user-facing error is an ``OpenseerError`` that ``main`` turns into one line and exit status 2."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openseer import commands
from openseer.commands import build_parser, main
from openseer.config import ConfigError, OpenseerError
from openseer.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "faiss")


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _parsers(sub, (*path, name))


def test_every_command_is_in_the_table():
    names = {words[0] for words, _ in _parsers(build_parser())}
    assert names == {"recipes", "plan", "shard", "data", "index", "curate", "takedown", "pretrain", "distill", "doctor",
                     "eval", "report", "embed", "export", "import-seer", "select", "finetune", "predict"}
    subs = {words for words, _ in _parsers(build_parser()) if len(words) > 1}
    assert subs == {("data", "report"), ("takedown", "add"), ("takedown", "check")}


@pytest.mark.parametrize("words", [words for words, _ in _parsers(build_parser())], ids=" ".join)
def test_every_command_help_works_and_shows_an_example(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out, out
    example = out[out.index("examples:"):]
    assert f"openseer {' '.join(words)}" in example or f"openseer {words[0]} " in example, example
    assert "SEER.md" not in out  # users never get that file: cite docs/ or the paper


def test_top_level_help_works_from_python_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "openseer", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pretrain" in r.stdout and "examples:" in r.stdout


PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from openseer.commands import build_parser, main
parser = build_parser()
for words in json.loads(sys.argv[1]):
    try:
        parser.parse_args([*words, "--help"])
    except SystemExit:
        pass
seconds = time.perf_counter() - t0
codes = [main(argv) for argv in json.loads(sys.argv[2])]
print(json.dumps({"seconds": seconds, "codes": codes,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[3]))}))
"""


def test_parser_help_and_argument_checks_import_no_torch(tmp_path):
    """--help of every command, bad config keys, paths that do not exist and argument mistakes:
    answered without importing torch, torchvision, timm or faiss (the parser in well under a second)."""
    words = [list(w) for w, _ in _parsers(build_parser())]
    out = str(tmp_path / "run")
    mistakes = [
        ["pretrain", "--data", str(tmp_path / "nowhere"), "--out", out],  # bad path
        ["pretrain", "--out", out, "optim.no_such_key=1"],  # bad config key
        ["pretrain", "--recipe", "no-such-recipe", "--out", out],  # bad recipe
        ["pretrain", "--data", "fashion-mnist"],  # no --out
        ["pretrain", "--resume", out, "--out", out],  # --resume with --out
        ["pretrain", "--resume", str(tmp_path / "absent")],  # no run there
        ["distill", "--resume", str(tmp_path / "absent")],
        ["plan", "--gpus", "8", "--gpu-mem-gb", "80", "swav.nope=3"],
        ["distill", "--out", out],  # no teacher, no student
        ["eval", "--data", "fashion-mnist"],  # no weights
        ["export", "runs/a"],  # no output
        ["export", "runs/a", "--out", "a.onnx", "--calibrate", "/pile"],  # --calibrate without --int8
        ["export", "runs/a", "--out", "a.onnx", "--int8", "--calibrate", str(tmp_path / "nowhere")],
        ["eval", "regnetx_002", "--data", str(tmp_path / "nowhere")],
        ["embed", "regnetx_002", "--data", str(tmp_path / "nowhere"), "--out", out],
        ["curate", str(tmp_path / "nowhere"), "--out", out, "--model", "regnetx_002"],
        ["report", str(tmp_path / "nowhere")],
        ["import-seer", str(tmp_path / "nowhere.torch"), "--out", str(tmp_path / "w.safetensors")],
    ]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(words), json.dumps(mistakes), json.dumps(HEAVY)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], got["heavy"]
    assert got["codes"] == [2] * len(mistakes), (got["codes"], r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("openseer: error: ")]
    assert len(errors) == len(mistakes), r.stderr
    assert "does not exist" in errors[0] and "no_such_key" in errors[1]
    assert all(str(tmp_path / "nowhere") in e for e in errors[-6:]), errors[-6:]
    assert got["seconds"] < 1.0, got  # the parser and every --help: typically about 0.1 s


@pytest.mark.parametrize("message", ["what went wrong and where", "a message\nthat the error itself splits"])
def test_an_openseer_error_in_a_command_is_one_line_and_exit_2(monkeypatch, capsys, message):
    class SomethingWrong(OpenseerError):
        pass

    def broken(args):
        raise SomethingWrong(message)

    monkeypatch.setattr(commands.train, "cmd_recipes", broken)
    assert main(["recipes"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"openseer: error: {message.splitlines()[0]}")
    assert "Traceback" not in out.err and out.out == ""
    if "\n" not in message:
        assert out.err.count("\n") == 1


def test_an_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.train, "cmd_recipes", interrupted)
    assert main(["recipes"]) == 130
    assert capsys.readouterr().err == "openseer: interrupted\n"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every ``class ...Error(`` in openseer/."""
    found = []
    for f in sorted((ROOT / "openseer").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                module = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                found.append((module, node.name))
    return found


def test_every_user_facing_error_is_an_openseer_error(monkeypatch, capsys):
    found = _error_classes()
    assert len(found) >= 17  # ConfigError, DataError, CheckpointError, RunError, EvalError, ...
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        if cls is OpenseerError:
            continue
        assert issubclass(cls, OpenseerError), f"{module}.{name} does not subclass OpenseerError"
        assert issubclass(cls, (ValueError, RuntimeError)), f"{module}.{name} lost its builtin base"

        def raise_it(args, cls=cls):
            raise cls(f"{cls.__name__} said what and where")

        monkeypatch.setattr(commands.train, "cmd_recipes", raise_it)
        assert main(["recipes"]) == 2, name
        assert capsys.readouterr().err == f"openseer: error: {name} said what and where\n"


def test_parser_defaults_are_the_library_defaults():
    """The parser repeats a few constants so that it imports no torch; they must stay the library's."""
    from openseer.commands import evaluate, weights
    from openseer.eval import knn, lowshot, runner
    from openseer.use import export

    assert weights.FORMATS == export.FORMATS
    assert evaluate.PROTOCOLS == runner.PROTOCOLS
    assert evaluate.LOWSHOT_PROTOCOLS == runner.LOWSHOT_PROTOCOLS
    assert evaluate.DEFAULT_KS == knn.DEFAULT_KS
    assert evaluate.TEMPERATURE == knn.TEMPERATURE
    settings = lowshot.FinetuneSettings()
    assert evaluate.FINETUNE == {k: getattr(settings, k) for k in evaluate.FINETUNE}


def test_one_device_resolver(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^--device cuda but no CUDA GPU is visible; use --device cpu$"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^device=cuda but no CUDA GPU is visible; use device=cpu$"):
        resolve_device("cuda", option="device=")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_embed_on_cuda_without_a_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["embed", "regnetx_002", "--data", str(tmp_path), "--out", str(tmp_path / "e"),
                 "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "openseer: error: --device cuda but no CUDA GPU is visible; use --device cpu\n"


def _example_lines() -> list[str]:
    lines = set()
    for _words, parser in _parsers(build_parser()):
        for line in (parser.epilog or "").splitlines():
            line = re.split(r"\s#\s", line.strip())[0].strip()
            if line.startswith("openseer ") and "COMMAND" not in line:
                lines.add(line)
    return sorted(lines)


@pytest.mark.parametrize("line", _example_lines())
def test_every_example_parses(line):
    """The examples in --help are command lines the parser accepts (arguments, not results)."""
    import shlex

    argv = [a for a in shlex.split(line)[1:] if a != "..."]
    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in x and not x.startswith("-") for x in extra), extra
    assert callable(args.func)


def test_nothing_users_get_cites_a_file_outside_the_repo():
    """Code, help texts, recipes, README and docs cite docs/ or the papers (docs/history/ keeps old notes)."""
    files = [*ROOT.glob("openseer/**/*.py"), *ROOT.glob("openseer/recipes/*.yaml"), ROOT / "README.md",
             *(p for p in ROOT.glob("docs/**/*.md") if "history" not in p.parts), *ROOT.glob("examples/*.py")]
    assert len(files) > 50
    citing = [str(p.relative_to(ROOT)) for p in files if "SEER.md" in p.read_text(encoding="utf-8")]
    assert citing == []
