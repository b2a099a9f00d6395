"""Weights commands: ``export``, ``import-seer`` and ``embed`` (a backbone's features of a pile).

Thin: parse, call the package (openseer/use/), print; torch is imported inside the functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from .options import add_device, add_parser, add_threads, check_pile, device, set_threads

FORMATS = ("safetensors", "torchscript", "onnx", "vissl", "timm")  # openseer.use.export.FORMATS, without importing torch

EXPORT_EXAMPLES = """examples:
  openseer export runs/a --format safetensors --out backbone.safetensors   # timm key names + metadata
  openseer export runs/a --format torchscript --out backbone.pt            # checked against PyTorch
  openseer export runs/a --format onnx --out backbone.onnx                 # checked with onnxruntime (CPU)
  openseer export rg32.safetensors --format vissl --out rg32.torch         # back to VISSL's layout
  openseer export runs/a --out exported/    # timm's hub layout: timm.create_model('local-dir:exported', pretrained=True)
  openseer export runs/a --format onnx --int8 --calibrate /pile --out a-int8.onnx   # static int8, calibrated
  openseer export runs/a backbone.safetensors                              # (older form: OUT positional)
  openseer export clf/ --out clf.onnx      # a classifier from `openseer finetune`, whole: images -> logits
  openseer export clf/ --out clf-timm/     # timm.create_model('local-dir:clf-timm', pretrained=True): num_classes, label_names
  openseer export clf/ --int8 --calibrate /pile --out clf-int8.onnx        # top-1 agreement with fp32 checked
  openseer export clf/ --backbone-only --out backbone.safetensors          # the classifier's backbone alone

load a safetensors export in timm, no remapping:
  timm.create_model(ARCH, num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))
