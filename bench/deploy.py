"""Deploy: size, CPU latency and accuracy of the fp32 and int8 exports of a teacher and a distilled student.

    python bench/deploy.py --minutes 5                          # pretrain a tiny-cpu teacher, distil, measure
    python bench/deploy.py --teacher runs/a --student runs/s    # given runs
    python bench/deploy.py --smoke                              # seconds: tiny models, a few images

For the teacher and the student, each of: ONNX fp32 and ONNX int8 (``openseer export --int8``,
calibrated on 256 Fashion-MNIST train images) run in onnxruntime (CPU), TorchScript fp32 and
torch's own int8 (FX static quantisation, x86 backend; measured to see whether it wins) run in
torch. For each: file size, latency per image at batch 1 (median of many), images/s at batch 32
(median), with the thread count, and kNN-20 and the linear probe (openseer's eval functions) on
Fashion-MNIST test from features computed by that very export (``--limit-train``/``--limit-test``
keep it short: seeded stratified subsets). One JSON line per export.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openseer.config import build_config  # noqa: E402
from openseer.data.collection import load_fashion_mnist  # noqa: E402
from openseer.eval.common import EvalTransform, stratified_take  # noqa: E402
from openseer.eval.knn import knn_eval  # noqa: E402
from openseer.eval.linear import linear_probe  # noqa: E402
from openseer.model.load import load_backbone  # noqa: E402
from openseer.use.export import export_model  # noqa: E402
from openseer.use.quantize import export_int8  # noqa: E402

warnings.filterwarnings("ignore")


def _median_time(fn, x, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _features(fn, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + batch]), dtype=np.float32) for i in range(0, len(x), batch)])


def _labelled(info: dict, limit_train: int, limit_test: int):
    tf = EvalTransform(int(info["crop_size"]), tuple(info["mean"]), tuple(info["std"]))
    out = []
    for split, limit in (("train", limit_train), ("test", limit_test)):
        images, labels = load_fashion_mnist(split)
        y = labels.numpy()
        if limit and limit < len(y):
            rows = stratified_take(y, [f"{split}:{i}" for i in range(len(y))], seed=0, fraction=limit / len(y))
            images, y = images[rows], y[rows]
        out.append((torch.cat([tf(images[i:i + 1024]) for i in range(0, len(images), 1024)]), y))
    return out


def _accuracy(fn, data) -> dict:
    (xtr, ytr), (xte, yte) = data
    ftr, fte = _features(fn, xtr), _features(fn, xte)
    knn = knn_eval(ftr, ytr, fte, yte, 10, ks=(20,))[0]["top1"]
    lin = linear_probe(ftr, ytr, fte, yte, 10)["top1"]
    return {"knn20": round(float(knn), 2), "linear": round(float(lin), 2)}


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})[0]


def _torch_fn(module):
    def run(x):
        with torch.inference_mode():
            return module(x).float().numpy()
    return run


def _fx_int8(model: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    """torch's own static int8 (FX graph mode, x86 backend), calibrated on the same images."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib[:2],))
    with torch.inference_mode():
        for i in range(0, len(calib), 32):
            prepared(calib[i:i + 32])
    return convert_fx(prepared)


