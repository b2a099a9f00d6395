"""Data commands: ``shard``, ``data report``, ``index``, ``takedown add|check`` and ``curate``.

Thin: parse, call the package (openseer/data/, openseer/use/curate.py), print; the heavy modules
are imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_device, add_parser, add_read_timeout, add_threads, check_pile, device, set_threads


def cmd_shard(args: argparse.Namespace) -> int:
    """Write tar shards, a manifest and an index from a folder or a file list (resumable)."""
    from ..data.decode import DataError
    from ..data.shards import write_shards

    summary = write_shards(args.src, args.out, shard_size=args.shard_size, max_side=args.max_side,
                           sidecar=args.sidecar, workers=args.workers, read_timeout=args.read_timeout,
                           show_progress=not args.quiet, index=not args.no_index,
                           log=(lambda text: None) if args.quiet else (lambda text: print(text, flush=True)))
    counts = summary["counts"]
    skipped = {k[len("skipped_"):]: v for k, v in sorted(counts.items()) if k.startswith("skipped_")}
    if not summary["total"]:
        raise DataError(f"no usable image in {args.src}: all {sum(skipped.values())} inputs were skipped "
                        f"({', '.join(f'{k} {v}' for k, v in skipped.items())}; see {args.out}/skipped.csv)")
    print(f"openseer: {summary['total']} images in {len(summary['shards'])} shard(s) under {args.out} "
          f"(manifest.csv, index.json); skipped: {skipped or 'none'}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_data_report(args: argparse.Namespace) -> int:
    """Summarise a shard folder: counts, sizes, formats, duplicates, skipped by reason."""
    from ..data.shards import report

    r = report(args.folder)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['folder']}: {r['images']} images in {r['shards']} shards (from {r['inputs']} inputs)")
    print(f"  bytes: original {_human(r['original_bytes'])}, stored {_human(r['stored_bytes'])}, "
          f"shards {_human(r['shard_bytes'])} (max side {r['max_side'] or 'unchanged'})")
    print(f"  formats: {r['formats']}  stored as: {r['stored_formats']}")
    mp = r["megapixels"]
    print(f"  megapixels: min {mp['min']}, median {mp['median']}, p90 {mp['p90']}, max {mp['max']}")
    print(f"  exact duplicates dropped: {r['duplicates']}")
    print(f"  skipped by reason: {r['skipped'] or 'none'}")
    if r["denylist"]:
        print(f"  takedowns.txt: {r['denylist']['entries']} keys (version {r['denylist']['version']})")
    return 0


def cmd_takedown_add(args: argparse.Namespace) -> int:
    """Add content hashes/keys (from files, or of image files) to a deny-list."""
    from pathlib import Path

    from ..data.collection import SkipCounts, open_collection, report_skips
    from ..data.decode import BadImage, DataError, read_bytes
    from ..data.takedown import TakedownError, add_to_denylist, content_key, read_entries

    if args.near:
        return _takedown_add_near(args)
    keys: list[str] = []
    for f in args.files:
        keys += read_entries(f)
    for img in args.image or []:
        if Path(img).is_dir() or args.images_from_list:
            # a collection: every readable file of it, by content (read as every command reads it)
            try:
                coll = open_collection(img, read_timeout=args.read_timeout, shards=False)
            except DataError as e:
                raise TakedownError(str(e)) from None
            coll.deny = type(coll.deny).load("")  # listing what to deny: the current list must not hide files
            skips = SkipCounts()
            for item in coll.items(skips=skips):  # decoded: only images are listed, as every reader sees them
                if item.ok:
                    keys.append(content_key(item.data or b""))
            report_skips(skips, f"openseer: {img}")
            continue
        try:
            keys.append(content_key(read_bytes(Path(img), args.read_timeout)))
        except BadImage as e:
            raise TakedownError(f"cannot read image {img}: {e}") from None
    if not keys:
        raise TakedownError("nothing to add: give a file of hashes/keys or --image FILE")
    added, deny = add_to_denylist(args.list, keys, note=args.note or "")
    print(f"openseer: added {added} key(s) ({len(keys) - added} already listed) to {args.list}: "
          f"{len(deny)} keys, version {deny.version}")
    return 0


def _near_pile(args: argparse.Namespace) -> str:
    """The pile a --near takedown searches: --pile, else the folder holding the deny-list."""
    from pathlib import Path

    from ..data.takedown import TakedownError

    if args.pile:
        return args.pile
    if getattr(args, "list", None):
        return str(Path(args.list).expanduser().parent)
    raise TakedownError("--near needs the pile to search: --pile FOLDER|LIST|SHARDS")


def _near_copies(photos: list[str], pile: str, quiet: bool, index: str = "",
                 no_index: bool = False) -> list[tuple[str, str, str, float, float]]:
    """(photo, key, path, similarity, verified) of every copy of each photo found in ``pile``: from
    the pile's index (``openseer index``) when it has one, else by a scan of the pile."""
    from pathlib import Path

    from ..data.decode import BadImage, load_image
    from ..data.index import open_index
    from ..data.nearcopy import PileIndex
    from ..data.takedown import TakedownError

    imgs = []
    for ph in photos:
        try:
            imgs.append((ph, load_image(Path(ph))))
        except BadImage as e:
            raise TakedownError(f"cannot read photo {ph}: {e}") from None
    index = None if no_index else open_index(pile, index)  # IndexMismatch (exit 2) when it is stale
    if index is None:
        if not quiet and not no_index:
            print(f"openseer: {pile} has no index: scanning it (`openseer index {pile}` once makes --near "
                  f"answer from the index)", file=sys.stderr)
        index = PileIndex(pile, progress=not quiet)
    if index.skipped and not quiet:
        print(f"openseer: {sum(index.skipped.values())} pile images not searchable "
              f"({', '.join(f'{k} {v}' for k, v in sorted(index.skipped.items()))})", file=sys.stderr)
    return [(ph, key, path, s, f) for ph, img in imgs for key, path, s, f in index.copies_of(img)]


