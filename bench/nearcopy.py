"""Near-copy takedowns: recall on copies of real photographs, false matches on 10,000+ distinct images.

    .venv/bin/python bench/nearcopy.py                 # about 3 minutes on 2 cores
    .venv/bin/python bench/nearcopy.py --queries 20 --copies 10 --distractors 2000   # quick

Queries: half of the distinct wallpapers (openseer.data.pile.load_photographs). Each gets
``--copies`` copies of every kind: JPEG quality 30-95, scale 0.25-1, a crop keeping 70-100% of the
area (random aspect and position), a horizontal flip, and all four at once. Distractors: distinct
images that are no copy of any query: non-overlapping tiles (1/2 .. 1/5 of the side) of the other
wallpapers, detail-free pictures (smooth random fields like skies and backdrops, 2-40 grey levels of
relief, some saved as JPEG), near-blank images (a flat level plus faint noise, as the uncurated pile
holds) and Fashion-MNIST test images. Everything goes into one pile index; each query runs
``openseer.data.nearcopy.find_copies`` (the code ``takedown add --near`` runs). Recall = copies
found by their own query; false matches = distractors (and other queries' copies) matched by any
query. Prints one JSON line.

``curate`` (skip with ``--no-curate``): the same pile plus the queries' originals, grouped as ``openseer
curate`` groups near-copies by default (``curate.descriptor_groups``: each image, its mirror image and
its 10 stored crop windows against every image whole). ``in_original_group``: the share of copies in
their original's group, by kind; ``false_link_pct``: the share of distractors put in a group with any
other image (a distinct image linked); ``wrong_group``: copies grouped with another query's original.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections import Counter

import numpy as np
from PIL import Image

from openseer.data import nearcopy as nc
from openseer.data.collection import DataError, load_fashion_mnist
from openseer.data.pile import crop_area, load_photographs, near_blank

KINDS = ("jpeg", "scale", "crop", "flip", "all")
DISTRACTORS = ("tile", "smooth", "blank", "fmnist")


def curate_groups(pile: list[Image.Image], owner: list[int], kind_of: list[str],
                  originals: list[Image.Image]) -> dict:
    """``openseer curate``'s descriptor groups over the pile plus the originals (see the docstring)."""
    from openseer.use.curate import descriptor_groups

    t = time.perf_counter()
    images = list(pile) + list(originals)
    z = np.zeros(nc.SIDE * nc.SIDE, np.float32)
    d, f, w = [], [], []
    for img in images:
        r = nc.describe_pile_image(img)
        d.append(z if r is None else r[0])  # flat: zeros, never linked
        f.append(z if r is None else r[1])
        w.append(np.zeros((len(nc.WINDOWS), nc.SIDE * nc.SIDE), np.float16) if r is None else r[2].astype(np.float16))
    groups = descriptor_groups(np.stack(d), np.stack(f), np.stack(w))
    size = np.bincount(groups)
    n = len(pile)
    orig_group = groups[n:]
    copies = [i for i in range(n) if owner[i] >= 0]
    inside = {k: [groups[i] == orig_group[owner[i]] for i in copies if kind_of[i] == k] for k in KINDS}
    distinct = [i for i in range(n) if owner[i] < 0]
    linked = [i for i in distinct if size[groups[i]] > 1]
    wrong = [i for i in copies if any(groups[i] == orig_group[q] for q in range(len(originals)) if q != owner[i])]
    return {"in_original_group": round(100 * float(np.mean([x for v in inside.values() for x in v])), 2),
            "in_original_group_by_kind": {k: round(100 * float(np.mean(v)), 2) for k, v in inside.items() if v},
            "false_link_pct": round(100 * len(linked) / max(1, len(distinct)), 3),
            "distractors_linked": len(linked),
            "linked_by_kind": dict(Counter(kind_of[i] for i in linked)),
            "wrong_group": len(wrong), "groups": int(len(size)), "seconds": round(time.perf_counter() - t, 1)}


def make_copy(img: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, str]:
    did = []
    if kind in ("crop", "all"):
        a = rng.uniform(0.7, 1.0)
        img = crop_area(img, a, rng)
        did.append(f"crop{a:.2f}")
    if kind in ("flip", "all"):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        did.append("flip")
    if kind in ("scale", "all"):
        s = rng.uniform(0.25, 1.0)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
        did.append(f"scale{s:.2f}")
    if kind in ("jpeg", "all"):
        q = rng.randint(30, 95)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=q)
        img = Image.open(io.BytesIO(buf.getvalue()))
        img.load()
        did.append(f"jpeg{q}")
    return img, "+".join(did)


def tiles(img: Image.Image, fractions=(2, 3, 4, 5)) -> list[Image.Image]:
    """Non-overlapping tiles at 1/2 .. 1/5 of the side: distinct pictures (none holds 70% of another)."""
    out = []
    W, H = img.size
    for f in fractions:
        tw, th = W // f, H // f
        out += [img.crop((i * tw, j * th, (i + 1) * tw, (j + 1) * th)) for i in range(f) for j in range(f)]
    return out


