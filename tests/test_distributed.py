"""Distributed helpers: single-process behaviour and a real 2-process gloo run on CPU."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from hrm_vision.train.trainer import (
    DistContext,
    barrier,
    cleanup,
    init_distributed,
    make_loader,
    reduce_mean,
    set_epoch,
    wrap_ddp,
)

N_ITEMS = 10


def _indices(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def _dataset(n: int = N_ITEMS) -> TensorDataset:
    return TensorDataset(torch.arange(n))


class TestSingleProcess:
    def test_context_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        ctx = init_distributed("cpu")
        assert ctx == DistContext()
        assert ctx.is_main and not ctx.enabled and ctx.device == torch.device("cpu")

    def test_bad_device_is_a_clear_error(self) -> None:
        with pytest.raises(ValueError, match="invalid device 'gpu0'"):
            init_distributed("gpu0")
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="CUDA is not available"):
                init_distributed("cuda")

    def test_order_depends_only_on_seed_and_epoch(self) -> None:
        ctx = DistContext()
        a = make_loader(_dataset(), 3, shuffle=True, ctx=ctx, seed=7)
        b = make_loader(_dataset(), 3, shuffle=True, ctx=ctx, seed=7)
        orders = []
        for epoch in range(3):
            set_epoch(a, epoch)
            orders.append(_indices(a))
            assert sorted(orders[-1]) == list(range(N_ITEMS))
        # A fresh loader (as after a resume), with the global RNG disturbed, jumps to epoch 2.
        torch.manual_seed(1234)
        torch.rand(5)
        set_epoch(b, 2)
        assert _indices(b) == orders[2]
        assert orders[0] != orders[1] != orders[2]
        # Iterating twice in the same epoch gives the same order; another seed another one.
        assert _indices(b) == orders[2]
        c = make_loader(_dataset(), 3, shuffle=True, ctx=ctx, seed=8)
        set_epoch(c, 2)
        assert _indices(c) != orders[2]

    def test_global_rng_untouched_by_iteration(self) -> None:
        loader = make_loader(_dataset(), 4, shuffle=True, ctx=DistContext(), seed=0)
        torch.manual_seed(3)
        state = torch.get_rng_state()
        set_epoch(loader, 1)
        _indices(loader)
        assert torch.equal(torch.get_rng_state(), state)

    def test_no_shuffle_is_sequential_and_drop_last(self) -> None:
        loader = make_loader(_dataset(), 4, shuffle=False, ctx=DistContext(), seed=0,
                             drop_last=True)
        set_epoch(loader, 5)
        assert _indices(loader) == list(range(8))

    def test_bad_loader_arguments(self) -> None:
        with pytest.raises(ValueError, match="batch_size"):
            make_loader(_dataset(), 0, shuffle=True, ctx=DistContext(), seed=0)
        with pytest.raises(ValueError, match="empty"):
            make_loader(_dataset(0), 2, shuffle=True, ctx=DistContext(), seed=0)

    def test_reduce_mean_is_identity(self) -> None:
        values = {"loss": 0.25, "psnr": 21.5}
        out = reduce_mean(values, DistContext(), count=7)
        assert out == values and out is not values

    def test_wrap_barrier_cleanup_are_noops(self) -> None:
        module = nn.Linear(2, 2)
        ctx = DistContext()
        assert wrap_ddp(module, ctx) is module
        barrier(ctx)
        cleanup(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of the 2-process run; writes what it saw to ``out_dir/rank{rank}.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        counts = [3, 1]
        reduced = reduce_mean({"loss": rank + 1.0, "psnr": 10.0 * (rank + 1)}, ctx,
                              count=counts[rank])
        loader = make_loader(_dataset(), 3, shuffle=True, ctx=ctx, seed=5)
        epochs = []
        for epoch in range(2):
            set_epoch(loader, epoch)
            epochs.append(_indices(loader))
        try:
            reduce_mean({"loss": 1.0, **({"cka": 0.5} if rank == 0 else {})}, ctx, count=2)
            mismatch = "no error"
        except ValueError as exc:
            mismatch = str(exc)
        torch.manual_seed(0)  # same initial weights on both ranks; DDP also broadcasts rank 0's
        model = wrap_ddp(nn.Linear(3, 1), ctx)
        x = torch.full((4, 3), float(rank + 1))  # different data per rank
        model(x).sum().backward()
        grad = model.module.weight.grad.flatten().tolist()
        barrier(ctx)
        result = {"ctx": [ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled],
                  "reduced": reduced, "epochs": epochs, "grad": grad, "mismatch": mismatch,
                  "wrapped": type(model).__name__}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        cleanup(ctx)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each rank of a real 2-process gloo run saw."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


class TestTwoProcesses:
    def test_context(self, results: list[dict]) -> None:
        assert results[0]["ctx"] == [0, 2, True, True]
        assert results[1]["ctx"] == [1, 2, False, True]
        assert results[0]["wrapped"] == "DistributedDataParallel"

    def test_reduce_mean_is_weighted(self, results: list[dict]) -> None:
        for r in results:  # rank 0: 3 samples of mean 1.0, rank 1: 1 sample of mean 2.0
            assert r["reduced"]["loss"] == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)
            assert r["reduced"]["psnr"] == pytest.approx((3 * 10.0 + 1 * 20.0) / 4)
            assert list(r["reduced"]) == ["loss", "psnr"]

    def test_shards_are_disjoint_cover_and_change_per_epoch(self, results: list[dict]) -> None:
        for epoch in range(2):
            a, b = results[0]["epochs"][epoch], results[1]["epochs"][epoch]
            assert len(a) == len(b) == N_ITEMS // 2
            assert not set(a) & set(b)
            assert sorted(a + b) == list(range(N_ITEMS))
        assert results[0]["epochs"][0] != results[0]["epochs"][1]

    def test_mismatched_keys_raise_on_every_rank(self, results: list[dict]) -> None:
        for r in results:
            assert "every rank must pass the same keys" in r["mismatch"]

    def test_ddp_averages_gradients(self, results: list[dict]) -> None:
        # d/dw sum(w.x + b) over 4 rows of value (rank+1) = 4*(rank+1); averaged: 4*1.5 = 6.
        for r in results:
            assert r["grad"] == pytest.approx([6.0, 6.0, 6.0])