def measure(name: str, spec: str, folder: Path, args, data_cache: dict) -> list[dict]:
    model, info = load_backbone(spec)
    model = model.float().eval()
    params = sum(p.numel() for p in model.parameters())
    key = (info["crop_size"], tuple(info["mean"]), tuple(info["std"]))
    if key not in data_cache:
        data_cache[key] = _labelled(info, args.limit_train, args.limit_test)
    data = data_cache[key]
    crop = int(info["crop_size"])
    x1 = torch.randn(1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    x32 = torch.randn(32, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    rows = []
    fp32_onnx, int8_onnx, ts = folder / f"{name}-fp32.onnx", folder / f"{name}-int8.onnx", folder / f"{name}.pt"
    export_model(model, info, fp32_onnx, "onnx")
    q = export_int8(model, info, int8_onnx, "fashion-mnist", n=args.calibrate_n)
    full = export_int8(model, info, folder / f"{name}-int8-full-range.onnx", "fashion-mnist", n=args.calibrate_n,
                       reduce_range=False)  # what the 7-bit weight range buys on this CPU
    export_model(model, info, ts, "torchscript")
    calib = data[0][0][:args.calibrate_n]
    fx = _fx_int8(model, calib)
    fx_path = folder / f"{name}-fx-int8.pt"
    torch.jit.save(torch.jit.trace(fx, x32, check_trace=False), str(fx_path))
    # each runtime is made just before it is timed and dropped after: an idle onnxruntime session's
    # threads spin and would steal the cores from the torch measurements
    runs = [("onnx fp32", "onnxruntime", fp32_onnx, lambda: _ort(fp32_onnx, args.threads)),
            ("onnx int8", "onnxruntime", int8_onnx, lambda: _ort(int8_onnx, args.threads)),
            ("torchscript fp32", "torch", ts, lambda: _torch_fn(torch.jit.load(str(ts)))),
            ("torch fx int8", "torch", fx_path, lambda: _torch_fn(torch.jit.load(str(fx_path))))]
    for export, runtime, path, make in runs:
        gc.collect()
        fn = make()
        b1 = _median_time(fn, x1, args.repeats)
        b32 = _median_time(fn, x32, max(5, args.repeats // 10))
        row = {"bench": "deploy", "model": name, "run": spec, "arch": info["arch"], "params_m": round(params / 1e6, 3),
               "export": export, "runtime": runtime, "threads": args.threads,
               "size_mb": round(path.stat().st_size / 1e6, 3), "latency_b1_ms": round(b1 * 1e3, 3),
               "imgs_per_s_b32": round(32 / b32, 1), **_accuracy(fn, data),
               "limit_train": args.limit_train, "limit_test": args.limit_test}
        if export == "onnx int8":
            row.update(cosine_to_fp32_min=round(q["cosine_min"], 4), cosine_to_fp32_mean=round(q["cosine_mean"], 4),
                       calibration_images=q["calibration"]["images"],
                       full_range_cosine_min=round(full["cosine_min"], 4),
                       full_range_cosine_mean=round(full["cosine_mean"], 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del fn
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="a teacher run (default: pretrain one with tiny-cpu for --minutes)")
    p.add_argument("--student", help="a distilled run (default: distil the teacher into --student-arch for --minutes); "
                                      "several, comma-separated, are each measured (the summary uses the first)")
    p.add_argument("--student-arch", default="mobilenetv2_035",
                   help="default mobilenetv2_035 (0.40M parameters, a sixth of regnetx_002's 2.32M; its ReLU6 "
                        "activations stay bounded, so it quantises: docs/benchmarks.md)")
    p.add_argument("--minutes", type=float, default=5.0, help="pretraining and distillation budgets (default 5)")
    p.add_argument("--out-dir", default="runs/deploy-bench", help="where runs and exports go")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime (default 2)")
    p.add_argument("--limit-train", type=int, default=10000, help="train images for kNN/linear (0 = all 60000)")
    p.add_argument("--limit-test", type=int, default=0, help="test images (0 = all 10000)")
    p.add_argument("--calibrate-n", type=int, default=256)
    p.add_argument("--repeats", type=int, default=100, help="timed batch-1 runs (batch 32: a tenth)")
    p.add_argument("--smoke", action="store_true", help="seconds: test_resnet teacher and student, few images")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    quiet = ["log.progress=false", "log.tensorboard=false", "model.compile=false"]
    if args.smoke:
        args.limit_train, args.limit_test, args.repeats, args.calibrate_n = 500, 200, 5, 32
        out = Path(tempfile.mkdtemp(prefix="openseer-deploy-"))
    teacher, student = args.teacher, args.student
    if not teacher:
        from openseer.train.loop import pretrain

        teacher = str(out / "teacher")
        extra = (["model.arch=test_resnet", "data.limit=256", "data.batch_size=32", "model.stem_stride=0"]
                 if args.smoke else [])
        cfg = build_config("tiny-cpu", [*quiet, f"optim.minutes={args.minutes:g}", *extra],
                           base={"data": {"source": "fashion-mnist"}})
        pretrain(cfg, teacher, resume="auto", max_steps=4 if args.smoke else None)
    if not student:
        from openseer.train.distill import distill, distill_config

        student = str(out / "student")
        arch = "test_resnet" if args.smoke else args.student_arch
        cfg = distill_config(teacher, arch, "fashion-mnist", None, [*quiet, f"optim.minutes={args.minutes:g}",
                                                                      *(["data.limit=256"] if args.smoke else [])])
        distill(cfg, student, resume="auto", max_steps=4 if args.smoke else None)
    folder = out / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    rows = measure("teacher", teacher, folder, args, cache)
    for i, spec in enumerate(student.split(",")):
        rows += measure("student" if i == 0 else f"student{i + 1}", spec, folder, args, cache)
    t = {r["export"]: r for r in rows if r["model"] == "teacher"}
    s = {r["export"]: r for r in rows if r["model"] == "student"}
    summary = {"bench": "deploy-summary", "threads": args.threads,
               "int8_vs_fp32_knn20": round(t["onnx int8"]["knn20"] - t["onnx fp32"]["knn20"], 2),
               "int8_vs_fp32_linear": round(t["onnx int8"]["linear"] - t["onnx fp32"]["linear"], 2),
               "int8_smaller_x": round(t["onnx fp32"]["size_mb"] / t["onnx int8"]["size_mb"], 2),
               "int8_faster_b1_x": round(t["onnx fp32"]["latency_b1_ms"] / t["onnx int8"]["latency_b1_ms"], 2),
               "int8_faster_b32_x": round(t["onnx int8"]["imgs_per_s_b32"] / t["onnx fp32"]["imgs_per_s_b32"], 2),
               "student_params_share": round(s["onnx fp32"]["params_m"] / t["onnx fp32"]["params_m"], 3),
               "student_vs_teacher_knn20": round(s["onnx fp32"]["knn20"] - t["onnx fp32"]["knn20"], 2),
               "student_vs_teacher_linear": round(s["onnx fp32"]["linear"] - t["onnx fp32"]["linear"], 2),
               "teacher": teacher, "student": student}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