def smooth_fields(n: int, seed: int) -> list[Image.Image]:
    """Detail-free pictures: a random 2x2..5x5 grid of grey levels (2-40 levels of relief around a random
    mean), bicubic-upsampled to 64-320 px, with faint noise; a third saved as JPEG."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = int(rng.integers(2, 6))
        grid = rng.uniform(0, 1, (g, g)) * rng.uniform(2, 40) + rng.uniform(20, 220)
        w, h = int(rng.integers(64, 321)), int(rng.integers(64, 321))
        img = Image.fromarray(grid.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BICUBIC)
        x = np.asarray(img) + rng.normal(0, 0.7, (h, w))
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), mode="L").convert("RGB")
        if rng.random() < 1 / 3:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
            img = Image.open(io.BytesIO(buf.getvalue()))
            img.load()
        out.append(img)
    return out


def near_blanks(n: int, seed: int) -> list[Image.Image]:
    """Near-blank images as the uncurated pile makes them (``near_blank``), 28-128 px."""
    rng = np.random.default_rng(seed)
    return [near_blank(rng, int(rng.integers(28, 129)))[0] for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=0, help="photos taken down (default: half the distinct wallpapers)")
    p.add_argument("--copies", type=int, default=10, help="copies per query and kind (default 10)")
    p.add_argument("--distractors", type=int, default=12000, help="distinct non-copies (default 12000)")
    p.add_argument("--smooth", type=int, default=1000, help="detail-free distractors among them (default 1000)")
    p.add_argument("--blank", type=int, default=500, help="near-blank distractors among them (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=nc.THRESHOLD)
    p.add_argument("--verify", type=float, default=nc.VERIFY)
    p.add_argument("--sweep", action="store_true", help="also print recall / false matches at other thresholds")
    p.add_argument("--no-curate", action="store_true", help="skip the curate grouping part")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    photos = load_photographs(max_side=1024)
    if len(photos) < 4:
        print("bench: fewer than 4 wallpapers found: apt-get install gnome-backgrounds mate-backgrounds "
              "ukui-wallpapers plasma-workspace-wallpapers", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    order = list(range(len(photos)))
    rng.shuffle(order)
    nq = args.queries or len(photos) // 2
    q_idx, d_idx = order[:nq], order[nq:]
    pile: list[Image.Image] = []
    owner: list[int] = []  # query of a copy, -1 for a distractor
    kind_of: list[str] = []
    for qi in range(nq):
        for kind in KINDS:
            for _ in range(args.copies):
                img, _how = make_copy(photos[q_idx[qi]][1], kind, rng)
                pile.append(img)
                owner.append(qi)
                kind_of.append(kind)
    n_copies = len(pile)
    distract: list[tuple[Image.Image, str]] = []
    for di in d_idx:
        distract += [(t, "tile") for t in tiles(photos[di][1])]
    distract = distract[: max(0, args.distractors - args.smooth - args.blank)]  # room for the others
    distract += [(im, "smooth") for im in smooth_fields(args.smooth, args.seed)]
    distract += [(im, "blank") for im in near_blanks(args.blank, args.seed + 1)]
    try:
        test, _ = load_fashion_mnist("test")
    except DataError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    need = max(0, args.distractors - len(distract))
    distract += [(Image.fromarray(test[i, 0].numpy(), mode="L"), "fmnist") for i in range(min(need, len(test)))]
    distract = distract[: max(args.distractors, 0)] if args.distractors else distract
    pile += [im for im, _ in distract]
    owner += [-1] * len(distract)
    kind_of += [k for _, k in distract]
    t1 = time.perf_counter()
    vecs, described = [], []
    for i, img in enumerate(pile):
        v = nc.describe(img)
        if v is not None:
            vecs.append(v)
            described.append(i)
    index = nc.CopyIndex(np.stack(vecs))
    rows = np.array(described)
    describe_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    hits: list[tuple[int, int, float, float]] = []  # (query, pile row, coarse, fine)
    low = min(args.threshold, 0.8) if args.sweep else args.threshold
    for qi in range(nq):
        query = nc.describe_query(photos[q_idx[qi]][1])
        for r, sim, score in nc.find_copies(query, index, lambda r: pile[rows[r]], threshold=low,
                                            verify=-1.0 if args.sweep else args.verify):
            hits.append((qi, int(rows[r]), sim, score))
    query_s = time.perf_counter() - t2

    def score(th: float, vt: float) -> dict:
        found = {(q, r) for q, r, s, f in hits if s >= th and f >= vt}
        own = [(owner[r], r) in found for r in range(n_copies)]
        wrong = {r for q, r in found if owner[r] != q}
        missed = Counter(owner[r] for r in range(n_copies) if not own[r])
        per_kind = {k: round(100 * float(np.mean([o for o, kk in zip(own, kind_of) if kk == k])), 2) for k in KINDS}
        return {"recall": round(100 * float(np.mean(own)), 2), "recall_by_kind": per_kind,
                "false_matches": len(wrong), "false_match_pct": round(100 * len(wrong) / len(distract), 3),
                "distractors_matched": sum(1 for r in wrong if owner[r] == -1),
                "matched_by_kind": {k: sum(1 for r in wrong if kind_of[r] == k) for k in (*DISTRACTORS, *KINDS)},
                "misses_by_query": {photos[q_idx[q]][0]: n for q, n in sorted(missed.items())}}

    line = {"bench": "nearcopy", "queries": nq, "copies": n_copies, "copies_per_kind": args.copies * nq,
            "distractors": len(distract), **{f"distractor_{k}": kind_of.count(k) for k in DISTRACTORS},
            "photographs": len(photos), "threshold": args.threshold, "verify": args.verify,
            "grid_windows": len(nc.GRID) * 2, "descriptor": f"{nc.SIDE}x{nc.SIDE} grey, verify {nc.FINE}x{nc.FINE} high-pass",
            **score(args.threshold, args.verify), "describe_s": round(describe_s, 1),
            "query_s_each": round(query_s / nq, 2)}
    if not args.no_curate:
        line["curate"] = curate_groups(pile, owner, kind_of, [photos[q_idx[qi]][1] for qi in range(nq)])
    line["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(line))
    if args.sweep:
        for th in (0.8, 0.85, 0.9):
            for vt in (0.4, 0.5, 0.6):
                print(json.dumps({"threshold": th, "verify": vt, **score(th, vt)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
