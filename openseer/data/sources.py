"""Where images come from: a folder of files (searched recursively), Fashion-MNIST, or tar shards.

A source is an indexable collection of unlabelled images with a stable key per image. Small
sources (Fashion-MNIST) live in memory as one uint8 tensor so batches can be augmented in one
go; file sources decode per image in loader workers.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from .decode import IMAGE_EXTENSIONS, DataError, load_image  # noqa: F401  (DataError: re-exported, callers import it from here)
from .reader import Collection, list_folder, open_collection, open_denylist  # noqa: F401
from .stream import INDEX, MANIFEST, count_samples, expand_spec, looks_like_shards, urls_digest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HELP = (
    "Fashion-MNIST was not found in {where}. Install it with "
    "`apt-get install -y dataset-fashion-mnist` (Debian; puts the idx files in "
    "/usr/share/datasets/fashion-mnist), or pass --data PATH to a folder holding "
    "train-images-idx3-ubyte[.gz] and friends."
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 idx file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz`` (an idx file of Fashion-MNIST), or None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_fashion_mnist(spec: str) -> bool:
    """True for ``'fashion-mnist'`` and for a folder holding its idx files."""
    path = Path(spec).expanduser()
    return spec == "fashion-mnist" or (path.is_dir() and find_idx(path, "train-images-idx3-ubyte") is not None)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 1, 28, 28) and labels as int64 (N,), from the idx files."""
    folder = Path(root) if root else Path(os.environ.get("OPENSEER_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    img_path = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise DataError(FASHION_MNIST_HELP.format(where=folder))
    images = torch.from_numpy(_read_idx(img_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    return images, labels


@dataclass
class Sample:
    """One image ready for cropping: a PIL RGB image or a uint8 CHW tensor, and its key."""

    image: Image.Image | torch.Tensor
    key: str


class ImageSource:
    """Base class: ``len``, ``key(i)`` and ``load(i)`` (raises ``BadImage`` for unusable files).

    ``streaming`` sources (tar shards) have no random access; they are read by data/stream.py.
    """

    in_memory: bool = False
    streaming: bool = False
    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def load(self, i: int, min_pixels: int | None = None) -> Sample:
        """Image ``i``; decoded sources may decode at a reduced size keeping >= ``min_pixels``."""
        raise NotImplementedError


class TensorSource(ImageSource):
    """In-memory uint8 images (N, C, H, W), e.g. Fashion-MNIST."""

    in_memory = True

    def __init__(self, images: torch.Tensor, name: str, labels: torch.Tensor | None = None):
        self.images = images
        self.labels = labels
        self.name = name
        self.description = f"{name} ({len(images)} images, {tuple(images.shape[1:])} uint8, in memory)"

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return f"{self.name}:{i}"

    def load(self, i: int, min_pixels: int | None = None) -> Sample:
        return Sample(self.images[i], self.key(i))


def describe_denylist(deny) -> str:
    """', deny-list PATH (N keys, version V)' for a source description ('' without a list)."""
    return f", deny-list {deny.path} ({len(deny)} keys, version {deny.version})" if deny.path else ""


class FolderSource(ImageSource):
    """All images under a folder, recursively, in sorted order (subfolders are NOT labels), or the
    files a file list names (``openseer curate``'s ``list.txt``, one path per line), in its order.

    Listed and read by data/reader.py (bounded reads, the deny-list by relative path or content key)."""

    def __init__(self, root: str | Path, draft_size: int | None = None, denylist: str = "",
                 read_timeout: float | None = None):
        self.root = Path(root)
        self.draft_size = draft_size
        self.collection: Collection = open_collection(str(root), denylist=denylist, read_timeout=read_timeout,
                                                      shards=False)
        self.paths = [e.path for e in self.collection.entries]
        self.deny = self.collection.deny
        self.kind = "file list" if self.root.is_file() else "folder"
        self.description = f"{self.kind} {self.root} ({len(self.paths)} files{describe_denylist(self.deny)})"

    def provenance(self) -> dict:
        """What this source reads, for RUN_DIR/data_provenance.json."""
        info: dict = {"path": str(self.root.resolve()), "files": len(self.paths), "kind": self.kind}
        if self.kind == "file list":  # "who saw it" re-reads the list: record which one it was
            import hashlib

            info["sha256"] = hashlib.sha256(self.root.read_bytes()).hexdigest()
        return {"source": str(self.root), "folder": info}

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        """The path relative to the folder, as the OS gives it (``fileio.name_to_text`` makes it text)."""
        return self.collection.entries[i].name

    def load(self, i: int, min_pixels: int | None = None) -> Sample:
        """Decode file ``i``; a deny-listed file (by its relative path or content key) is ``BadImage('denied')``."""
        draft = None if min_pixels else self.draft_size
        return Sample(self.collection.load(i, draft_size=draft, min_pixels=min_pixels), self.key(i))


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, case-insensitive extensions), sorted for a stable order."""
    return [Path(root) / n for n in list_folder(root)]


class SubsetSource(ImageSource):
    """The first ``n`` images of another source (for quick runs and tests)."""

    def __init__(self, base: ImageSource, n: int):
        self.base = base
        self.n = min(n, len(base))
        self.in_memory = base.in_memory
        self.description = f"{base.description}, first {self.n}"
        if base.in_memory:
            self.images = base.images[: self.n]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return self.base.key(i)

    def load(self, i: int, min_pixels: int | None = None) -> Sample:
        return self.base.load(i, min_pixels=min_pixels) if min_pixels else self.base.load(i)


class ShardSource(ImageSource):
    """Tar shards read as a stream (data/stream.py): no random access, a virtual epoch of N samples.

    N is ``epoch_samples`` when given, else ``limit``, else the sample count of the selected shards
    from the ``index.json`` that ``openseer shard`` writes beside them, else (local shards without
    an index) counted from the tar headers. ``pipe:`` shards without an index need
    ``data.epoch_samples``. The deny-list is ``denylist`` or, when that is empty, ``takedowns.txt``
    beside the shards (if present).
    """

    streaming = True

    def __init__(self, spec: str, epoch_samples: int = 0, denylist: str = "", limit: int = 0):
        self.spec = spec
        self.urls = expand_spec(spec)
        local = [Path(u) for u in self.urls if not u.startswith("pipe:")]
        self.root = local[0].parent if local else None
        index_path = self.root / INDEX if self.root and (self.root / INDEX).is_file() else None
        self.index: dict[str, int] = {}
        if index_path is not None:
            import json

            try:
                info = json.loads(index_path.read_text())
                self.index = {row["name"]: int(row["samples"]) for row in info.get("shards", [])}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"shard index {index_path} is unreadable: {e}") from None
        self.index_path = index_path
        self.manifest_path = self.root / MANIFEST if self.root and (self.root / MANIFEST).is_file() else None
        self.deny = open_denylist(denylist, self.root)
        self.n = int(epoch_samples or limit)
        how = "data.epoch_samples" if epoch_samples else "data.limit"
        if not self.n:
            if all(Path(u).name in self.index for u in self.urls):
                self.n, how = sum(self.index[Path(u).name] for u in self.urls), f"from {INDEX}"
            elif all(not u.startswith("pipe:") for u in self.urls):
                self.n, how = sum(count_samples(u) for u in self.urls), "counted"
            else:
                raise DataError(f"cannot tell how many samples {spec!r} holds (pipe: shards and no {INDEX}): "
                                f"set data.epoch_samples=N, the number of samples per (virtual) epoch")
        if self.n < 1:
            raise DataError(f"the shards of {spec!r} hold no samples")
        self.urls_digest = urls_digest(self.urls)
        self.description = (f"tar shards {spec} ({len(self.urls)} shards, {self.n} samples per epoch {how}"
                            f"{describe_denylist(self.deny)}, streamed)")

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        raise DataError("tar shards are a stream: samples have no index")

    def load(self, i: int, min_pixels: int | None = None) -> Sample:
        raise DataError("tar shards are a stream: samples have no index")

    def provenance(self) -> dict:
        """What this source reads, for RUN_DIR/data_provenance.json."""
        import hashlib

        def file_info(path: Path | None) -> dict | None:
            if path is None:
                return None
            st = path.stat()
            out = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            if st.st_size <= 64 * 1024 * 1024:
                out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            return out

        urls = [u if u.startswith("pipe:") else str(Path(u).resolve()) for u in self.urls]
        return {"source": self.spec, "shards": urls, "shards_digest": self.urls_digest,
                "index": file_info(self.index_path), "manifest": file_info(self.manifest_path),
                "epoch_samples": self.n}


def open_source(spec: str, limit: int = 0, draft_size: int | None = None,
                data_cfg: DataConfig | None = None) -> ImageSource:
    """Open ``--data``: 'fashion-mnist', a folder of images, a file list (one image path per line),
    a folder holding Fashion-MNIST idx files, or tar shards (a ``.tar`` path, brace range or glob, ``pipe:CMD``, or a folder written by
    ``openseer shard``); ``data_cfg`` (a DataConfig) supplies the shard reader's settings."""
    if not spec:
        raise DataError("no data given: pass --data PATH (a folder of images) or --data fashion-mnist")
    if looks_like_shards(spec):
        return ShardSource(spec, epoch_samples=getattr(data_cfg, "epoch_samples", 0),
                           denylist=getattr(data_cfg, "denylist", ""), limit=limit)
    if spec == "fashion-mnist":
        images, labels = load_fashion_mnist("train")
        source: ImageSource = TensorSource(images, "fashion-mnist", labels)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"data path {spec!r} does not exist")
        if path.is_dir() and find_idx(path, "train-images-idx3-ubyte"):
            images, labels = load_fashion_mnist("train", path)
            source = TensorSource(images, "fashion-mnist", labels)
        elif path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"data path {spec!r} is one image, not a folder or a file list (give a folder of "
                            f"images, a text file listing image paths, tar shards, or 'fashion-mnist')")
        elif path.is_dir() or path.is_file():  # a folder of images or a file list (curate's list.txt)
            source = FolderSource(path, draft_size=draft_size, denylist=getattr(data_cfg, "denylist", ""),
                                  read_timeout=getattr(data_cfg, "read_timeout", None))
        else:
            raise DataError(f"data path {spec!r} is neither a folder nor a file list (give a folder of images, "
                            f"a text file listing image paths, tar shards, or 'fashion-mnist')")
    if limit and limit < len(source):
        source = SubsetSource(source, limit)
    return source
