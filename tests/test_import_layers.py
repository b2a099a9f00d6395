"""Import layers: loading, exporting and distilling weights never import upward (lazy imports included)
or in a circle. Layers: config -> data, model -> train, eval -> use (export, embed, api, ...) -> cli."""

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
        up = {m for m in _imports(rel) if not m.startswith(("openseer.model.", "openseer.config", "openseer.fileio"))}
        assert not up, f"openseer/{rel} imports {sorted(up)}"


def test_export_vissl_quantize_and_distill_import_only_downward():
    use = {"openseer.export", "openseer.vissl", "openseer.quantize", "openseer.api", "openseer.embed",
           "openseer.cli", "openseer.use_cli", "openseer.run_report"}
    assert not _imports("distill.py") & use  # distill is a training method: below every use
    assert "openseer.export" not in _imports("vissl.py")  # export -> vissl, never back
    assert not _imports("export.py") & (use - {"openseer.vissl"})
    assert not _imports("quantize.py") & {"openseer.api", "openseer.cli", "openseer.use_cli", "openseer.distill"}
    assert not _imports("train/checkpoint.py") & use