"""


def add_export(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "export", "write a backbone or classifier as safetensors (timm names), TorchScript, ONNX or VISSL",
                   EXPORT_EXAMPLES,
                   description="Export the backbone of a run, checkpoint, exported file or timm name, or a classifier "
                               "from `openseer finetune` whole (backbone + head + class names). TorchScript and "
                               "ONNX take normalised images (B, 3, H, W) and return pooled features (B, D); a "
                               "classifier's return logits (B, C) (softmax: predict's probabilities), or for a kNN "
                               "head the vote's probabilities. Each export is run again and compared with PyTorch.")
    p.add_argument("source", metavar="WEIGHTS", help="a run directory (latest checkpoint), a checkpoint, an "
                                                     "exported/imported file, a timm name, or a classifier (CLF)")
    p.add_argument("out_pos", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--out", help="output file")
    p.add_argument("--format", choices=FORMATS, help="default: from the file name (.safetensors, .pt/.ts, .onnx, .torch; a folder/: timm)")
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
                   help="int8 backbone: fail when the worst cosine similarity to the fp32 features on the "
                        "calibration sample is below this (default 0.98)")
    p.add_argument("--min-agreement", type=float, default=0.95,
                   help="int8 classifier: fail when fewer than this share of the calibration images keep the "
                        "fp32 classifier's top-1 class (default 0.95)")
    p.add_argument("--backbone-only", action="store_true",
                   help="for a classifier: export its backbone alone (as for a run), not backbone + head")
    add_threads(p)
    p.set_defaults(func=cmd_export)


def _what(r: dict, source: str) -> str:
    if not r.get("classifier"):
        return f"backbone of {source}"
    classes = r["classes"]
    names = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    return f"classifier {source} ({len(classes)} classes: {names}; {r['output']})"


def cmd_export(args: argparse.Namespace) -> int:
    """Export a backbone or a classifier; exit 1 when the export's outputs differ from PyTorch's."""
    out = args.out or args.out_pos
    if not out:
        raise ConfigError("give the output file: --out PATH")
    if args.out and args.out_pos:
        raise ConfigError(f"two outputs given: {args.out_pos} and --out {args.out}")
    if args.calibrate and not args.int8:
        raise ConfigError("--calibrate is for --int8 exports; add --int8 or drop --calibrate")
    check_pile(args.calibrate)
    set_threads(args.threads)
    if args.int8:
        return _export_int8(args, out)
    from ..use.export import export

    r = export(args.source, out, args.format, arch=args.backbone, check=not args.no_check, opset=args.opset,
               backbone_only=args.backbone_only)
    print(f"openseer: {_what(r, args.source)} -> {r['path']} ({r['format']})")
    if r.get("note"):
        print(f"openseer: note: {r['note']}")
    diff = r.get("max_abs_diff")
    if diff is not None:
        scale = max(1.0, r.get("max_abs_ref", 1.0))
        ok = diff <= args.tolerance * scale
        what = r.get("output", "features")
        agree = (f", top-1 class the same for {r['top1_agreement']:.0%} of the batch"
                 if r.get("top1_agreement") is not None else "")
        print(f"openseer: max |{r['format']} - PyTorch| = {diff:.3g} on a random batch "
              f"({what} up to {r.get('max_abs_ref', 0):.3g}){agree}{'' if ok else ': MISMATCH'}")
        if not ok:
            print(f"openseer: error: the {r['format']} export differs from PyTorch by more than "
                  f"{args.tolerance:g} x {scale:.3g}", file=sys.stderr)
            return 1
    elif r["format"] == "onnx" and not args.no_check:
        print("openseer: onnxruntime is not installed: the ONNX file was not checked (pip install onnxruntime)")
    return 0


def _export_int8(args: argparse.Namespace, out: str) -> int:
    from ..use.quantize import export_quantized, refusal_advice

    r = export_quantized(args.source, out, args.calibrate, n=args.calibrate_n, fmt=args.format,
                         arch=args.backbone, opset=args.opset, backbone_only=args.backbone_only)
    c = r["calibration"]
    skipped = f", {sum(c['skipped'].values())} unreadable skipped" if c["skipped"] else ""
    print(f"openseer: {_what(r, args.source)} -> {r['path']} (onnx, int8 static, calibrated on "
          f"{c['images']} images{skipped})")
    print(f"openseer: size {r['bytes'] / 1e6:.2f} MB (fp32 {r['fp32_bytes'] / 1e6:.2f} MB, "
          f"{r['fp32_bytes'] / r['bytes']:.1f}x smaller)")
    if r.get("classifier"):
        ok = r["top1_agreement"] >= args.min_agreement
        print(f"openseer: int8 vs fp32 on the calibration sample: top-1 class the same for "
              f"{r['top1_agreement']:.1%} of {c['images']} images, max |{r['output']} difference| "
              f"{r['max_abs_diff']:.3g} (up to {r['max_abs_ref']:.3g}){'' if ok else ': TOO FAR'}")
        why = (f"the int8 classifier keeps the fp32 top-1 class for {r['top1_agreement']:.1%} of the calibration "
               f"images, below --min-agreement {args.min_agreement:g}")
        threshold = "--min-agreement"
    else:
        ok = r["cosine_min"] >= args.min_cosine
        print(f"openseer: int8 vs fp32 on the calibration sample: max |difference| {r['max_abs_diff']:.3g} "
              f"(features up to {r['max_abs_ref']:.3g}), cosine similarity mean {r['cosine_mean']:.4f}, "
              f"worst {r['cosine_min']:.4f}{'' if ok else ': TOO FAR'}")
        why = (f"the int8 export's worst cosine similarity to fp32 ({r['cosine_min']:.4f}) is below "
               f"--min-cosine {args.min_cosine:g}")
        threshold = "--min-cosine"
    if not ok:
        Path(r["path"]).unlink(missing_ok=True)
        advice = refusal_advice(c, args.calibrate_n, threshold)
        print(f"openseer: error: {why}; {r['path']} was removed. {advice[0].upper()}{advice[1:]}", file=sys.stderr)
        return 1
    return 0


IMPORT_EXAMPLES = """examples:
  openseer import-seer seer_regnet32gf_model_iteration244000.torch --arch regnety_320 --out rg32.safetensors
  openseer import-seer timm_regnety_320.pth --out rg32.safetensors           # timm state dict; arch guessed
  openseer eval rg32.safetensors --data /path/labelled                       # then use it like any export
