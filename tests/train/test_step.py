"""``train_step`` on a tiny model: it trains, frozen prototypes stay bit-identical, a NaN step is
skipped; and the steps between log steps wait for the device at most once (counted on the CPU)."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from openseer.data.batches import Batch
from openseer.model.swav import SwAVMethod, SwAVQueue, build_swav
from openseer.train.distributed import DistEnv
from openseer.train.faults import NanSteps
from openseer.train.optim import build_optimizer
from openseer.train.step import Run, StepStats, train_step
from tests.conftest import EAGER_FP32, QUIET, tiny_config, write_pngs

B = 8


def _run(*overrides: str, queue_length: int = 0) -> Run:
    cfg = tiny_config(*QUIET, *EAGER_FP32, f"data.batch_size={B}", "optim.lars_trust=0.02", "optim.warmup_steps=0",
                      *overrides)
    torch.manual_seed(0)
    model = build_swav(cfg)
    queue = SwAVQueue(len(cfg.swav.crops_for_assign), queue_length, cfg.model.head_out) if queue_length else None
    sched = {"total_steps": 10, "peak_lr": 0.5, "steps_per_epoch": 10}
    return Run(cfg=cfg, device=torch.device("cpu"), env=DistEnv(), sched=sched, method=SwAVMethod(model, cfg, queue),
               optimizer=build_optimizer(model, cfg), counters={"skipped_steps": 0}, t_loop=time.perf_counter())


def _batch(cfg, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, s, s, generator=g) for s, n in zip(cfg.crops.sizes, cfg.crops.counts) for _ in range(n)]
    return Batch(step=0, crops=crops, keys=[f"img{i}" for i in range(B)])


def _params(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.method.net.named_parameters()}


def test_a_step_changes_the_weights_and_reports_on_the_device():
    run = _run("swav.freeze_prototypes_steps=0")
    before = _params(run)
    stats = train_step(run, _batch(run.cfg))
    assert isinstance(stats, StepStats) and not stats.bad and run.step == 1
    after = _params(run)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "prototypes.layer.weight" in changed and any(n.startswith("backbone.") for n in changed)
    assert any(n.startswith("head.") for n in changed)
    assert stats.loss.dim() == 0 and torch.isfinite(stats.loss)
    assert set(stats.stats) == {"prototypes_used", "assign_entropy"}
    w = run.method.net.prototypes.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(len(w)), atol=1e-6)  # re-normalised by after_step


def test_a_frozen_prototype_step_leaves_them_bit_identical():
    run = _run("swav.freeze_prototypes_steps=5")
    before = _params(run)
    for i in range(2):
        train_step(run, _batch(run.cfg, i))
    after = _params(run)
    assert torch.equal(before["prototypes.layer.weight"], after["prototypes.layer.weight"])
    assert not torch.equal(before["head.mlp.0.weight"], after["head.mlp.0.weight"])
    assert run.method.net.prototypes.weight not in run.optimizer.optim.state  # no momentum, no decay


def test_a_nan_step_is_skipped_and_nothing_changes():
    run = _run("swav.freeze_prototypes_steps=0")
    train_step(run, _batch(run.cfg))  # momentum exists from here on
    before = _params(run)
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in run.optimizer.optim.state.items()}
    run.method = NanSteps(run.method, {1})  # test-only fault injection wraps the method
    stats = train_step(run, _batch(run.cfg, 1))
    assert stats.bad and run.step == 2
    after = _params(run)
    assert all(torch.equal(before[n], after[n]) for n in before)
    for p, s in run.optimizer.optim.state.items():
        assert torch.equal(s["momentum_buffer"], momentum[id(p)])
    assert all(p.grad is None for p in run.method.net.parameters())


def test_the_queue_is_filled_by_the_method_and_joins_sinkhorn_once_full():
    run = _run("swav.freeze_prototypes_steps=0", "swav.queue_start_step=0", queue_length=2 * B)
    queue = run.method.queue
    train_step(run, _batch(run.cfg, 0))
    assert queue.n_filled == B and not queue.full
    train_step(run, _batch(run.cfg, 1))
    assert queue.full and queue.write_pos == 0
    stored = queue.embeddings.clone()
    train_step(run, _batch(run.cfg, 2))  # uses the queue, then overwrites its oldest half
    assert torch.equal(queue.embeddings[:, B:], stored[:, B:]) and not torch.equal(queue.embeddings[:, :B], stored[:, :B])


# ---------------------------------------------------------------- host syncs


class _SyncCounter:
    """Counts the calls that make the host wait for a tensor's value (on a GPU: a device sync)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count, self.on = 0, True
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, **k):
                if self.on:
                    self.count += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


MAX_SYNCS_PER_STEP = 1  # the step's verdict (finite? stop? clock), which the optimiser step must wait for


@pytest.mark.parametrize("extra", [[], ["swav.queue_length=16", "swav.queue_start_step=0"]], ids=["plain", "queue"])
def test_a_step_between_log_steps_waits_for_the_device_at_most_once(tmp_path, monkeypatch, extra):
    from openseer.train import loop

    folder = tmp_path / "imgs"
    write_pngs(folder, 48, size=(28, 28))
    counter = _SyncCounter(monkeypatch)
    entries: list[int] = []
    real_step = loop.train_step

    def counted(run, batch):  # the count at the start of each iteration's step
        entries.append(counter.count)
        return real_step(run, batch)

    real_iterate = loop.iterate_batches

    def quiet_data(*a, **k):
        it = real_iterate(*a, **k)

        class Quiet:
            def __iter__(self):
                return self

            def __next__(self):
                counter.on = False  # decoding and augmenting on the host is not a device sync
                try:
                    return next(it)
                finally:
                    counter.on = True

            def __getattr__(self, name):
                return getattr(it, name)

        return Quiet()

    monkeypatch.setattr(loop, "train_step", counted)
    monkeypatch.setattr(loop, "iterate_batches", quiet_data)
    cfg = tiny_config(*QUIET, *EAGER_FP32, "data.batch_size=8", "log.every=100", "checkpoint.every=100",
                      "swav.freeze_prototypes_steps=2", "optim.epochs=1", *extra)
    cfg.data.source = str(folder)
    summary = loop.pretrain(copy.deepcopy(cfg), tmp_path / "run")
    assert summary["step"] == 6 and len(entries) == 6
    per_iteration = [b - a for a, b in zip(entries, entries[1:])]  # steps 1-5: none is a log step
    assert max(per_iteration) <= MAX_SYNCS_PER_STEP, per_iteration
    assert min(per_iteration) >= 1  # the counter does see the verdict's wait
