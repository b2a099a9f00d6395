"""Distributed training on CPU with real gloo process groups (2 spawned processes, no mocked collectives).

* Sinkhorn over 2 ranks equals one process on the concatenated batch.
* One SwAV step on 2 ranks x B/2 equals 1 rank x B (loss, parameters, momentum, BN statistics), for
  DDP and for FSDP2 (with activation checkpointing), with SyncBN: this also proves LARC uses the
  norms of whole parameters under FSDP (shard norms would give a different update).
* Training state moves across world sizes and strategies: a sharded (DCP) checkpoint written by 2
  FSDP ranks loads into 1 plain process, a 1-process ``.pt`` loads into 2 FSDP ranks, exactly; and
  real ``openseer pretrain`` runs go 2 -> 1 -> 2 processes under torchrun; the consolidated backbone
  exports to safetensors with timm key names; a run reading tar shards resumes from 2 ranks in 1.
* Bad set-ups stop with one message before any collective.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openseer.config import build_config
from openseer.model.swav import SwAVLoss, build_swav, sinkhorn
from openseer.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from openseer.train.distributed import DistEnv, DistError, check_dist
from openseer.train.loop import TrainState, _unwrap
from openseer.train.optim import build_optimizer
from openseer.train.parallel import checkpoint_blocks, full_tensor, prepare_model
from openseer.train.sharded import restore_state, save_sharded
from tests.conftest import EAGER_FP32, QUIET, fmnist_available

WORLD = 2
B = 8  # global batch of the equivalence step
STEP_ARGS = [
    *QUIET, "model.arch=regnety_002", "model.stem_stride=0", "model.head_hidden=[32]", "model.head_out=16",
    "model.head_bn=true",
    "crops.sizes=[32,16]", "crops.counts=[2,2]", "swav.n_prototypes=12", "swav.freeze_prototypes_steps=0", "swav.epsilon=0.05",
    f"data.batch_size={B}", "optim.lars_trust=0.02", "dist.syncbn_group_size=2", *EAGER_FP32,
]
STRATEGIES = {"ddp": ["dist.strategy=ddp"],
              "fsdp": ["dist.strategy=fsdp", "dist.fsdp_wrap=block", "dist.activation_checkpointing=true"]}
LR = 0.5
# The bias of the Linear before the head's BatchNorm has a true gradient of exactly 0 (BN removes any
# shift); LARC rescales whatever rounding noise is left to a full-size step, so that one parameter (and
# its momentum) is only compared for its shape.
ZERO_GRAD = {"param.head.mlp.0.bias", "momentum.head.mlp.0.bias"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
    return {"crops": crops, "scores": torch.randn(2 * B, 12, generator=g) * 3}


def _step(model, optimizer, cfg, crops) -> torch.Tensor:
    """One training step exactly as the loop runs it (LR, forward, Sinkhorn targets, loss, LARC, normalise)."""
    net = _unwrap(model)
    criterion = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                         cfg.swav.sinkhorn_iters)
    for g in optimizer.param_groups:
        g["lr"] = LR
    z, scores = model(crops)
    targets = criterion.targets(z, scores, net.prototypes.weight, 0)
    loss = criterion(scores, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    net.prototypes.normalize_()
    return loss.detach()


def _snapshot(net, optimizer) -> dict:
    """Whole tensors (gathered from shards) of parameters, buffers and momentum, by name."""
    names = {id(p): n for n, p in net.named_parameters()}
    out = {f"param.{n}": full_tensor(p.detach()).clone() for n, p in net.named_parameters()}
    out.update({f"buffer.{n}": b.detach().clone() for n, b in net.named_buffers()})
    for p, s in optimizer.optim.state.items():
        if s.get("momentum_buffer") is not None:
            out[f"momentum.{names[id(p)]}"] = full_tensor(s["momentum_buffer"]).clone()
    return out


def _reference(cfg, crops) -> tuple[float, dict, dict, object, object]:
    torch.manual_seed(0)
    model = build_swav(cfg)
    optimizer = build_optimizer(model, cfg)
    before = _snapshot(model, optimizer)
    loss = _step(model, optimizer, cfg, crops)
    return float(loss), before, _snapshot(model, optimizer), model, optimizer


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = Path(out)
    data = torch.load(out / "inputs.pt")
    results: dict = {}

    local = data["scores"].chunk(WORLD)[rank]
    q = sinkhorn(local, 0.05, 3)
    parts = [torch.empty_like(q) for _ in range(WORLD)]
    dist.all_gather(parts, q)
    results["sinkhorn"] = torch.cat(parts)

    env = DistEnv(rank, WORLD, rank)
    share = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    for name, extra in STRATEGIES.items():
        cfg = build_config("tiny-cpu", [*STEP_ARGS, *extra])
        torch.manual_seed(0)
        model = prepare_model(build_swav(cfg), cfg, env, torch.device("cpu"))
        net = _unwrap(model)
        optimizer = build_optimizer(net, cfg)
        loss = _step(model, optimizer, cfg, [c[share] for c in data["crops"]])
        dist.all_reduce(loss)
        results[f"{name}.loss"] = float(loss) / WORLD
        results[f"{name}.state"] = _snapshot(net, optimizer)
        if name == "fsdp":
            # sharded checkpoint written by 2 FSDP ranks (the loop's own state and DCP code)
            save_sharded(TrainState(model, optimizer, None, cfg, {}, {}, DistEnv()).state_dict(1), net, optimizer, out / "run2", 1, keep=2)
            # and the reverse: the 1-process .pt written by the parent, restored into the 2 FSDP ranks
            torch.manual_seed(123)
            model2 = prepare_model(build_swav(cfg), cfg, env, torch.device("cpu"))
            optimizer2 = build_optimizer(model2, cfg)
            path = list_checkpoints(out / "run1")[-1]
            restore_state(load_checkpoint(path), model2, optimizer2, path)
            results["from_pt"] = _snapshot(model2, optimizer2)
    # SyncBN in groups of 1 (dist.new_subgroups): each rank's statistics are its own again
    cfg = build_config("tiny-cpu", [*STEP_ARGS, "dist.syncbn_group_size=1"])
    torch.manual_seed(0)
    model = prepare_model(build_swav(cfg), cfg, env, torch.device("cpu"))
    model([c[share] for c in data["crops"]])
    results["group1.stem_mean"] = _unwrap(model).backbone.stem.bn.running_mean.clone()
    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor, name: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape, name
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), \
        f"{name}: max abs diff {(a.float() - b.float()).abs().max():.3g}"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Reference (1 process x B) here, then 2 spawned gloo ranks x B/2; their results side by side."""
    out = tmp_path_factory.mktemp("dist")
    data = _inputs()
    torch.save(data, out / "inputs.pt")
    refs = {}
    for name, extra in STRATEGIES.items():
        cfg = build_config("tiny-cpu", [*STEP_ARGS, *extra])
        refs[name] = _reference(cfg, data["crops"])
    _, _, _, model, optimizer = refs["fsdp"]
    save_checkpoint(TrainState(model, optimizer, None, cfg, {}, {}, DistEnv()).state_dict(1), out / "run1", 1, keep=2)
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return {"out": out, "data": data, "refs": refs, "results": torch.load(out / "results.pt")}