def _takedown_add_near(args: argparse.Namespace) -> int:
    """Deny-list photos and every near copy of them found in the pile (by key, with the reason)."""
    from pathlib import Path

    from ..data.decode import read_file
    from ..data.takedown import TakedownError, add_to_denylist, content_key

    photos = list(args.files) + list(args.image or [])
    if not photos:
        raise TakedownError("nothing to add: give the photo(s) to take down with --near")
    found = _near_copies(photos, _near_pile(args), args.quiet, args.index or "", args.no_index)
    added = 0
    for ph in photos:
        note = f"{args.note + '; ' if args.note else ''}photo {Path(ph).name}"
        added += add_to_denylist(args.list, [content_key(read_file(Path(ph)))], note=note)[0]
    for ph, key, path, s, f in found:
        note = (f"{args.note + '; ' if args.note else ''}near copy of {Path(ph).name} "
                f"(descriptor {s:.3f}, verified {f:.3f})")
        added += add_to_denylist(args.list, [key], note=note)[0]
        print(f"  {key}\t{path}\tnear copy of {ph} ({s:.3f}/{f:.3f})")
    deny = add_to_denylist(args.list, [], "")[1]
    print(f"openseer: {len(found)} near copies of {len(photos)} photo(s) found; added {added} key(s) to "
          f"{args.list}: {len(deny)} keys, version {deny.version}")
    return 0


