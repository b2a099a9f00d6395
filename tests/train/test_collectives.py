"""Collectives on a device their process group can reduce, and one all-reduce per step.

An NCCL-only group cannot reduce a CPU tensor; the loop's scalars (step verdict, time budget, the
logged loss, a checkpoint's success flag) used to be CPU tensors while ``dist.backend=auto`` opened
NCCL alone on CUDA. These run without a GPU: the process group is faked where it would need one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from openseer.train import distributed
from openseer.train.distributed import init_distributed, process_group_backend, reduce_device, step_verdict


@pytest.mark.parametrize("backend, device, expected", [
    ("auto", "cuda", "cpu:gloo,cuda:nccl"),
    ("nccl", "cuda", "cpu:gloo,cuda:nccl"),
    ("auto", "cpu", "gloo"),
    ("gloo", "cuda", "gloo"),
])
def test_the_process_group_can_reduce_cpu_tensors_on_cuda(backend, device, expected):
    assert process_group_backend(backend, device) == expected


def test_init_distributed_opens_gloo_and_nccl_together_on_cuda(monkeypatch):
    opened = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: opened.update(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: opened.update(device=i))
    env = init_distributed("auto", "cuda")
    assert opened == {"backend": "cpu:gloo,cuda:nccl", "rank": 1, "world_size": 2, "device": 1}
    assert env.rank == 1 and env.world_size == 2


def _fake_world(monkeypatch, backend: str) -> list[torch.Tensor]:
    reduced: list[torch.Tensor] = []

    def all_reduce(t, op=None, group=None):
        reduced.append(t)
        t.mul_(1.0)  # the other rank holds the same values: MAX leaves them

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return reduced


@pytest.mark.parametrize("backend, device, expected", [
    ("gloo", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda", "cuda:0"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("nccl", "cpu", "cuda:0"),  # a group someone else opened with NCCL alone: scalars go to the GPU
    ("nccl", "cuda", "cuda:0"),
])
def test_small_tensors_go_where_the_group_reduces_them(monkeypatch, backend, device, expected):
    _fake_world(monkeypatch, backend)
    assert reduce_device(torch.device(device) if device == "cpu" else torch.device("cuda", 0)) == torch.device(expected)


def test_the_step_verdict_and_the_clock_are_one_all_reduce(monkeypatch):
    reduced = _fake_world(monkeypatch, "gloo")
    bad, stop, spent = step_verdict(torch.tensor(True), False, 12.5, "cpu")
    assert (bad, stop, spent) == (True, False, 12.5)
    assert len(reduced) == 1 and reduced[0].tolist() == [1.0, 0.0, 12.5]


def test_scalar_collectives_follow_the_group(monkeypatch):
    reduced = _fake_world(monkeypatch, "gloo")
    assert distributed.all_reduce_scalar(3.0, "max") == 3.0
    assert distributed.any_across_ranks(True, False) == [True, False]
    assert all(t.device.type == "cpu" for t in reduced) and len(reduced) == 2


def test_a_one_rank_group_runs_the_same_collectives_and_results(tmp_path):
    """OPENSEER_PROCESS_GROUP=1 opens a group for one rank (the GPU check's path of many ranks):
    the step verdict and Sinkhorn go through it and give what no group gives."""
    from openseer.model.swav import sinkhorn

    scores = torch.randn(2, 6, 5)
    alone = sinkhorn(scores, 0.05, 3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert torch.equal(sinkhorn(scores, 0.05, 3), alone)
        assert step_verdict(torch.tensor(False), True, 3.0, "cpu") == (False, True, 3.0)
    finally:
        dist.destroy_process_group()


def test_a_run_through_a_one_rank_group_equals_a_run_without_one(tmp_path, monkeypatch):
    """The loop's collectives (verdict, Sinkhorn, logged loss) through a real 1-rank gloo group give
    the bits of a run without any group; the verdict is one all-reduce per step."""
    import socket

    from openseer.train.checkpoint import latest_checkpoint
    from openseer.train.distributed import close_distributed
    from openseer.train.loop import pretrain
    from tests.conftest import EAGER_FP32, QUIET, tiny_config, write_pngs

    write_pngs(tmp_path / "imgs", 24, size=(28, 28))
    cfg = tiny_config(*QUIET, *EAGER_FP32, "data.batch_size=8", "optim.epochs=1", "swav.freeze_prototypes_steps=1",
                      "swav.queue_length=16", "swav.queue_start_step=0")
    cfg.data.source = str(tmp_path / "imgs")
    pretrain(cfg, tmp_path / "alone")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "OPENSEER_PROCESS_GROUP": "1"}.items():
        monkeypatch.setenv(k, v)
    calls: list[int] = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.numel()) or real(t, *a, **k))
    try:
        pretrain(cfg, tmp_path / "group")
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        close_distributed()
    (_, a), (_, b) = latest_checkpoint(tmp_path / "alone"), latest_checkpoint(tmp_path / "group")
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())
    assert torch.equal(a["queue"]["embeddings"], b["queue"]["embeddings"])
    assert calls.count(3) == 3  # [bad, stop, seconds]: once per step
