"""Subcommands that use the features: ``export``, ``embed``, ``import-seer``, ``report``, ``curate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_EXAMPLES = """examples:
  openseer export runs/a --format safetensors --out backbone.safetensors   # timm key names + metadata
  openseer export runs/a --format torchscript --out backbone.pt            # checked against PyTorch
  openseer export runs/a --format onnx --out backbone.onnx                 # checked with onnxruntime (CPU)
  openseer export rg32.safetensors --format vissl --out rg32.torch         # back to VISSL's layout
  openseer export runs/a --format onnx --int8 --calibrate /pile --out a-int8.onnx   # static int8, calibrated
  openseer export runs/a backbone.safetensors                              # (older form: OUT positional)

load a safetensors export in timm, no remapping:
  timm.create_model(ARCH, num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))
"""

EMBED_EXAMPLES = """examples:
  openseer embed runs/a --data /images --out emb/                 # folder (recursive)
  openseer embed runs/a --data paths.txt --out emb/ --dtype float32
  openseer embed runs/a --data 'shards/{000000..000099}.tar' --out emb/ --workers 2
  openseer embed runs/a --data /images --out emb-s3s4/ --layer s3+s4   # two stages, each pooled, joined
  (interrupted? run the same command again: finished chunks are skipped)

output: emb/embeddings.npy (np.load(..., mmap_mode='r')), emb/index.csv (row,key,path),
        emb/bad.csv (key,path,reason), emb/meta.json
"""

IMPORT_EXAMPLES = """examples:
  openseer import-seer seer_regnet32gf_model_iteration244000.torch --arch regnety_320 --out rg32.safetensors
  openseer import-seer timm_regnety_320.pth --out rg32.safetensors           # timm state dict; arch guessed
  openseer eval rg32.safetensors --data /path/labelled                       # then use it like any export
"""


CURATE_EXAMPLES = """examples:
  openseer curate /pile --out curated/ --model runs/a                  # keep half the pile
  openseer curate 'shards/{000000..000099}.tar' --out curated/ --keep 0.5 --model regnetx_002
  openseer curate /pile --out curated/ --keep-count 20000 --model runs/a --reference /some/in-domain --drop-off-domain
  openseer shard curated/list.txt --out curated-shards/                  # the kept files (list.txt: embed, shard)
  openseer pretrain --data curated/shards --recipe tiny-cpu --out runs/b # (with --shards)
  openseer pretrain --data 'shards/{000000..000099}.tar' data.denylist=curated/exclude.txt ...   # shards in place
  (interrupted? run the same command again: the embedding resumes where it stopped)