def cmd_takedown_check(args: argparse.Namespace) -> int:
    """Which runs and checkpoints saw an image (exit 1 when any did, or one cannot tell)."""
    from ..data.takedown import check_image

    if args.near:
        return _takedown_check_near(args)
    if not args.runs:
        from ..data.takedown import TakedownError

        raise TakedownError("give --runs RUNS (a run directory or a folder of runs), or --near --pile PILE")

    key, sightings = check_image(args.image, args.runs, read_timeout=args.read_timeout)
    if args.json:
        print(json.dumps({"key": key, "runs": [
            {"run": s.run, "read": s.read, "shard": s.shard, "position": s.position,
             "checkpoints": s.checkpoints, "unsure": s.unsure, "note": s.note} for s in sightings]}))
    else:
        print(f"content key {key}")
        for s in sightings:
            if s.unsure and not s.read:
                print(f"  {s.run}: CANNOT TELL ({s.note})")
                continue
            if not s.read:
                print(f"  {s.run}: not read ({s.note})")
                continue
            saw = [c for c, v in s.checkpoints.items() if v]
            clean = [c for c, v in s.checkpoints.items() if not v]
            print(f"  {s.run}: READ (shard {s.shard}, sample {s.position}); "
                  f"checkpoints that saw it: {', '.join(saw) or 'none'}; not yet: {', '.join(clean) or 'none'}"
                  + (f" [{s.note}]" if s.note else ""))
    return 1 if any(any(s.checkpoints.values()) or (s.unsure and not s.read) for s in sightings) else 0


def _takedown_check_near(args: argparse.Namespace) -> int:
    """Near copies of an image in a pile, whether each is deny-listed, and (with --runs) who saw them."""
    from pathlib import Path

    from ..data.stream import DEFAULT_DENYLIST
    from ..data.takedown import DenyList, check_image

    pile = _near_pile(args)
    found = _near_copies([args.image], pile, args.quiet, args.index or "", args.no_index)
    list_path = args.list or (str(Path(pile) / DEFAULT_DENYLIST) if Path(pile).is_dir() else "")
    deny = DenyList.load(list_path) if list_path else DenyList()
    seen_any = False
    rows = []
    for _ph, key, path, s, f in found:
        row = {"key": key, "path": path, "similarity": round(s, 4), "verified": round(f, 4),
               "denied": deny.denies(key)}
        if args.runs:
            target = path if Path(path).is_file() else key
            _k, sightings = check_image(target, args.runs, read_timeout=args.read_timeout)
            row["runs"] = {x.run: x.checkpoints for x in sightings if x.read}
            seen_any = seen_any or any(any(x.checkpoints.values()) for x in sightings)
        rows.append(row)
    if args.json:
        print(json.dumps({"image": args.image, "pile": pile, "copies": rows}))
    else:
        print(f"{len(rows)} near copies of {args.image} in {pile}")
        for r in rows:
            saw = [f"{run}: {', '.join(c for c, v in cps.items() if v) or 'no checkpoint'}"
                   for run, cps in r.get("runs", {}).items()]
            print(f"  {r['key']}  {r['path']}  ({r['similarity']}/{r['verified']})  "
                  f"{'deny-listed' if r['denied'] else 'NOT deny-listed'}" + (f"; read by {'; '.join(saw)}" if saw else ""))
    return 1 if seen_any else 0


SHARD_EXAMPLES = """examples:
  openseer shard /pile --out shards/                          # shard size chosen from the pile; indexed too
  openseer shard paths.txt --out shards/ --max-side 512 --sidecar licences.csv
  openseer data report shards/                                # what went in, what was skipped
  openseer pretrain --data shards/ --out runs/a               # train from the shards
  OPENSEER_DICOM_WINDOW=none openseer shard /dicom --out s/   # DICOM -> 16-bit PNG of the whole stored range
  (interrupted? run the same command again: it resumes)
"""


