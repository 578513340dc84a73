"""torch.distributed helpers on a real 2-process gloo group (CPU), and their no-op path."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brpg_lightning.brpg import distributed as bd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {"is_distributed": bd.is_distributed(), "world_size": bd.world_size()}
        rows = 3 if rank == 0 else 1  # uneven
        feats = torch.arange(rows * 2, dtype=torch.float16).view(rows, 2) + 100 * rank
        out["feats"] = bd.gather_variable(feats)
        out["labels"] = bd.gather_variable(torch.full((rows,), rank, dtype=torch.long))
        out["empty"] = bd.gather_variable(torch.zeros((0, 4)) if rank == 0 else torch.ones(2, 4))
        out["mask"] = bd.gather_variable(torch.tensor([True, rank == 1]))
        t = torch.tensor([1.0, 2.0]) * (rank + 1)
        out["sum_same_object"] = bd.all_reduce_sum_(t) is t
        out["sum"] = t
        b = torch.tensor([rank * 10.0 + 5])
        bd.broadcast_(b, src=1)
        out["broadcast"] = b
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(60)
def test_two_rank_gloo_group() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    expected_feats = torch.tensor([[0, 1], [2, 3], [4, 5], [100, 101]], dtype=torch.float16)
    for rank in (0, 1):
        r = results[rank]
        assert r["is_distributed"] and r["world_size"] == 2
        assert torch.equal(r["feats"], expected_feats) and r["feats"].dtype == torch.float16
        assert r["labels"].tolist() == [0, 0, 0, 1]
        assert torch.equal(r["empty"], torch.ones(2, 4))
        assert r["mask"].tolist() == [True, False, True, True] and r["mask"].dtype == torch.bool
        assert r["sum_same_object"] and r["sum"].tolist() == [3.0, 6.0]
        assert r["broadcast"].tolist() == [15.0]


def test_no_process_group_is_a_no_op() -> None:
    assert not bd.is_distributed() and bd.world_size() == 1
    t = torch.arange(4.0)
    assert bd.gather_variable(t) is t and bd.all_reduce_sum_(t) is t and bd.broadcast_(t) is t
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
