"""int8 ONNX export: ONNX Runtime static quantisation calibrated on a sample of the user's images.

``export_int8(model, info, out, calibrate=PILE)`` writes the fp32 ONNX file (``export.save_onnx``;
the exporter and ONNX Runtime's pre-processing fold each BatchNorm into its convolution), runs
``quant_pre_process`` (shape inference and graph optimisation, as ONNX Runtime recommends before
quantising), then ``quantize_static`` in QDQ format with per-channel int8 weights and uint8
activations whose ranges are calibrated on ``n`` images of the pile. Weights use a 7-bit range
(``reduce_range``): x86 CPUs without VNNI multiply uint8 x int8 pairs into saturating int16 sums,
which with full-range weights cost a trained tiny-cpu teacher a worst-image cosine of 0.90 to
fp32 (0.998 with the 7-bit range; ONNX Runtime's advice for such CPUs). Images are read through
the same eval transform as ``openseer eval`` and ``openseer embed`` (crop size, mean/std of the
weights). The int8 model is then run in onnxruntime on the calibration sample and compared with the fp32
PyTorch backbone: the largest absolute feature difference and the per-image cosine similarity
(mean and worst) come back with both file sizes; the caller refuses an export past its tolerance.

A classifier (``openseer export CLF --int8``) is quantised whole except its head, which stays in
fp32 (a few nodes): a linear head folded onto raw features has large weights that turn the int8
features' small errors into wrong classes (measured on a 3-class colour set on a tiny RegNet: top-1
agreement with fp32 41.7% with the head in int8 and 7-bit weights, 100% with the head in fp32),
and a kNN head's top-k and vote are not int8 operations. Its check is the share of calibration
images whose top-1 class is the fp32 classifier's (``top1_agreement``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..data.decode import DataError
from ..eval.common import EvalTransform
from ..model.checkpoint_file import CheckpointError
from .export import save_onnx
from .metadata import file_metadata, output_name

CALIBRATION_BATCH = 32


class QuantizeError(DataError):
    """An int8 export that cannot be made or checked: no calibration images, onnxruntime missing."""


def calibration_batch(spec: str, n: int, info: dict) -> tuple[torch.Tensor, dict]:
    """(normalised float batch (N, 3, crop, crop), counts) of ``n`` images spread evenly over ``spec``
    (a folder, a .txt list of paths, tar shards or fashion-mnist), undecodable ones skipped."""
    from ..data.collection import Chunk, open_collection
    from ..eval.common import draft_size

    if n < 1:
        raise QuantizeError(f"--calibrate-n must be >= 1; got {n}")
    try:
        coll = open_collection(spec)
    except DataError as e:  # no such path, no images in it
        raise QuantizeError(f"calibration images (--calibrate): {e}") from None
    crop = int(info["crop_size"])
    transform = EvalTransform(crop, tuple(info["mean"]), tuple(info["std"]))
    images: list[torch.Tensor] = []
    bad: dict[str, int] = {}
    if coll.kind == "shards":  # no random access: the first n of the stream
        chunks = coll.chunks
    else:  # evenly spaced rows, one tiny chunk each
        rows = np.unique(np.linspace(0, coll.n - 1, num=min(n, coll.n)).round().astype(int)) if coll.n else []
        chunks = [Chunk(i, int(r), int(r) + 1) for i, r in enumerate(rows)]
    for chunk in chunks:
        for _, _, _, item in coll.read_chunk(chunk, draft_size(crop)):
            if isinstance(item, str):
                reason = item.split(":", 1)[0]
                bad[reason] = bad.get(reason, 0) + 1
                continue
            images.append(transform(item.unsqueeze(0)))
            if len(images) >= n:
                break
        if len(images) >= n:
            break
    if not images:
        skipped = f" ({sum(bad.values())} unreadable: {bad})" if bad else ""
        raise QuantizeError(f"no calibration images could be read from {spec}{skipped}: give --calibrate a "
                            f"folder, file list or shards holding images")
    return torch.cat(images), {"images": len(images), "skipped": bad, "source": coll.description,
                               "available": int(coll.n)}


def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, x: torch.Tensor, batch: int = CALIBRATION_BATCH) -> np.ndarray:
    """Features (N, D) float32 of an onnxruntime session over ``x`` in batches."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)])


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Largest |difference|, the reference's largest |value| and per-row cosine similarity (mean, worst)."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    cos = (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
    return {"max_abs_diff": float(np.abs(ref - got).max()), "max_abs_ref": float(np.abs(ref).max()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """The share of rows whose highest-scoring class is the same in ``got`` as in ``ref``."""
    return float((ref.argmax(1) == got.argmax(1)).mean())


def refusal_advice(calibration: dict, n: int, threshold: str) -> str:
    """What can still help when an int8 export is refused: more of the pile's images only when the
    calibration did not use them all (``calibration_batch``'s counts), else another pile, a looser
    ``threshold`` (the option that refused it) or the fp32 export."""
    used, available = int(calibration["images"]), int(calibration.get("available") or 0)
    if used >= n and available > used:
        more = f"calibrate on more of its {available} images (--calibrate-n {min(available, max(4 * n, 256))}), "
    else:
        more = (f"all {used} readable calibration images were used: calibrate on a larger pile of the images "
                f"the model will see (--calibrate), ")
    return f"{more}accept a looser {threshold} if that is close enough for you, or keep the fp32 ONNX export (drop --int8)"


def downstream_of(path: Path, initializers: set[str]) -> list[str]:
    """Names of the nodes that read any of ``initializers`` and of every node after them: a
    classifier's head (its weights, or a kNN head's bank), kept in fp32 by ``export_int8``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    tainted, names = set(initializers), []
    for node in graph.node:  # topologically sorted, as ONNX requires
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names


def _count_ops(path: Path, op: str) -> int:
    import onnx

    return sum(node.op_type == op for node in onnx.load(str(path), load_external_data=False).graph.node)


def export_int8(model: torch.nn.Module, info: dict, out_path: str | Path, calibrate: str, n: int = 256,
                opset: int | None = None, per_channel: bool = True, reduce_range: bool = True,
                fp32_after: set[str] | None = None) -> dict:
    """Write a static int8 (QDQ) ONNX model of ``model`` calibrated on ``n`` images of ``calibrate``.

    Returns sizes (fp32 and int8 bytes), the calibration counts, and ``compare``'s numbers for the
    int8 model (onnxruntime, CPU) against the fp32 PyTorch model on the calibration sample; for a
    classifier (``info['head_meta']``, ``model`` the whole classifier) also ``top1_agreement``.
    ``reduce_range=False`` gives the weights the full int8 range (see the module docstring).
    ``fp32_after``: names of weights (a classifier's head) whose nodes, and all nodes after them, stay
    in fp32 (``downstream_of``).
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise QuantizeError("int8 export needs onnx and onnxruntime: pip install 'openseer[onnx]'") from None
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".onnx":
        raise CheckpointError(f"--int8 writes an ONNX file (.onnx); got {out_path}")
    model = model.float().cpu().eval()
    x, counts = calibration_batch(calibrate, n, info)

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([x[i:i + CALIBRATION_BATCH].numpy() for i in range(0, len(x), CALIBRATION_BATCH)])
            self.name = name

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {self.name: b}

    with tempfile.TemporaryDirectory(prefix="openseer-int8-") as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        save_onnx(model, info, fp32, opset)
        try:
            quant_pre_process(str(fp32), str(pre))
        except Exception:  # ONNX Runtime's symbolic shape inference fails on a kNN head's Expand: ONNX's own
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        bn_left = _count_ops(pre, "BatchNormalization")
        staged = Path(tmp) / "int8.onnx"
        keep = downstream_of(pre, fp32_after) if fp32_after else []
        quantize_static(str(pre), str(staged), Reader(_session(pre).get_inputs()[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep)
        proto = onnx.load(str(staged))
        meta = file_metadata(info)
        meta.update(quantization=f"int8 static (onnxruntime quantize_static, QDQ, per-channel int8 weights in a "
                                 f"{'7' if reduce_range else '8'}-bit range, uint8 activations, MinMax calibration)"
                                 + (f"; the head's {len(keep)} nodes in fp32" if keep else ""),
                    calibration=f"{counts['images']} images of {calibrate}")
        onnx.helper.set_model_props(proto, meta)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        part = out_path.with_name(out_path.name + ".tmp.onnx")
        onnx.save(proto, str(part))
        part.replace(out_path)
        fp32_bytes = fp32.stat().st_size
    with torch.inference_mode():
        ref = torch.cat([model(x[i:i + CALIBRATION_BATCH]) for i in range(0, len(x), CALIBRATION_BATCH)]).numpy()
    got = run_onnx(_session(out_path), x)
    result = {"path": str(out_path), "format": "onnx", "int8": True, "arch": info["arch"],
              "bytes": out_path.stat().st_size, "fp32_bytes": fp32_bytes, "calibration": counts,
              "batchnorm_left": bn_left, **compare(ref, got)}
    if info.get("head_meta"):
        result["top1_agreement"] = top1_agreement(ref, got)
    return result


def export_quantized(source: str, out_path: str | Path, calibrate: str | None, n: int = 256, fmt: str | None = None,
                     arch: str | None = None, opset: int | None = None, backbone_only: bool = False) -> dict:
    """``openseer export SOURCE --int8 --calibrate PILE``: load the weights, then ``export_int8`` (of
    the whole classifier when SOURCE is one, unless ``backbone_only``)."""
    from ..model.load import load_backbone
    from .export import classifier_parts, format_for

    if not calibrate:
        raise QuantizeError("--int8 needs calibration images: --calibrate PILE (a folder, file list, shards "
                            "or fashion-mnist; a few hundred images of the kind the model will see)")
    fmt = format_for(out_path, fmt)
    if fmt != "onnx":
        raise QuantizeError(f"--int8 is offered for ONNX only (--format onnx); not {fmt}: torch's int8 "
                            f"(torch.ao) did not run faster than fp32 on the CPUs measured (docs/benchmarks.md)")
    model, info = load_backbone(str(source), arch=arch)
    if info.get("classifier") and not backbone_only:
        from .classifier import head_names

        model, info, _ = classifier_parts(model, info)
        result = export_int8(model, info, out_path, calibrate, n=n, opset=opset, fp32_after=head_names(model))
        classes = json.loads(info["head_meta"]["classes"])
        return result | {"classifier": True, "classes": classes, "output": output_name(info)}
    return export_int8(model, info, out_path, calibrate, n=n, opset=opset)


__all__ = ["QuantizeError", "calibration_batch", "compare", "export_int8", "export_quantized", "refusal_advice",
           "run_onnx", "top1_agreement"]