def add_shard(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "shard", "pack a folder or file list of images into tar shards + manifest", SHARD_EXAMPLES,
                   description="Write tar shards (webdataset layout: <key>.jpg + <key>.json), manifest.csv, "
                               "skipped.csv and index.json. Keys are content hashes (first 32 hex of SHA-256); "
                               "exact duplicates are dropped; bad files are skipped by reason. Re-run the same "
                               "command to resume an interrupted run.")
    p.add_argument("src", help="a folder of images (recursive) or a text file with one image path per line")
    p.add_argument("--out", required=True, help="output folder (nothing is written outside it)")
    p.add_argument("--shard-size", type=int, default=0,
                   help="images per shard (default: up to 8 even shards of at least 256 images, at most 10000, "
                        "so a small pile still feeds several loader workers)")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side exceeds this (JPEG q95 / PNG stays PNG); 0 = keep")
    p.add_argument("--sidecar", help="CSV with a 'path' column and e.g. source_url, licence: copied into the manifest")
    p.add_argument("--workers", type=int, default=0, help="decode processes (default: up to 4)")
    p.add_argument("--no-index", action="store_true",
                   help="do not write the pile index (OUT/.openseer-index: near-copy descriptors for takedown "
                        "--near and curate, described while each image is in hand; else `openseer index OUT`)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-shard progress lines")
    add_read_timeout(p)
    p.set_defaults(func=cmd_shard)


DATA_REPORT_EXAMPLES = """examples:
  openseer data report shards/
  openseer data report shards/ --json
"""


def add_data(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "data", "inspect shard folders (data report)", DATA_REPORT_EXAMPLES)
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = add_parser(data_sub, "report", "counts, sizes, formats, duplicates and skipped files of a shard folder",
                   DATA_REPORT_EXAMPLES)
    q.add_argument("folder", help="a folder written by `openseer shard`")
    q.add_argument("--json", action="store_true", help="one JSON object instead of text")
    q.set_defaults(func=cmd_data_report)


def _add_index_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--index", metavar="DIR", help="with --near: the pile's index folder (default: "
                                                  "ROOT/.openseer-index, written by `openseer index`)")
    q.add_argument("--no-index", action="store_true", help="with --near: scan the pile, not its index")


INDEX_EXAMPLES = """examples:
  openseer index /pile                          # describe every image once: /pile/.openseer-index/
  openseer index shards/                        # shards: one part per shard
  openseer index /pile                          # again after adding images: only the new ones
  torchrun --nproc_per_node 4 -m openseer index /pile   # 4 processes share the parts; the same index
  openseer index /photos --pixels 448           # also a small copy of each large image (pretrain's decode cache)
  openseer takedown add photo.jpg --near --list /pile/takedowns.txt   # answers from the index
"""


