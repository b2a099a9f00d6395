"""Data subcommands: ``openseer shard``, ``openseer data report``, ``openseer takedown add|check``.

Thin: parsing and printing only; the work is in data/shards.py and data/takedown.py.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_shard(args: argparse.Namespace) -> int:
    """Write tar shards, a manifest and an index from a folder or a file list (resumable)."""
    from .decode import DataError
    from .shards import write_shards

    summary = write_shards(args.src, args.out, shard_size=args.shard_size, max_side=args.max_side,
                           sidecar=args.sidecar, workers=args.workers, read_timeout=args.read_timeout,
                           show_progress=not args.quiet,
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


def cmd_report(args: argparse.Namespace) -> int:
    """Summarise a shard folder: counts, sizes, formats, duplicates, skipped by reason."""
    from .shards import report

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

    from .collection import SkipCounts, open_collection, report_skips
    from .decode import BadImage, DataError, read_bytes
    from .takedown import TakedownError, add_to_denylist, content_key, read_entries

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

    from .takedown import TakedownError

    if args.pile:
        return args.pile
    if getattr(args, "list", None):
        return str(Path(args.list).expanduser().parent)
    raise TakedownError("--near needs the pile to search: --pile FOLDER|LIST|SHARDS")


def _near_copies(photos: list[str], pile: str, quiet: bool) -> list[tuple[str, str, str, float, float]]:
    """(photo, key, path, similarity, verified) of every copy of each photo found in ``pile``."""
    from pathlib import Path

    from .decode import BadImage, load_image
    from .nearcopy import PileIndex
    from .takedown import TakedownError

    imgs = []
    for ph in photos:
        try:
            imgs.append((ph, load_image(Path(ph))))
        except BadImage as e:
            raise TakedownError(f"cannot read photo {ph}: {e}") from None
    index = PileIndex(pile, progress=not quiet)
    if index.skipped and not quiet:
        print(f"openseer: {sum(index.skipped.values())} pile images not searchable "
              f"({', '.join(f'{k} {v}' for k, v in sorted(index.skipped.items()))})", file=sys.stderr)
    return [(ph, key, path, s, f) for ph, img in imgs for key, path, s, f in index.copies_of(img)]


def _takedown_add_near(args: argparse.Namespace) -> int:
    """Deny-list photos and every near copy of them found in the pile (by key, with the reason)."""
    from pathlib import Path

    from .decode import read_file
    from .takedown import TakedownError, add_to_denylist, content_key

    photos = list(args.files) + list(args.image or [])
    if not photos:
        raise TakedownError("nothing to add: give the photo(s) to take down with --near")
    found = _near_copies(photos, _near_pile(args), args.quiet)
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
    """Which runs and checkpoints saw an image (exit 1 when any did)."""
    from .takedown import check_image

    if args.near:
        return _takedown_check_near(args)
    if not args.runs:
        from .takedown import TakedownError

        raise TakedownError("give --runs RUNS (a run directory or a folder of runs), or --near --pile PILE")

    key, sightings = check_image(args.image, args.runs, read_timeout=args.read_timeout)
    if args.json:
        print(json.dumps({"key": key, "runs": [
            {"run": s.run, "read": s.read, "shard": s.shard, "position": s.position,
             "checkpoints": s.checkpoints, "note": s.note} for s in sightings]}))
    else:
        print(f"content key {key}")
        for s in sightings:
            if not s.read:
                print(f"  {s.run}: not read ({s.note})")
                continue
            saw = [c for c, v in s.checkpoints.items() if v]
            clean = [c for c, v in s.checkpoints.items() if not v]
            print(f"  {s.run}: READ (shard {s.shard}, sample {s.position}); "
                  f"checkpoints that saw it: {', '.join(saw) or 'none'}; not yet: {', '.join(clean) or 'none'}"
                  + (f" [{s.note}]" if s.note else ""))
    return 1 if any(any(s.checkpoints.values()) for s in sightings) else 0


def _takedown_check_near(args: argparse.Namespace) -> int:
    """Near copies of an image in a pile, whether each is deny-listed, and (with --runs) who saw them."""
    from pathlib import Path

    from .stream import DEFAULT_DENYLIST
    from .takedown import DenyList, check_image

    pile = _near_pile(args)
    found = _near_copies([args.image], pile, args.quiet)
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


def _read_timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--read-timeout", type=float, default=None, metavar="S",
                   help="give up a file that takes longer than S seconds to read, counted as 'timeout' "
                        "(default $OPENSEER_READ_TIMEOUT or 60)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``shard``, ``data`` and ``takedown`` to the ``openseer`` command."""
    p = sub.add_parser("shard", help="pack a folder or file list of images into tar shards + manifest",
                       description="Write tar shards (webdataset layout: <key>.jpg + <key>.json), manifest.csv, "
                                   "skipped.csv and index.json. Keys are content hashes (first 32 hex of SHA-256); "
                                   "exact duplicates are dropped; bad files are skipped by reason. Re-run the same "
                                   "command to resume an interrupted run.")
    p.add_argument("src", help="a folder of images (recursive) or a text file with one image path per line")
    p.add_argument("--out", required=True, help="output folder (nothing is written outside it)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side exceeds this (JPEG q95 / PNG stays PNG); 0 = keep")
    p.add_argument("--sidecar", help="CSV with a 'path' column and e.g. source_url, licence: copied into the manifest")
    p.add_argument("--workers", type=int, default=0, help="decode processes (default: up to 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-shard progress lines")
    _read_timeout_option(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("data", help="inspect shard folders (data report)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("report", help="counts, sizes, formats, duplicates and skipped files of a shard folder")
    q.add_argument("folder", help="a folder written by `openseer shard`")
    q.add_argument("--json", action="store_true", help="one JSON object instead of text")
    q.set_defaults(func=cmd_report)

    p = sub.add_parser("takedown", help="deny-list images (honoured at read time) and audit which runs saw one")
    td = p.add_subparsers(dest="takedown_command", required=True)
    q = td.add_parser("add", help="add content hashes or manifest keys to a deny-list",
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
    _read_timeout_option(q)
    q.add_argument("--note", help="a note stored with each new entry (e.g. a ticket number)")
    q.add_argument("--near", action="store_true",
                   help="FILES are photos: deny-list each and every re-encoded, resized, cropped or flipped copy "
                        "of it found in the pile (docs/data.md, 'Near-copy takedowns')")
    q.add_argument("--pile", help="with --near: the folder, file list or shards to search (default: the folder "
                                  "holding --list)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress")
    q.set_defaults(func=cmd_takedown_add)
    q = td.add_parser("check", help="which runs and checkpoints saw an image (exit 1 if any)")
    q.add_argument("image", help="an image file (hashed), or its content key / SHA-256")
    q.add_argument("--runs", help="a run directory or a folder of runs (searched 3 levels deep)")
    q.add_argument("--json", action="store_true", help="one JSON object instead of text")
    q.add_argument("--near", action="store_true", help="list the image's near copies in --pile (deny-listed or "
                                                       "not) and, with --runs, which runs saw each")
    q.add_argument("--pile", help="with --near: the folder, file list or shards to search")
    q.add_argument("--list", help="with --near: the deny-list to check them against (default PILE/takedowns.txt)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress")
    _read_timeout_option(q)
    q.set_defaults(func=cmd_takedown_check)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="openseer-data")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
