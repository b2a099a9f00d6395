"""``openseer report RUN_DIR``: one self-contained HTML page about a run (works offline).

Sections, each skipped with a note when its input is missing:

1. the run: architecture, recipe, step, batch, prototypes, schedule;
2. training curves from ``metrics.jsonl``: loss (with ln K, the collapse level), learning rate,
   images/s, prototypes in use (each row also a point when there are few, so a short run shows);
3. the evaluation table with its baselines, from ``RUN_DIR/eval.json`` (``openseer eval``);
4. what the clusters mean: the latest checkpoint's SwAV model is run on a seeded sample of the
   training data (``--data`` overrides the run's source); each image's softmax over the prototypes
   (scores / temperature) assigns it; for the most-used prototypes, the images most strongly
   assigned to each;
5. nearest neighbours (cosine on pooled backbone features) of a few sample queries;
6. a 2-D map (PCA; t-SNE with ``--map tsne`` when scikit-learn is installed) of the embeddings,
   coloured by label when the data has labels (Fashion-MNIST), else by prototype.

Figures are matplotlib PNGs and image grids are PIL PNGs, all embedded as base64 ``data:`` URIs.
A few lines of inline script only mark images that failed to decode (``data-broken-images``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.decode import DataError
from ..rundir import CONFIG, EVAL, METRICS, REPORT, SCHEDULE, load_run_config, read_json, read_metrics

TILE = 64
CURVE = "#1f77b4"  # the training curves' colour
FEW_ROWS = 30  # metrics rows up to which each row is also drawn as a point


class ReportError(DataError):
    """A run directory the report cannot be made for (what and how to fix it)."""


# ---------------------------------------------------------------- small helpers


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return _png(buf.getvalue())


def _pil_png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return _png(buf.getvalue())


def _esc(x) -> str:
    return html.escape(str(x))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- sections


def curves_section(metrics: list[dict], n_prototypes: int | None) -> str:
    if not metrics:
        return "<p class=note>No metrics.jsonl in the run directory: no training curves.</p>"
    plt = _plt()
    steps = np.array([m["step"] for m in metrics])
    panels = [("loss", "SwAV loss"), ("lr", "learning rate"), ("imgs_per_s", "images / s"),
              ("prototypes_used", "prototypes in use (per logged window)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        ys = np.array([m.get(key, np.nan) if m.get(key) is not None else np.nan for m in metrics], dtype=float)
        # a short run logs a row or two: a line through one point draws nothing, so few rows get points
        ax.plot(steps, ys, lw=1.5, color=CURVE, marker="o" if len(steps) <= FEW_ROWS else None, ms=5)
        if len(steps) == 1:  # one step: a visible range around it, not matplotlib's 0-width axis
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        if np.isnan(ys).all():
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes,
                    color="#7f7f7f", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        if key == "loss":
            lnk = next((m["ln_k"] for m in metrics if m.get("ln_k")), None)
            if lnk:
                ax.axhline(lnk, ls="--", color="#d62728", lw=1, label=f"ln K = {lnk:.2f} (collapse level)")
                ax.legend(fontsize=8)
        if key == "prototypes_used" and n_prototypes:
            ax.axhline(n_prototypes, ls="--", color="#7f7f7f", lw=1, label=f"K = {n_prototypes}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    last = metrics[-1]
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "lr", "imgs_per_s", "prototypes_used",
                                                         "assign_entropy") if isinstance(last.get(k), (int, float)))
    return (f"<img class=wide alt='training curves' src='{_fig_png(fig)}'>"
            f"<p class=small>{len(metrics)} logged steps; last (step {last['step']}): {_esc(summary)}</p>")


def eval_section(doc: dict | None) -> str:
    if doc is None:
        return "<p class=note>No eval.json in the run directory: run <code>openseer eval RUN_DIR</code> to add it.</p>"
    from ..eval.report import MODELS, cell, row_name, small_set_notes, split_label

    results = doc.get("results", [])
    models = [m for m in MODELS if any(r.get("model") == m for r in results)]

    rows: list[tuple[str, str]] = []
    for r in results:
        if (row_name(r), r["split"]) not in rows:
            rows.append((row_name(r), r["split"]))
    head = "".join(f"<th>{_esc(MODELS[m])}</th>" for m in models)
    body = []
    for name, split in rows:
        cells = []
        for m in models:
            hit = [r for r in results if r["model"] == m and r["split"] == split and row_name(r) == name]
            best = m == "this"
            cells.append(f"<td class='{'this' if best else ''}'>{_esc(cell(hit[0]))}</td>" if hit else "<td></td>")
        body.append(f"<tr><td>{_esc(name)}</td><td>{_esc(split_label(split))}</td>{''.join(cells)}</tr>")
    d = doc.get("data", {})
    w = doc.get("weights", {})
    notes = "".join(f"<li>{_esc(n)}</li>" for n in [*doc.get("notes", []), *small_set_notes(doc)])
    return (f"<p class=small>data: {_esc(d.get('name'))} ({_esc(d.get('split'))}): {_esc(d.get('n_train'))} train, "
            f"{_esc(d.get('n_test'))} test, {_esc(d.get('n_classes'))} classes; weights {_esc(w.get('arch'))} "
            f"step {_esc(w.get('step', '?'))}, hash {_esc(w.get('weights_hash'))}</p>"
            f"<table><tr><th>protocol</th><th>labels</th>{head}</tr>{''.join(body)}</table>"
            f"<p class=small>Top-1 accuracy (%) on the test split. Baselines: random init (same architecture, "
            f"fresh weights), raw pixels, supervised from scratch. Finetune's choice: a labelling budget chosen by "
            f"<code>openseer select</code>'s rule or at random (mean ± spread over draws), fitted as "
            f"<code>openseer finetune</code> would.</p>{'<ul class=small>' + notes + '</ul>' if notes else ''}")


# ---------------------------------------------------------------- the model on a sample


@dataclass
class Sample:
    images: torch.Tensor  # float (N, 3, S, S) in [0, 1]: what the model sees, before normalisation
    labels: np.ndarray | None
    classes: list[str] | None
    keys: list[str]
    description: str
    skipped: dict[str, int] = field(default_factory=dict)  # files passed over, by reason (data/collection.py)


def load_sample(spec: str, n: int, crop: int, seed: int, data_cfg=None) -> Sample:
    """A seeded sample of ``n`` images of the source, through the eval geometry (crop x crop)."""
    from ..data.collection import FASHION_MNIST_CLASSES, SkipCounts, open_collection
    from ..data.decode import BadImage, decode_bytes
    from ..eval.common import EvalTransform
    from ..fileio import name_to_text
    from .api import draft_size, image_tensor

    geometry = EvalTransform(crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    src = open_collection(spec, data_cfg=data_cfg)
    rng = np.random.default_rng(seed)
    if src.in_memory:
        idx = np.sort(rng.choice(len(src), size=min(n, len(src)), replace=False))
        images = src.images[torch.from_numpy(idx)]  # type: ignore[attr-defined]
        labels = getattr(src, "labels", None)
        lab = labels[torch.from_numpy(idx)].numpy() if labels is not None else None
        classes = list(FASHION_MNIST_CLASSES) if lab is not None and getattr(src, "name", "") == "fashion-mnist" else None
        return Sample(geometry.geometry(images), lab, classes, [src.batch_key(int(i)) for i in idx],
                      f"{len(idx)} images drawn (seed {seed}) from {src.description}")
    tiles, keys = [], []
    skips = SkipCounts()
    if src.streaming:  # tar shards: the first n usable samples, in shard order
        from ..data.stream import iter_shard

        for i, url in enumerate(src.urls):  # type: ignore[attr-defined]
            for s in iter_shard(url, i, pipe_timeout=getattr(data_cfg, "pipe_timeout", 300.0)):
                if s.reason or src.deny.denies(s.key, s.data):  # type: ignore[attr-defined]
                    skips.skip(s.reason or "denied", s.key)
                    continue
                try:
                    img = decode_bytes(s.data or b"", s.key, draft_size=draft_size(crop))
                except BadImage as e:
                    skips.skip(e.reason, s.key)
                    continue
                skips.good()
                tiles.append(geometry.geometry(image_tensor(img, crop).unsqueeze(0)))
                keys.append(s.key)
                if len(tiles) >= n:
                    break
            if len(tiles) >= n:
                break
        how = f"the first {len(tiles)} usable samples of {src.description}"
    else:
        order = rng.permutation(len(src))
        for i in order:
            if len(tiles) >= n:
                break
            try:  # listed and read by data/collection.py: bounded reads, the deny-list applied
                x = image_tensor(src.load(int(i), draft_size=draft_size(crop)), crop)
            except BadImage as e:
                skips.skip(e.reason, name_to_text(src.batch_key(int(i))))
                continue
            skips.good()
            tiles.append(geometry.geometry(x.unsqueeze(0)))
            keys.append(name_to_text(src.batch_key(int(i))))
        how = f"{len(tiles)} images drawn (seed {seed}) from {src.description}"
    if skips.skipped:
        how += f"; {skips.summary()}"
    if not tiles:
        raise ReportError(f"no decodable image in {spec} ({skips.summary()})")
    return Sample(torch.cat(tiles), None, None, keys, how, skips.by_reason())


def run_model(model, sample: Sample, mean, std, temperature: float, batch_size: int = 256,
              device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(pooled features (N, D), softmax over prototypes (N, K)) of the sample."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    feats, probs = [], []
    model = model.to(device).eval()
    with torch.inference_mode():
        for start in range(0, len(sample.images), batch_size):
            x = ((sample.images[start:start + batch_size] - m) / s).to(device)
            f = model.backbone(x)
            z = F.normalize(model.head(f).float(), dim=1)
            scores = model.prototypes(z)
            feats.append(f.float().cpu())
            probs.append(torch.softmax(scores / temperature, dim=1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _tile(img: torch.Tensor, border: tuple[int, int, int] | None = None):
    from PIL import Image

    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    pil = Image.fromarray(arr)
    small = max(arr.shape[:2]) < TILE
    pil = pil.resize((TILE, TILE), Image.NEAREST if small else Image.BILINEAR)
    if border:
        from PIL import ImageOps

        pil = ImageOps.expand(pil.resize((TILE - 6, TILE - 6)), border=3, fill=border)
    return pil


def _row_png(tiles: list) -> str:
    from PIL import Image

    gap = 4
    row = Image.new("RGB", (len(tiles) * (TILE + gap) - gap, TILE), (255, 255, 255))
    for i, t in enumerate(tiles):
        row.paste(t, (i * (TILE + gap), 0))
    return _pil_png(row)


def clusters_section(sample: Sample, probs: np.ndarray, n_protos: int, per: int) -> str:
    k = probs.shape[1]
    assign = probs.argmax(1)
    counts = np.bincount(assign, minlength=k)
    used = int((counts > 0).sum())
    top = [int(i) for i in np.argsort(-counts, kind="stable")[:n_protos] if counts[i] > 0]
    rows = []
    for p in top:
        members = np.argsort(-probs[:, p], kind="stable")[:per]
        tiles = [_tile(sample.images[int(i)]) for i in members]
        labels = ""
        if sample.labels is not None and sample.classes:
            mine = sample.labels[assign == p]
            if len(mine):
                vals, cnt = np.unique(mine, return_counts=True)
                j = int(np.argmax(cnt))
                labels = f"<br>most common label: {_esc(sample.classes[int(vals[j])])} ({100 * cnt[j] / len(mine):.0f}%)"
        rows.append(f"<tr><td class=cap>prototype {p}<br>{counts[p]} images ({100 * counts[p] / len(assign):.1f}%)"
                    f"<br>max p {probs[members[0], p]:.2f}{labels}</td>"
                    f"<td><img alt='prototype {p}' src='{_row_png(tiles)}'></td></tr>")
    return (f"<p class=small>{used} of {k} prototypes receive at least one image (arg-max of the softmax over "
            f"prototypes) in the sample of {len(assign)}. Rows: the {len(top)} most-used prototypes; in each, the "
            f"{per} images with the highest probability for it.</p><table class=grid>{''.join(rows)}</table>")


def centred(feats: np.ndarray) -> torch.Tensor:
    """Features minus their sample mean, L2-normalised: pooled ReLU features share a large common
    component that makes every raw cosine similarity close to 1."""
    x = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    return torch.nn.functional.normalize(x - x.mean(0, keepdim=True), dim=1)


def neighbours_section(sample: Sample, feats: np.ndarray, n_queries: int, k: int, seed: int) -> str:
    f = centred(feats)
    rng = np.random.default_rng(seed + 1)
    queries = rng.choice(len(f), size=min(n_queries, len(f)), replace=False)
    sims = f[torch.from_numpy(queries)] @ f.T
    sims[torch.arange(len(queries)), torch.from_numpy(queries)] = -2  # not the query itself
    top = sims.topk(min(k, len(f) - 1), dim=1)
    rows = []
    agree_all = []
    for qi, q in enumerate(queries):
        nn_idx = top.indices[qi].numpy()
        tiles = [_tile(sample.images[int(q)], border=(214, 39, 40))] + [_tile(sample.images[int(i)]) for i in nn_idx]
        cap = f"query {_esc(sample.keys[int(q)])}"
        if sample.labels is not None and sample.classes:
            agree = float(np.mean(sample.labels[nn_idx] == sample.labels[q]))
            agree_all.append(agree)
            cap += f"<br>{_esc(sample.classes[int(sample.labels[q])])}<br>{100 * agree:.0f}% of neighbours share it"
        cap += f"<br>cos {float(top.values[qi, 0]):.2f} .. {float(top.values[qi, -1]):.2f}"
        rows.append(f"<tr><td class=cap>{cap}</td><td><img alt='neighbours {qi}' src='{_row_png(tiles)}'></td></tr>")
    extra = (f" On average {100 * np.mean(agree_all):.0f}% of the neighbours share the query's label."
             if agree_all else "")
    return (f"<p class=small>Left (red frame): a query drawn from the sample; then its {top.indices.shape[1]} "
            f"nearest neighbours in the sample by cosine similarity of the pooled backbone features (centred on the sample mean).{extra}</p>"
            f"<table class=grid>{''.join(rows)}</table>")


def map_section(sample: Sample, feats: np.ndarray, probs: np.ndarray, method: str, seed: int) -> str:
    plt = _plt()
    x = centred(feats)
    used = "PCA"
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE

            xy = TSNE(n_components=2, random_state=seed, init="pca").fit_transform(x.numpy())
            used = "t-SNE"
        except ImportError:
            method = "pca"
            used = "PCA (t-SNE needs scikit-learn, which is not installed)"
    if method != "tsne":
        xc = x - x.mean(0, keepdim=True)
        _, s, vt = torch.linalg.svd(xc, full_matrices=False)
        xy = (xc @ vt[:2].T).numpy()
        var = (s[:2] ** 2).sum() / (s ** 2).sum()
        used += f" (first two components: {100 * float(var):.0f}% of the variance)"
    fig, ax = plt.subplots(figsize=(9, 6.5))
    cmap = plt.get_cmap("tab10")
    if sample.labels is not None:
        names = sample.classes or [str(c) for c in range(int(sample.labels.max()) + 1)]
        for c in np.unique(sample.labels):
            sel = sample.labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(int(c) % 10), label=names[int(c)], alpha=0.75)
        what = "coloured by label"
    else:
        assign = probs.argmax(1)
        counts = np.bincount(assign, minlength=probs.shape[1])
        top = list(np.argsort(-counts, kind="stable")[:9])
        colour = np.array([top.index(a) if a in top else 9 for a in assign])
        for c in range(10):
            sel = colour == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(c) if c < 9 else "#bbbbbb", alpha=0.75,
                           label=f"prototype {top[c]}" if c < 9 else "other prototypes")
        what = "coloured by assigned prototype (no labels in this data)"
    ax.legend(fontsize=8, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    pad = (hi - lo) * 0.08 + 1e-6
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return (f"<p class=small>{_esc(used)} of the pooled features (centred, L2-normalised) of the {len(xy)} sample "
            f"images, {what}; the axes cover 99% of the points.</p><img class=map alt='embedding map' src='{_fig_png(fig)}'>")


def _strip(key: str) -> str:
    """A parameter name without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    for p in ("module.", "_orig_mod."):
        while key.startswith(p):
            key = key[len(p):]
    return key