def add_index(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "index", "store near-copy descriptors of a pile beside it (takedown --near, curate)",
                   INDEX_EXAMPLES,
                   description="Describe every image of a folder, a file list or local tar shards once and store "
                               "the descriptors in ROOT/.openseer-index (resumable, part by part). Run it again "
                               "after the pile changed: new images are described, unchanged ones kept, changed "
                               "ones described again. takedown --near and curate read it and refuse an index "
                               "that no longer matches the pile (docs/data.md, 'The pile index'). Under torchrun the "
                               "ranks describe disjoint parts and rank 0 writes the manifest: the same index as "
                               "one process.")
    p.add_argument("pile", metavar="PILE", help="a folder of images, a .txt list of paths, or local tar shards")
    p.add_argument("--index", metavar="DIR", help="the index folder (default: ROOT/.openseer-index)")
    p.add_argument("--rebuild", action="store_true", help="describe everything again")
    p.add_argument("--workers", type=int, default=0, help="processes reading and describing files (default 0: "
                                                          "in this process)")
    p.add_argument("--files-per-part", type=int, default=0, metavar="N",
                   help="files described and stored together (default 1024; smaller: finer resume, and "
                        "parts spread over more torchrun ranks)")
    p.add_argument("--pixels", type=int, default=0, metavar="SIDE",
                   help="also keep a copy of each image larger than SIDE px, its longer side brought to SIDE: "
                        "the decode cache pretrain and distill read (data.decode_cache; they build it themselves, "
                        "at the side their crops need, when it is missing)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    """Build or extend the pile's index (under torchrun the ranks share the parts; rank 0 writes the
    manifest and prints)."""
    check_pile(args.pile)
    from ..data.index import IndexMismatch, build_index
    from ..use.ranks import rank_session

    if args.files_per_part < 0:
        raise IndexMismatch(f"--files-per-part must be 1 or more (0: the default); got {args.files_per_part}")
    if args.pixels < 0:
        raise IndexMismatch(f"--pixels must be a side in pixels (0: no copies); got {args.pixels}")

    with rank_session("cpu") as ranks:
        quiet = args.quiet or not ranks.is_main
        r = build_index(args.pile, args.index or "", rebuild=args.rebuild, progress=not quiet,
                        log=(lambda t: None) if quiet else print, workers=args.workers, ranks=ranks,
                        files_per_part=args.files_per_part, pixels=args.pixels)
    if not ranks.is_main:
        return 0
    st = {k: v for k, v in sorted(r["statuses"].items()) if k != "described"}
    on = f" on {ranks.world} ranks" if ranks.world > 1 else ""
    print(f"openseer: index {r['folder']}: {r['rows']} images; described now {r['described']}{on} "
          f"({r['images_per_s']} img/s), kept {r['kept']}, dropped {r['dropped']}"
          + (f"; without a descriptor: {st}" if st else ""))
    if args.pixels:
        print(f"openseer: decode cache: {r['stored']} copies of at most {args.pixels} px (made now {r['copied']}); "
              f"images no larger, unreadable or DICOM are read as they are")
    return 0


TAKEDOWN_ADD_EXAMPLES = """examples:
  openseer takedown add hashes.txt --list shards/takedowns.txt --note "ticket 123"
  openseer takedown add --image photo.jpg --list shards/takedowns.txt
  openseer takedown add photo.jpg --near --list shards/takedowns.txt    # and its near copies in shards/
  (with `openseer index shards/` run once, --near answers from the index instead of scanning the pile)
"""

TAKEDOWN_CHECK_EXAMPLES = """examples:
  openseer takedown check photo.jpg --runs runs/              # which runs and checkpoints saw it (exit 1 if any, or cannot tell)
  openseer takedown check 0123456789abcdef0123456789abcdef --runs runs/a --json   # by content key
  openseer takedown check photo.jpg --near --pile shards/ --runs runs/
