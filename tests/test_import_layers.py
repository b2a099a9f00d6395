"""Import layers: loading, exporting and distilling weights never import upward (lazy imports included)
or in a circle. Layers: config, rundir -> data -> model -> train, eval -> use (export, embed, api, ...) -> commands;
nothing imports the commands."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "openseer"


def _imports(rel: str) -> set[str]:
    """Every openseer module that ``openseer/rel`` imports, at the top or inside a function."""
    path = ROOT / rel
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = pkg.split(".")
            target = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("openseer"):
            found.add(node.module)
    return {m for m in found if (ROOT.parent / (m.replace(".", "/") + ".py")).is_file()}


def test_model_layer_reads_weights_without_reaching_up():
    for rel in ("model/load.py", "model/checkpoint_file.py", "model/backbone.py", "model/swav.py"):
        up = {m for m in _imports(rel) if not m.startswith(("openseer.model.", "openseer.config", "openseer.fileio",
                                                            "openseer.rundir"))}
        assert not up, f"openseer/{rel} imports {sorted(up)}"


def test_export_vissl_quantize_and_distill_import_only_downward():
    use = {"openseer.use.export", "openseer.use.vissl", "openseer.use.quantize", "openseer.use.api",
           "openseer.use.embed", "openseer.commands", "openseer.commands.weights", "openseer.use.run_report"}
    assert not _imports("train/distill.py") & use  # distill is a training method: below every use
    assert not _imports("train/methods/distill.py") & use
    assert "openseer.use.export" not in _imports("use/vissl.py")  # export -> vissl, never back
    assert not _imports("use/export.py") & (use - {"openseer.use.vissl"})
    assert not _imports("use/quantize.py") & {"openseer.use.api", "openseer.commands", "openseer.commands.weights",
                                               "openseer.train.distill"}
    assert not _imports("train/checkpoint.py") & use


# Every module's layer (the longest matching name wins): a module imports only from its own layer or
# below, and no two modules import each other, even through others or lazily inside a function.
LAYERS = (
    # 0: typed config (+ OpenseerError), files written atomically, the progress helper, the run directory's
    # layout, the device resolver
    ("config", "fileio", "progress", "rundir", "device"),
    ("data",),  # 1: a pile of images -> batches (never the model)
    ("model",),  # 2: backbone, head, prototypes, checkpoint files
    ("train", "eval"),  # 3: the one loop and its methods (pretrain, distill) that fit weights, and measuring them
    ("use",),  # 4: using the features: export, quantize, vissl, embed, api, run_report, plan, doctor, curate, select
    ("commands", "__main__", ""),  # 5: the command line (and the package root)
)


def _graph() -> dict[str, set[str]]:
    """openseer module (dotted, without 'openseer.') -> the openseer modules it imports."""
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        base = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        base = [b for b in base if b]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = base[:len(base) - node.level + 1] + ([node.module] if node.module else [])
                    target = ".".join(target)
                elif (node.module or "").startswith("openseer"):
                    target = node.module.removeprefix("openseer").lstrip(".")
                else:
                    continue
                names = [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.removeprefix("openseer").lstrip(".") for a in node.names if a.name.startswith("openseer")]
            else:
                continue
            out |= {m for m in names if m in mods and m != name}
        graph[name] = out
    return graph


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".") or n == "") and len(n) > best:
                best, rank = len(n), i
    return rank


def test_every_module_imports_only_its_own_layer_or_below():
    up = [f"{m} (layer {_layer(m)}) -> {t} (layer {_layer(t)})"
          for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)]
    assert not up, "imports that reach up a layer:\n" + "\n".join(sorted(up))


def test_no_import_cycles_in_the_package():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_nothing_imports_the_commands():
    """The commands are the top: only ``python -m openseer`` (``__main__``) and the commands themselves
    import them; a library function never reaches the command line."""
    users = sorted(m for m, targets in _graph().items()
                   if any(t == "commands" or t.startswith("commands.") for t in targets)
                   and m != "__main__" and not (m == "commands" or m.startswith("commands.")))
    assert not users, f"modules that import openseer.commands: {users}"
    assert "commands" in _graph()["__main__"]