"""


def add_import_seer(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "import-seer", "import official SEER (VISSL) or timm weights as an openseer backbone", IMPORT_EXAMPLES,
                   description="Read a VISSL checkpoint (classy_state_dict ... trunk, as SEER released them), a "
                               "timm RegNet state dict or an openseer checkpoint; map it to timm names, check "
                               "every key and shape against --arch, write .safetensors with metadata "
                               "(ImageNet mean/std, 224 px).")
    p.add_argument("checkpoint", metavar="FILE", help=".torch/.pth/.pt (loaded with weights_only=True) or .safetensors")
    p.add_argument("--arch", help="timm architecture: regnety_320 (RG-32GF), regnety_640, regnety_1280, "
                                  "regnety_2560, seer_regnet_10b; default: guessed from the shapes")
    p.add_argument("--out", required=True, metavar="OUT.safetensors")
    p.add_argument("--input-size", type=int, help="input size recorded in the metadata (default: what the file "
                                                   "records, else 224)")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    """Import SEER (VISSL) or timm weights as a .safetensors backbone."""
    path = Path(args.checkpoint).expanduser()
    if Path(args.out).suffix == ".safetensors" and not path.is_file():  # said before torch is imported
        raise ConfigError(f"{path} does not exist")
    from ..use.vissl import import_weights

    r = import_weights(args.checkpoint, args.out, arch=args.arch, input_size=args.input_size)
    dropped = f"; dropped {len(r['dropped'])} non-backbone tensors (e.g. {r['dropped'][0]})" if r["dropped"] else ""
    print(f"openseer: {args.checkpoint} ({r['layout']} layout) -> {r['out']}: {r['arch']}, {r['tensors']} tensors"
          f"{dropped}")
    return 0


EMBED_EXAMPLES = """examples:
  openseer embed runs/a --data /images --out emb/                 # folder (recursive)
  openseer embed runs/a --data paths.txt --out emb/ --dtype float32
  openseer embed runs/a --data 'shards/{000000..000099}.tar' --out emb/ --workers 2
  openseer embed runs/a --data /images --out emb-s3s4/ --layer s3+s4   # two stages, each pooled, joined
  torchrun --nproc_per_node 4 -m openseer embed runs/a --data /images --out emb/ --device cuda  # 4 ranks share the chunks
  (interrupted? run the same command again, on any number of ranks: finished chunks are skipped)

output: emb/embeddings.npy (np.load(..., mmap_mode='r')), emb/index.csv (row,key,path),
        emb/bad.csv (key,path,reason), emb/meta.json
"""


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "embed", "embeddings of a folder, file list or shards (.npy + index.csv, resumable)", EMBED_EXAMPLES,
                   description="Run a backbone over every image of a collection and write its pooled "
                               "features. Undecodable images are skipped and listed in bad.csv.")
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
    p.add_argument("--max-chunks", type=int, default=0, metavar="N",
                   help="stop after N new chunks (per rank under torchrun); the same command continues")
    add_device(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed every image of a pile (resumable; under torchrun the ranks share the chunks and rank 0
    prints); exit 1 when stopped early."""
    check_pile(args.data)
    from ..use.api import load
    from ..use.ranks import rank_session

    set_threads(args.threads)
    with rank_session(device(args.device)) as ranks:  # before the model: each rank takes its own GPU
        model = load(args.weights, arch=args.backbone, device=device(args.device), layer=args.layer)
        meta = model.embed_collection(args.data, args.out, dtype=args.dtype, batch_size=args.batch_size,
                                      chunk_size=args.chunk_size, workers=args.workers, limit=args.limit,
                                      normalize=args.normalize, overwrite=args.overwrite, progress=not args.quiet,
                                      max_chunks=args.max_chunks)
    if not meta["complete"]:
        if ranks.is_main:
            print(f"openseer: stopped early; {meta['resume']}")
        return 1
    if not ranks.is_main:
        return 0
    if meta.get("resumed") == "already complete":
        print(f"openseer: {args.out} is already complete ({meta['n']} embeddings); --overwrite to redo it")
        return 0
    rate = f", {meta['images_per_s']} img/s" if meta.get("images_per_s") else ""
    on = f" on {meta['ranks']} ranks" if meta.get("ranks", 1) > 1 else ""
    skipped = f" ({meta['chunks_skipped']} chunks were already done)" if meta["chunks_skipped"] else ""
    print(f"openseer: {meta['n']} embeddings of {meta['dim']} {meta['dtype']} -> {meta['files']['embeddings']}, "
          f"index {meta['files']['index']}; {meta['n_bad']} skipped (bad.csv){skipped}{on}{rate}")
    return 0
    if not meta["complete"]:
        print(f"openseer: stopped early; {meta['resume']}")
        return 1
    rate = f", {meta['images_per_s']} img/s" if meta.get("images_per_s") else ""
    skipped = f" ({meta['chunks_skipped']} chunks were already done)" if meta["chunks_skipped"] else ""
    print(f"openseer: {meta['n']} embeddings of {meta['dim']} {meta['dtype']} -> {meta['files']['embeddings']}, "
          f"index {meta['files']['index']}; {meta['n_bad']} skipped (bad.csv){skipped}{rate}")
    return 0