# ---------------------------------------------------------------- the page

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,td:nth-child(2){text-align:left} td.this{font-weight:bold}
table.grid td{border:none;vertical-align:middle} td.cap{font-size:.8em;width:190px;color:#444}
table.kv td{text-align:left}
img.wide{max-width:100%} img.map{max-width:720px;width:100%} .note{color:#8a6d3b;background:#fcf8e3;padding:6px 10px}
.small{font-size:.85em;color:#555} code{background:#f4f4f4;padding:1px 4px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken-images', String(broken.length));
});
"""


def _run_table(run_dir: Path, cfg, state_step, schedule: dict, ckpt: Path | None) -> str:
    rows = [("run directory", str(run_dir.resolve()))]
    if cfg is not None:
        m = cfg.model
        crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.crops.counts, cfg.crops.sizes))
        rows += [("recipe", cfg.recipe), ("data", cfg.data.source), ("backbone", m.arch),
                 ("crops", crops), ("global batch", cfg.data.batch_size),
                 ("prototypes K", cfg.swav.n_prototypes), ("temperature / epsilon", f"{cfg.swav.temperature:g} / "
                                                                                  f"{cfg.swav.epsilon:g}"),
                 ("head", "->".join(str(d) for d in [*m.head_hidden, m.head_out]) + ("" if m.head_bn else " (no BN)"))]
    if schedule:
        rows += [("schedule", ", ".join(f"{k} {v}" for k, v in schedule.items()
                                        if k in ("world_size", "total_steps", "steps_per_epoch", "peak_lr")))]
    if ckpt is not None:
        rows += [("checkpoint", f"{ckpt.name} (step {state_step})")]
    return "<table class=kv>" + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(run_dir: str | Path, out: str | Path | None = None, data: str | None = None,
                 sample: int = 2000, prototypes: int = 8, per_prototype: int = 10, queries: int = 6,
                 neighbours: int = 9, map_method: str = "pca", seed: int = 0, device: str = "cpu",
                 batch_size: int = 256) -> dict:
    """Write ``RUN_DIR/report.html`` (or ``out``); returns {"path", "seconds", "sections": {...}}."""
    from ..config import ConfigError, config_from_dict
    from ..model.swav import build_swav
    from ..train.checkpoint import CheckpointError, latest_checkpoint

    t0 = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory (give a run directory from `openseer pretrain`)")
    out = Path(out) if out else run_dir / REPORT
    metrics = read_metrics(run_dir)
    cfg = None
    notes: list[str] = []
    ckpt, state = None, None
    try:
        ckpt, state = latest_checkpoint(run_dir)
    except CheckpointError as e:
        notes.append(f"no usable checkpoint ({e}): the sections that run the model are skipped")
    try:
        if state is not None and isinstance(state.get("config"), dict):
            cfg = config_from_dict(state["config"])
        elif (run_dir / CONFIG).is_file():
            cfg = load_run_config(run_dir)
    except ConfigError as e:
        notes.append(f"the run's config is not readable: {e}")
    if cfg is None and not metrics and state is None:
        raise ReportError(f"{run_dir} has no {METRICS}, {CONFIG} or checkpoint: not a run directory")
    try:
        schedule = read_json(run_dir, SCHEDULE) or {}
    except json.JSONDecodeError:
        schedule = {}
    eval_doc = None
    try:
        eval_doc = read_json(run_dir, EVAL)
    except json.JSONDecodeError as e:
        notes.append(f"{EVAL} is not valid JSON ({e}); the table is skipped")
    timings: dict[str, float] = {}
    sections: dict[str, str] = {}

    t = time.perf_counter()
    sections["Training curves"] = curves_section(metrics, cfg.swav.n_prototypes if cfg else None)
    timings["curves"] = time.perf_counter() - t
    sections["Evaluation"] = eval_section(eval_doc)

    model_sections = ("What the prototypes mean", "Nearest neighbours", "Map of the embeddings")
    if state is not None and cfg is not None:
        t = time.perf_counter()
        spec = data or cfg.data.source
        try:
            smp = load_sample(spec, sample, cfg.crops.sizes[0], seed, cfg.data)
        except DataError as e:
            smp = None
            for name in model_sections:
                sections[name] = (f"<p class=note>The training data {_esc(spec)} is not readable here ({_esc(e)}): "
                                  f"pass --data to show the model other images.</p>")
        timings["sample"] = time.perf_counter() - t
        if smp is not None:
            t = time.perf_counter()
            if cfg.distill.teacher:  # openseer distill: the student read through its teacher's prototypes
                from ..train.distill import report_model

                model = report_model(state, cfg)
            else:
                model = build_swav(cfg)
                model.load_state_dict({_strip(k): v for k, v in state["model"].items()})
            feats, probs = run_model(model, smp, cfg.crops.mean, cfg.crops.std, cfg.swav.temperature,
                                     batch_size, device)
            timings["model"] = time.perf_counter() - t
            t = time.perf_counter()
            head = f"<p class=small>Sample: {_esc(smp.description)}; eval geometry at {cfg.crops.sizes[0]} px.</p>"
            sections[model_sections[0]] = head + clusters_section(smp, probs, prototypes, per_prototype)
            sections[model_sections[1]] = neighbours_section(smp, feats, queries, neighbours, seed)
            sections[model_sections[2]] = map_section(smp, feats, probs, map_method, seed)
            timings["grids"] = time.perf_counter() - t
    else:
        for name in model_sections:
            sections[name] = "<p class=note>No checkpoint with a config: nothing to run.</p>"

    title = f"openseer report: {run_dir.name}"
    step = state.get("step") if state else (metrics[-1]["step"] if metrics else "?")
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
             f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1><p class=small>written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
             f"<code>openseer report</code>; self-contained (no network needed).</p>",
             "<h2>Run</h2>", _run_table(run_dir, cfg, step, schedule, ckpt)]
    parts += [f"<p class=note>{_esc(n)}</p>" for n in notes]
    for name, body in sections.items():
        parts.append(f"<h2>{_esc(name)}</h2>{body}")
    total = time.perf_counter() - t0
    parts.append(f"<p class=small>made in {total:.1f} s ("
                 + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ")</p>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return {"path": str(out), "seconds": round(time.perf_counter() - t0, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()}, "notes": notes,
            "bytes": out.stat().st_size, "sections": list(sections)}


def run_summary(run_dir: str | Path, report_path: str | Path | None = None) -> str:
    """A few plain lines for the end of a demo: where the run is, how it trained, the evaluation
    table (from ``eval.json``) with which rows beat every baseline, and the report's path."""
    from ..eval.report import MODELS, render_markdown

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    lines = ["", "== openseer: summary ==",
             f"run:    {run_dir}/  (config.yaml, metrics.jsonl, checkpoints/, eval.json, eval.md)"]
    if metrics:
        last = metrics[-1]
        epoch = f" ({last['epoch']:.2f} epochs)" if isinstance(last.get("epoch"), (int, float)) else ""
        loss = f", final loss {last['loss']:.3f}" if isinstance(last.get("loss"), (int, float)) else ""
        lines.append(f"trained: {last['step']} steps{epoch}{loss}")
    try:
        doc = read_json(run_dir, EVAL)
    except json.JSONDecodeError:
        doc = None
    if doc is None:
        lines.append(f"eval:   no {EVAL} (run `openseer eval RUN_DIR`)")
    else:
        layer = doc.get("feature_layer", "pooled last stage")
        lines.append(f"eval:   top-1 % on the test split; frozen features: {layer}")
        lines += [ln for ln in render_markdown(doc).splitlines() if ln.startswith("|")]
        baselines = [m for m in ("random_init", "pixels") if any(r["model"] == m for r in doc["results"])]
        rows: dict[tuple, dict] = {}
        for r in doc["results"]:
            rows.setdefault((r["protocol"], r["split"], r.get("k")), {})[r["model"]] = r["top1"]
        compared = [v for v in rows.values() if "this" in v and any(b in v for b in baselines)]
        ahead = [v for v in compared if all(v["this"] > v[b] for b in baselines if b in v)]
        if compared:
            names = " and ".join(MODELS[b].rstrip("*") for b in baselines)
            lines.append(f"        pretrained model above {names} on {len(ahead)} of {len(compared)} rows")
            if len(ahead) < len(compared):
                lines.append("        (rows under a baseline: pretrain longer; docs/benchmarks.md, 'Fashion-MNIST', "
                             "has the steps it takes)")
    if report_path:
        lines.append(f"report: {report_path}")
    return "\n".join(lines)


__all__ = ["ReportError", "run_summary", "write_report"]