output: curated/list.txt, exclude.txt, decisions.csv (every image: group, cluster, kept or why not),
        report.html, curate.json, embed/ (the embeddings)
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``embed``, ``import-seer``, ``report`` and ``curate`` to the ``openseer`` command."""
    FORMATS = ("safetensors", "torchscript", "onnx", "vissl")  # as openseer.use.export.FORMATS (no torch import here)

    p = sub.add_parser("export", help="write a backbone as safetensors (timm names), TorchScript, ONNX or VISSL",
                       description="Export the backbone of a run, checkpoint, exported file or timm name. "
                                   "TorchScript and ONNX take normalised images (B, 3, H, W) and return pooled "
                                   "features (B, D); each export is run again and compared with PyTorch.",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="WEIGHTS", help="a run directory (latest checkpoint), a checkpoint, an "
                                                     "exported/imported file, or a timm name")
    p.add_argument("out_pos", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--out", help="output file")
    p.add_argument("--format", choices=FORMATS, help="default: from the file name (.safetensors, .pt/.ts, .onnx, .torch)")
    p.add_argument("--backbone", metavar="NAME", help="architecture of a file that does not record it")
    p.add_argument("--no-check", action="store_true", help="do not compare TorchScript/ONNX outputs with PyTorch")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="fail when max |export - PyTorch| exceeds this times max(1, max |features|) (default 1e-3)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    p.add_argument("--int8", action="store_true",
                   help="ONNX only: static int8 (onnxruntime, QDQ, per-channel weights) calibrated on --calibrate")
    p.add_argument("--calibrate", metavar="PILE", help="images to calibrate int8 on: a folder, a .txt list of "
                                                       "paths, tar shards or fashion-mnist")
    p.add_argument("--calibrate-n", type=int, default=256, metavar="N",
                   help="calibration images, spread evenly over PILE (default 256)")
    p.add_argument("--min-cosine", type=float, default=0.98,
                   help="int8: fail when the worst cosine similarity to the fp32 features on the calibration "
                        "sample is below this (default 0.98)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="embeddings of a folder, file list or shards (.npy + index.csv, resumable)",
                       description="Run a backbone over every image of a collection and write its pooled "
                                   "features. Undecodable images are skipped and listed in bad.csv.",
                       epilog=EMBED_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", metavar="WEIGHTS", help="a run directory, checkpoint, exported file or timm name")
    p.add_argument("--data", required=True, help="a folder of images, a .txt list of paths, tar shards, fashion-mnist")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backbone", metavar="NAME", help="architecture of a file that does not record it")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="default float16")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding (for cosine search)")
    p.add_argument("--layer", default="last", metavar="STAGES",
                   help="which features: 'last' (default: the pooled last stage), a stage as timm names it "
                        "(RegNet s1..s4), or stages joined by '+' (each pooled and L2-normalised, concatenated), "
                        "as in `openseer eval --layer`")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="images per resumable chunk (default 4096; tar shards: one chunk per shard)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes for files (default 0: in-process)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("import-seer", help="import official SEER (VISSL) or timm weights as an openseer backbone",
                       description="Read a VISSL checkpoint (classy_state_dict ... trunk, as SEER released them), a "
                                   "timm RegNet state dict or an openseer checkpoint; map it to timm names, check "
                                   "every key and shape against --arch, write .safetensors with metadata "
                                   "(ImageNet mean/std, 224 px).",
                       epilog=IMPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="FILE", help=".torch/.pth/.pt (loaded with weights_only=True) or .safetensors")
    p.add_argument("--arch", help="timm architecture: regnety_320 (RG-32GF), regnety_640, regnety_1280, "
                                  "regnety_2560, seer_regnet_10b; default: guessed from the shapes")
    p.add_argument("--out", required=True, metavar="OUT.safetensors")
    p.add_argument("--input-size", type=int, help="input size recorded in the metadata (default: what the file "
                                                   "records, else 224)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, eval table, clusters, neighbours, map",
                       description="One self-contained HTML page (images embedded) about a run.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="default RUN_DIR/report.html")
    p.add_argument("--data", help="images to show the model (default: the run's training data)")
    p.add_argument("--sample", type=int, default=2000, help="images in the sample (default 2000)")
    p.add_argument("--prototypes", type=int, default=8, help="most-used prototypes shown (default 8)")
    p.add_argument("--per-prototype", type=int, default=10, help="images per prototype (default 10)")
    p.add_argument("--queries", type=int, default=6, help="nearest-neighbour queries (default 6)")
    p.add_argument("--neighbours", type=int, default=9, help="neighbours per query (default 9)")
    p.add_argument("--map", default="pca", choices=["pca", "tsne"], dest="map_method",
                   help="2-D map: pca (default) or tsne (needs scikit-learn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--summary", action="store_true",
                   help="end with a short summary: the run, its evaluation table, the report's path")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("curate", help="deduplicate and rebalance an uncurated pile: kept list, decisions, report",
                       description="Embed a pile with a backbone, group near-duplicates (faiss kNN + threshold) and keep "
                                   "one per group, rebalance by k-means clusters, keep --keep of the pile.",
                       epilog=CURATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pile", metavar="PILE", help="a folder of images, a .txt list of paths, or tar shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", required=True, metavar="WEIGHTS",
                   help="the backbone to embed with: a run directory, checkpoint, exported file or timm name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, default=0.5, help="share of the pile to keep, in (0, 1] (default 0.5)")
    g.add_argument("--keep-count", type=int, default=0, metavar="N", help="number of images to keep")
    p.add_argument("--dup-threshold", type=float, default=0.95,
                   help="cosine similarity (of --dup-by) that makes two images near-duplicates (default 0.95)")
    p.add_argument("--dup-by", default="descriptor", choices=["descriptor", "embedding"],
                   help="what near-duplicates are found by: the near-copy descriptor of takedown --near (default: "
                        "16 x 16 grey, flips included) or the model's embeddings (instance-level models only)")
    p.add_argument("--clusters", type=int, default=0, help="k-means clusters (default sqrt of the pile size)")
    p.add_argument("--levels", type=int, default=1, choices=[1, 2, 3],
                   help="hierarchical k-means levels for the balanced sampling (default 1)")
    p.add_argument("--reference", metavar="DATA",
                   help="a small sample of the wanted domain (folder, list or shards): estimates the off-domain share")
    p.add_argument("--drop-off-domain", action="store_true", help="with --reference: also drop off-domain images")
    p.add_argument("--shards", action="store_true", help="also write the kept images as tar shards (OUT/shards)")
    p.add_argument("--layer", default="last", metavar="STAGES", help="features to embed with (as `openseer embed`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in-process)")
    p.add_argument("--max-memory-gb", type=float, default=0,
                   help="memory the index steps may use (default: what the machine has available)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_curate)


def _threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from ..data.decode import DataError

        raise DataError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return name


def cmd_export(args: argparse.Namespace) -> int:
    from ..train.checkpoint import CheckpointError
    from .export import export

    out = args.out or args.out_pos
    if not out:
        raise CheckpointError("give the output file: --out PATH")
    if args.out and args.out_pos:
        raise CheckpointError(f"two outputs given: {args.out_pos} and --out {args.out}")
    _threads(args.threads)
    if args.int8:
        return _export_int8(args, out)
    if args.calibrate:
        raise CheckpointError("--calibrate is for --int8 exports; add --int8 or drop --calibrate")
    r = export(args.source, out, args.format, arch=args.backbone, check=not args.no_check, opset=args.opset)
    print(f"openseer: backbone of {args.source} -> {r['path']} ({r['format']})")
    diff = r.get("max_abs_diff")
    if diff is not None:
        scale = max(1.0, r.get("max_abs_ref", 1.0))
        ok = diff <= args.tolerance * scale
        print(f"openseer: max |{r['format']} - PyTorch| = {diff:.3g} on a random batch "
              f"(features up to {r.get('max_abs_ref', 0):.3g}){'' if ok else ': MISMATCH'}")
        if not ok:
            print(f"openseer: error: the {r['format']} export differs from PyTorch by more than "
                  f"{args.tolerance:g} x {scale:.3g}", file=sys.stderr)
            return 1
    elif r["format"] == "onnx" and not args.no_check:
        print("openseer: onnxruntime is not installed: the ONNX file was not checked (pip install onnxruntime)")
    return 0


def _export_int8(args: argparse.Namespace, out: str) -> int:
    from .quantize import export_quantized

    r = export_quantized(args.source, out, args.calibrate, n=args.calibrate_n, fmt=args.format,
                         arch=args.backbone, opset=args.opset)
    c = r["calibration"]
    skipped = f", {sum(c['skipped'].values())} unreadable skipped" if c["skipped"] else ""
    print(f"openseer: backbone of {args.source} -> {r['path']} (onnx, int8 static, calibrated on "
          f"{c['images']} images{skipped})")
    print(f"openseer: size {r['bytes'] / 1e6:.2f} MB (fp32 {r['fp32_bytes'] / 1e6:.2f} MB, "
          f"{r['fp32_bytes'] / r['bytes']:.1f}x smaller)")
    ok = r["cosine_min"] >= args.min_cosine
    print(f"openseer: int8 vs fp32 on the calibration sample: max |difference| {r['max_abs_diff']:.3g} "
          f"(features up to {r['max_abs_ref']:.3g}), cosine similarity mean {r['cosine_mean']:.4f}, "
          f"worst {r['cosine_min']:.4f}{'' if ok else ': TOO FAR'}")
    if not ok:
        Path(r["path"]).unlink(missing_ok=True)
        print(f"openseer: error: the int8 export's worst cosine similarity to fp32 ({r['cosine_min']:.4f}) is "
              f"below --min-cosine {args.min_cosine:g}; {r['path']} was removed. "
              f"Calibrate on more or more typical images (--calibrate-n), or keep the fp32 export",
              file=sys.stderr)
        return 1
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .api import load

    _threads(args.threads)
    model = load(args.weights, arch=args.backbone, device=_device(args.device), layer=args.layer)
    meta = model.embed_collection(args.data, args.out, dtype=args.dtype, batch_size=args.batch_size,
                                  chunk_size=args.chunk_size, workers=args.workers, limit=args.limit,
                                  normalize=args.normalize, overwrite=args.overwrite, progress=not args.quiet)
    if meta.get("resumed") == "already complete":
        print(f"openseer: {args.out} is already complete ({meta['n']} embeddings); --overwrite to redo it")
        return 0
    if not meta["complete"]:
        print(f"openseer: stopped early; {meta['resume']}")
        return 1
    rate = f", {meta['images_per_s']} img/s" if meta.get("images_per_s") else ""
    skipped = f" ({meta['chunks_skipped']} chunks were already done)" if meta["chunks_skipped"] else ""
    print(f"openseer: {meta['n']} embeddings of {meta['dim']} {meta['dtype']} -> {meta['files']['embeddings']}, "
          f"index {meta['files']['index']}; {meta['n_bad']} skipped (bad.csv){skipped}{rate}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .vissl import import_weights

    r = import_weights(args.checkpoint, args.out, arch=args.arch, input_size=args.input_size)
    dropped = f"; dropped {len(r['dropped'])} non-backbone tensors (e.g. {r['dropped'][0]})" if r["dropped"] else ""
    print(f"openseer: {args.checkpoint} ({r['layout']} layout) -> {r['out']}: {r['arch']}, {r['tensors']} tensors"
          f"{dropped}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .run_report import write_report

    _threads(args.threads)
    r = write_report(args.run_dir, args.out, data=args.data, sample=args.sample, prototypes=args.prototypes,
                     per_prototype=args.per_prototype, queries=args.queries, neighbours=args.neighbours,
                     map_method=args.map_method, seed=args.seed, device=_device(args.device))
    for note in r["notes"]:
        print(f"openseer: note: {note}", file=sys.stderr)
    print(f"openseer: report written in {r['seconds']:.1f} s: {r['path']}")
    if args.summary:
        from .run_report import run_summary

        print(run_summary(args.run_dir, r["path"]))
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from .curate import curate

    _threads(args.threads)
    r = curate(args.pile, args.out, args.model, keep=None if args.keep_count else args.keep,
               keep_count=args.keep_count, dup_threshold=args.dup_threshold, clusters=args.clusters,
               levels=args.levels, reference=args.reference or "", drop_off_domain=args.drop_off_domain,
               dup_by=args.dup_by,
               seed=args.seed, shards=args.shards, batch_size=args.batch_size, workers=args.workers,
               device=_device(args.device), layer=args.layer, max_memory=int(args.max_memory_gb * 2**30),
               progress=not args.quiet, log=(lambda t: None) if args.quiet else print)
    od = r["off_domain"]
    share = f"; off-domain {100 * od['share']:.1f}%" if od.get("given") else ""
    print(f"openseer: kept {r['kept']} of {r['inputs']} images ({r['decisions']}; {r['bad']} bad"
          f"{share}) -> {r['files']['list.txt']}; report {r['files']['report.html']}")
    if r.get("warning"):
        print(f"openseer: warning: {r['warning']}", file=sys.stderr)
    if r.get("note"):
        print(f"openseer: note: {r['note']}", file=sys.stderr)
    return 0


__all__ = ["add_parsers"]