def test_sinkhorn_two_ranks_equals_one_process(spawned):
    whole = sinkhorn(spawned["data"]["scores"], 0.05, 3)
    _close(spawned["results"]["sinkhorn"], whole, "sinkhorn", atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_one_step_two_ranks_equals_one_rank(spawned, strategy):
    loss, before, after, _, _ = spawned["refs"][strategy]
    got = spawned["results"][f"{strategy}.state"]
    assert abs(spawned["results"][f"{strategy}.loss"] - loss) < 1e-5
    assert set(got) == set(after)
    for key, ref in after.items():
        if key in ZERO_GRAD:
            assert got[key].shape == ref.shape
            continue
        _close(got[key], ref, key)
        if key.startswith("param.") and ref.numel() > 1:
            delta_ref, delta_got = ref - before[key], got[key] - before[key]
            if delta_ref.norm() > 0:  # the LARC update itself matches (shard norms would be off by ~sqrt(2))
                rel = (delta_got - delta_ref).norm() / delta_ref.norm()
                assert rel < 1e-4, f"{key}: update differs by {rel:.3g} (relative)"
    params = [k for k in after if k.startswith("param.")]
    moved = [k for k in params if (after[k] - before[k]).norm() > 1e-3 * before[k].norm()]
    # the step moved the model (at step 0 the zero-initialised residual branches see only weight decay)
    assert len(moved) > 0.2 * len(params)


def test_sharded_checkpoint_from_two_fsdp_ranks_loads_in_one_process(spawned):
    cfg = build_config("tiny-cpu", [*STEP_ARGS, *STRATEGIES["fsdp"]])
    run2 = spawned["out"] / "run2"
    (path,) = list_checkpoints(run2)
    assert path.suffix == ".dcp" and path.is_dir()
    torch.manual_seed(7)  # different init: everything must come from the checkpoint
    model = build_swav(cfg)
    optimizer = build_optimizer(model, cfg)
    state = load_checkpoint(path, shallow=True)
    assert state["step"] == 1 and "model" not in state
    restore_state(state, model, optimizer, path)
    got = _snapshot(model, optimizer)
    saved = spawned["results"]["fsdp.state"]
    assert set(got) == set(saved)
    for key in saved:
        assert torch.equal(got[key], saved[key]), key
    full = load_checkpoint(path)  # consolidated in one process (what eval and doctor read)
    assert set(full["model"]) == set(model.state_dict())


def test_one_process_checkpoint_loads_into_two_fsdp_ranks(spawned):
    _, _, after, _, _ = spawned["refs"]["fsdp"]
    got = spawned["results"]["from_pt"]
    assert set(got) == set(after)
    for key in after:
        assert torch.equal(got[key], after[key]), key


def test_syncbn_groups_of_one_keep_per_rank_statistics(spawned):
    cfg = build_config("tiny-cpu", STEP_ARGS)
    torch.manual_seed(0)
    model = build_swav(cfg)
    model([c[: B // WORLD] for c in spawned["data"]["crops"]])  # rank 0's share, plain BatchNorm
    _close(spawned["results"]["group1.stem_mean"], model.backbone.stem.bn.running_mean, "stem running mean")
    synced = spawned["results"]["ddp.state"]["buffer.backbone.stem.bn.running_mean"]
    assert not torch.allclose(synced, model.backbone.stem.bn.running_mean, atol=1e-4)  # groups of 2 differ


def test_activation_checkpointing_is_exact_and_keeps_bn_statistics():
    cfg = build_config("tiny-cpu", STEP_ARGS)
    crops = _inputs()["crops"]
    _, _, plain, _, _ = _reference(cfg, crops)
    torch.manual_seed(0)
    model = build_swav(cfg)
    assert checkpoint_blocks(model.backbone) > 0
    optimizer = build_optimizer(model, cfg)
    _step(model, optimizer, cfg, crops)
    got = _snapshot(model, optimizer)
    for key in plain:  # running statistics too: the recompute must not update them a second time
        if key not in ZERO_GRAD:
            _close(got[key], plain[key], key, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- real runs under torchrun

RUN = ["--data", "fashion-mnist", *QUIET, "data.limit=256", "data.batch_size=32", "optim.epochs=1",
       "log.every=1", "threads=1", "model.arch=regnety_002", "model.stem_stride=0", "crops.sizes=[32,16]",
       "crops.counts=[2,2]",
       "swav.n_prototypes=20", "model.head_hidden=[32]", "model.head_out=16", "checkpoint.every=2",
       "swav.queue_length=64", "swav.queue_start_step=0", "dist.strategy=fsdp", "dist.syncbn_group_size=2",
       *EAGER_FP32]


def _openseer(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "openseer", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "openseer", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.heavy  # three torchrun launches: 18 s
@fmnist_available
def test_torchrun_run_resumes_on_other_world_sizes_and_exports(tmp_path):
    run = tmp_path / "run"
    r = _openseer(1, "pretrain", "--out", str(run), "--max-steps", "2", *RUN)  # one process: a whole .pt
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt"]

    r = _openseer(2, "pretrain", "--resume", str(run), "--max-steps", "4")  # 1 -> 2 processes (FSDP)
    assert r.returncode == 0, r.stdout + r.stderr
    sched = json.loads((run / "schedule.json").read_text())
    assert (sched["world_size"], sched["global_batch"], sched["batch_per_rank"]) == (2, 32, 16)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt", "step_00000004.dcp"]

    r = _openseer(1, "pretrain", "--resume", str(run), "--max-steps", "5")  # 2 -> 1 process
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at step 4" in r.stdout
    assert list_checkpoints(run)[-1].name == "step_00000005.pt"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["queue"]["embeddings"].shape == (2, 64, 16)  # the whole queue went through both world sizes
    dcp_state = load_checkpoint(run / "checkpoints" / "step_00000004.dcp")  # consolidated in one process
    assert dcp_state["step"] == 4 and set(dcp_state["model"]) == set(state["model"])

    import timm
    from safetensors.torch import load_file

    from openseer.use.export import export_backbone

    reference = timm.create_model("regnety_002", num_classes=0)
    for source, expected in ((run, state), (run / "checkpoints" / "step_00000004.dcp", dcp_state)):
        tensors = load_file(str(export_backbone(source, tmp_path / "backbone.safetensors")))
        assert set(tensors) == set(reference.state_dict())
        reference.load_state_dict(tensors)
        for k, v in expected["model"].items():
            if k.startswith("backbone."):
                assert torch.equal(tensors[k[len("backbone."):]], v), k


def _group_worker(rank: int, port: int, out: str) -> None:
    """As torchrun starts a rank (env vars, no group yet): ``pretrain`` from Python twice, then the CLI."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    from openseer.commands import main
    from openseer.train.loop import pretrain

    cfg = build_config("tiny-cpu", [*RUN[2:], "data.source=fashion-mnist"])
    open_after = []
    for name in ("first", "second"):  # the second call reuses the group the first one started
        pretrain(cfg, Path(out) / name, max_steps=1)
        open_after.append(dist.is_initialized())
    code = main(["pretrain", "--out", str(Path(out) / "cli"), "--max-steps", "1", *RUN])
    open_after.append(dist.is_initialized())  # the CLI owns the process: a gloo group left open can SIGABRT it
    (Path(out) / f"rank{rank}.json").write_text(json.dumps([code, open_after]))


@pytest.mark.slow
@fmnist_available
def test_pretrain_leaves_the_process_group_open_and_the_cli_closes_it(tmp_path):
    mp.spawn(_group_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [0, [True, True, False]]
    for name in ("first", "second", "cli"):
        assert list_checkpoints(tmp_path / name), name


@pytest.mark.slow
@pytest.mark.heavy  # a timed torchrun run: 14 s
@fmnist_available
def test_torchrun_ranks_agree_on_when_a_time_budget_ends(tmp_path):
    """optim.minutes under 2 ranks: each rank's clock differs, the slowest decides, both stop together."""
    run = tmp_path / "run"
    r = _openseer(2, "pretrain", "--out", str(run), *RUN, "optim.epochs=1000", "optim.minutes=0.1",
                  "checkpoint.every=100000")
    assert r.returncode == 0, r.stdout + r.stderr  # a disagreement would hang one rank in a collective
    assert "time budget of 0.1 minutes reached" in r.stdout
    state = load_checkpoint(list_checkpoints(run)[-1])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert 6.0 <= state["counters"]["train_seconds"] < 60 and state["step"] == rows[-1]["step"] < 8000



@pytest.mark.slow
def test_torchrun_shard_stream_resumes_on_another_world_size(tmp_path):
    """2 DDP ranks read tar shards for 4 steps, then the run resumes in one process: the stream
    positions of both ranks are re-dealt (a note says so), and the last checkpoint's stream state
    says exactly which images were delivered (all 56 deliveries are still in the first pass)."""
    from PIL import Image

    from openseer.data.shards import write_shards
    from openseer.data.takedown import saw_sample

    (tmp_path / "in").mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(64):
        pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "in" / f"p{i:02d}.png")
    write_shards(tmp_path / "in", tmp_path / "shards", shard_size=8, workers=1)
    run = tmp_path / "run"
    args = ["--data", str(tmp_path / "shards"), *QUIET, "data.batch_size=8", "data.num_workers=1",
            "data.shuffle_buffer=4", "optim.epochs=1", "log.every=1", "threads=1", "model.arch=regnety_002",
            "model.stem_stride=0", "crops.sizes=[32,16]", "crops.counts=[2,2]", "swav.n_prototypes=20",
            "model.head_hidden=[32]", "model.head_out=16", "checkpoint.every=2", "dist.strategy=ddp", *EAGER_FP32]
    r = _openseer(2, "pretrain", "--out", str(run), "--max-steps", "4", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _openseer(1, "pretrain", "--resume", str(run), "--max-steps", "7")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size changed from 2 to 1" in r.stderr
    last = load_checkpoint(list_checkpoints(run)[-1])
    assert last["step"] == 7 and last["data"]["before"]["layout"]["world_size"] == 2
    everything = [(u, p) for u in range(8) for p in range(8)]
    assert sum(saw_sample(last["data"], u, p) for u, p in everything) == 7 * 8
    before = load_checkpoint(run / "checkpoints" / "step_00000004.pt")  # written by the 2 ranks
    assert sum(saw_sample(before["data"], u, p) for u, p in everything) == 4 * 8


# ---------------------------------------------------------------- refused before any collective


@pytest.mark.parametrize("override, world, message", [
    ("dist.syncbn_group_size=3", 4, "does not divide the world size 4"),
    ("dist.syncbn_group_size=8", 4, "does not divide the world size 4"),
    ("data.batch_size=30", 4, "must be divisible by the world size 4"),
    ("swav.queue_length=30", 4, "swav.queue_length=30 must be divisible"),
    ("dist.fsdp_wrap=layer", 2, "dist.fsdp_wrap"),
])
def test_bad_distributed_setups_are_refused(override, world, message):
    cfg = build_config("tiny-cpu", [override])
    with pytest.raises(DistError, match=message):
        check_dist(cfg, DistEnv(0, world, 0))


def test_syncbn_groups_that_divide_the_world_are_accepted():
    for g in (0, 1, 2, 4):
        check_dist(build_config("tiny-cpu", [f"dist.syncbn_group_size={g}"]), DistEnv(0, 4, 0))


@pytest.mark.parametrize("override, message", [
    ("dist.syncbn_group_size=3", "dist.syncbn_group_size=3 does not divide the world size 2"),
    ("dist.backend=nccl", "needs CUDA GPUs"),
])
def test_cli_refuses_before_waiting_for_other_ranks(tmp_path, override, message):
    """Rank 0 of a 2-process world whose rank 1 never comes: a check after the rendezvous would hang."""
    if override.endswith("nccl") and torch.cuda.is_available():
        pytest.skip("GPUs present")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    r = subprocess.run([sys.executable, "-m", "openseer", "pretrain", "--out", str(tmp_path / "run"),
                        "device=cpu", override, *QUIET], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / "run").exists()