"""


def add_takedown(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "takedown", "deny-list images (honoured at read time) and audit which runs saw one",
                   TAKEDOWN_ADD_EXAMPLES + TAKEDOWN_CHECK_EXAMPLES.removeprefix("examples:\n"))
    td = p.add_subparsers(dest="takedown_command", required=True)
    q = add_parser(td, "add", "add content hashes or manifest keys to a deny-list", TAKEDOWN_ADD_EXAMPLES,
                   description="Append keys to a deny-list (created if missing). Lines of the input files: a "
                               "SHA-256 (64 hex), a content key (32 hex) or a manifest key; '#' comments. "
                               "Runs reading shards apply --list via data.denylist=LIST, or automatically "
                               "when it is SHARDS/takedowns.txt.")
    q.add_argument("files", nargs="*", help="text files of hashes or keys, one per line")
    q.add_argument("--list", required=True, help="the deny-list file, e.g. shards/takedowns.txt")
    q.add_argument("--image", action="append", metavar="FILE",
                   help="also deny-list this image file's content hash (a folder: every file in it)")
    q.add_argument("--images-from-list", action="store_true",
                   help="each --image is a text file listing image paths: deny-list all of them")
    add_read_timeout(q)
    q.add_argument("--note", help="a note stored with each new entry (e.g. a ticket number)")
    q.add_argument("--near", action="store_true",
                   help="FILES are photos: deny-list each and every re-encoded, resized, cropped or flipped copy "
                        "of it found in the pile (docs/data.md, 'Near-copy takedowns')")
    q.add_argument("--pile", help="with --near: the folder, file list or shards to search (default: the folder "
                                  "holding --list)")
    _add_index_options(q)
    q.add_argument("-q", "--quiet", action="store_true", help="no progress")
    q.set_defaults(func=cmd_takedown_add)
    q = add_parser(td, "check", "which runs and checkpoints saw an image (exit 1 if any, or cannot tell)", TAKEDOWN_CHECK_EXAMPLES)
    q.add_argument("image", help="an image file (hashed), or its content key / SHA-256")
    q.add_argument("--runs", help="a run directory or a folder of runs (searched 3 levels deep)")
    q.add_argument("--json", action="store_true", help="one JSON object instead of text")
    q.add_argument("--near", action="store_true", help="list the image's near copies in --pile (deny-listed or "
                                                       "not) and, with --runs, which runs saw each")
    q.add_argument("--pile", help="with --near: the folder, file list or shards to search")
    q.add_argument("--list", help="with --near: the deny-list to check them against (default PILE/takedowns.txt)")
    _add_index_options(q)
    q.add_argument("-q", "--quiet", action="store_true", help="no progress")
    add_read_timeout(q)
    q.set_defaults(func=cmd_takedown_check)


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


def add_curate(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "curate", "deduplicate and rebalance an uncurated pile: kept list, decisions, report", CURATE_EXAMPLES,
                   description="Embed a pile with a backbone, group near-duplicates (faiss kNN + threshold) and keep "
                               "one per group, rebalance by k-means clusters, keep --keep of the pile.")
    p.add_argument("pile", metavar="PILE", help="a folder of images, a .txt list of paths, or tar shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", required=True, metavar="WEIGHTS",
                   help="the backbone to embed with: a run directory, checkpoint, exported file or timm name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, default=0.5, help="share of the pile to keep, in (0, 1] (default 0.5)")
    g.add_argument("--keep-count", type=int, default=0, metavar="N", help="number of images to keep")
    p.add_argument("--dup-threshold", type=float, default=0.95,
                   help="cosine similarity (of --dup-by) that makes two images near-duplicates (default 0.95)")
    p.add_argument("--embeddings", metavar="DIR", default="",
                   help="a finished `openseer embed` folder of this pile made with --model: read instead of "
                        "embedding the pile again (refused, naming what differs, when it is of other images or "
                        "another model)")
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
    add_device(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_curate)


def cmd_curate(args: argparse.Namespace) -> int:
    """Deduplicate and rebalance a pile: the kept list, every decision and a report."""
    check_pile(args.pile)
    check_pile(args.reference)
    from ..use.curate import curate
    from ..use.ranks import rank_session

    set_threads(args.threads)
    with rank_session(device(args.device)) as ranks:  # under torchrun the ranks share the embedding passes
        r = curate(args.pile, args.out, args.model, keep=None if args.keep_count else args.keep,
                   keep_count=args.keep_count, dup_threshold=args.dup_threshold, clusters=args.clusters,
                   levels=args.levels, reference=args.reference or "", drop_off_domain=args.drop_off_domain,
                   dup_by=args.dup_by,
                   seed=args.seed, shards=args.shards, batch_size=args.batch_size, workers=args.workers,
                   device=device(args.device), layer=args.layer, max_memory=int(args.max_memory_gb * 2**30),
                   progress=not args.quiet, log=(lambda t: None) if args.quiet or not ranks.is_main else print,
                   embeddings=args.embeddings)
    if r is None:  # a torchrun rank other than 0: its share of the embedding is written
        return 0
    od = r["off_domain"]
    share = f"; off-domain {100 * od['share']:.1f}%" if od.get("given") else ""
    print(f"openseer: kept {r['kept']} of {r['inputs']} images ({r['decisions']}; {r['bad']} bad"
          f"{share}) -> {r['files']['list.txt']}; report {r['files']['report.html']}")
    if r.get("warning"):
        print(f"openseer: warning: {r['warning']}", file=sys.stderr)
    if r.get("note"):
        print(f"openseer: note: {r['note']}", file=sys.stderr)
    return 0

