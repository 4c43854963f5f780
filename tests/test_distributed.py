"""Traces and fine-tuning over two gloo processes agree with one process; only rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hawq import distributed as hd
from hawq.artifacts import write_json
from hawq.hessian.result import LayerTrace, TraceResult
from hawq.models import create_model

N_IMAGES, BATCH = 32, 4
EXACT = {"method": "exact", "rel_tol": 1e-9, "min_share": 0.0, "max_images": None, "chunk_size": BATCH}
HUTCH = {"method": "hutchinson", "rel_tol": 1e-9, "min_share": 0.0, "max_images": None, "chunk_size": BATCH,
         "probes_per_batch": 2, "max_probes": 1000}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_IMAGES, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (N_IMAGES,), generator=g)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_IMAGES, BATCH)]


def _model():
    torch.manual_seed(0)
    return create_model("tiny_cnn").eval()  # eval: batch norm uses running statistics on every rank


def _sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in hd.unwrap(model).parameters()])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = hd.init_from_env("cpu")
    try:
        assert (info.rank, info.world_size, info.backend) == (rank, world, "gloo")
        batches = _data()
        exact = hd.distributed_traces(_model(), batches, progress=False, **EXACT)
        hutch = hd.distributed_traces(_model(), batches, progress=False, **HUTCH)
        # data-parallel step: each rank takes its half of the batch; DDP averages the gradients
        x = torch.cat([b[0] for b in batches])[:16]
        y = torch.cat([b[1] for b in batches])[:16]
        idx = hd.shard(list(range(16)))
        params = _sgd_step(hd.wrap_ddp(_model()), x[idx], y[idx])
        every = hd.all_gather_object(params)
        same = all(torch.equal(every[0], p) for p in every)
        loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=2)
        items = [int(v) for (b,) in hd.shard_loader(loader, shuffle=False) for v in b]
        payload = {"exact": exact.to_dict(), "hutch": hutch.to_dict(), "params": params.tolist(),
                   "ranks_agree": same, "n_local": len(idx), "loader_items": hd.all_gather_object(items)}
        hd.write_if_main(write_json, os.path.join(out_dir, f"rank{rank}.json"), "dist_test", payload)
    finally:
        hd.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def test_only_rank_zero_writes(two_process_run):
    assert sorted(p.name for p in two_process_run.iterdir()) == ["rank0.json"]


def test_shard_loader_splits_the_data_set_between_ranks(two_process_run):
    a, b = json.loads((two_process_run / "rank0.json").read_text())["loader_items"]
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))


def test_exact_traces_pool_to_the_single_process_result(two_process_run):
    from hawq.hessian import estimate_traces

    d = json.loads((two_process_run / "rank0.json").read_text())
    pooled = TraceResult.from_dict(d["exact"])
    single = estimate_traces(_model(), _data(), progress=False, **EXACT)
    assert pooled.n_images == single.n_images == N_IMAGES
    for a, b in zip(pooled.layers, single.layers):
        assert a.fqn == b.fqn and a.n_samples == b.n_samples == N_IMAGES
        # the same 32 per-image values, pooled: equal up to float rounding, standard error included
        assert a.trace == pytest.approx(b.trace, rel=1e-5)
        assert a.stderr == pytest.approx(b.stderr, rel=1e-4)
    # and therefore the same plan
    from hawq.alloc import best_plan, model_size_bits, sensitivity_table

    model = _model()
    t_single = sensitivity_table(model, single.means(), fixed={}, progress=False)
    t_pooled = sensitivity_table(model, pooled.means(), fixed={}, progress=False)
    budget = model_size_bits(t_single, 3) / 8
    assert best_plan(t_pooled, budget).w_bits == best_plan(t_single, budget).w_bits


def test_hutchinson_traces_agree_within_standard_errors(two_process_run):
    from hawq.hessian import estimate_traces

    d = json.loads((two_process_run / "rank0.json").read_text())
    pooled = TraceResult.from_dict(d["hutch"])
    single = estimate_traces(_model(), _data(), progress=False, **HUTCH)
    assert pooled.method == single.method == "hutchinson"
    for a, b in zip(pooled.layers, single.layers):
        assert math.isfinite(a.stderr) and a.stderr > 0
        assert abs(a.trace - b.trace) <= 3 * math.hypot(a.stderr, b.stderr), a.fqn


def test_ddp_step_equals_one_process_step_on_the_whole_batch(two_process_run):
    d = json.loads((two_process_run / "rank0.json").read_text())
    assert d["ranks_agree"] and d["n_local"] == 8
    batches = _data()
    x = torch.cat([b[0] for b in batches])[:16]
    y = torch.cat([b[1] for b in batches])[:16]
    ref = _sgd_step(_model(), x, y)
    torch.testing.assert_close(torch.tensor(d["params"]), ref, atol=1e-6, rtol=1e-5)


def _result(groups, n_params=10):
    layers = []
    for fqn, vals in groups.items():
        v = torch.tensor(vals, dtype=torch.float64)
        se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.inf
        layers.append(LayerTrace(fqn, n_params, float(v.mean()), se, len(v), False))
    return TraceResult("exact", tuple(layers), max(len(v) for v in groups.values()), 0, 1.0,
                       {f: [[float(len(v)), float(torch.tensor(v).mean()), 0.1]] for f, v in groups.items()})


def test_combine_traces_equals_statistics_of_the_union():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(7, generator=g).tolist()
    b = (torch.rand(12, generator=g) * 3).tolist()
    c = [2.5]  # a shard of one image: no spread of its own
    pooled = hd.combine_traces([_result({"l": a}), _result({"l": b}), _result({"l": c})])
    union = torch.tensor(a + b + c, dtype=torch.float64)
    lt = pooled["l"]
    assert lt.n_samples == 20
    assert lt.trace == pytest.approx(float(union.mean()), rel=1e-12)
    assert lt.stderr == pytest.approx(float(union.std() / math.sqrt(20)), rel=1e-10)
    assert pooled.history["l"][0][0] == 20.0
    one = hd.combine_traces([_result({"l": c})])
    assert one["l"].stderr == math.inf


def test_combine_traces_converged_and_errors():
    res = [_result({"l": [1.0, 1.01, 0.99]}), _result({"l": [1.0, 1.02]})]
    assert hd.combine_traces(res, rel_tol=0.05)["l"].converged
    assert not hd.combine_traces(res, rel_tol=1e-6)["l"].converged
    with pytest.raises(ValueError, match="different layers"):
        hd.combine_traces([_result({"l": [1.0, 2.0]}), _result({"m": [1.0, 2.0]})])
    with pytest.raises(ValueError, match="at least one"):
        hd.combine_traces([])


def test_single_process_helpers_are_no_ops():
    assert (hd.rank(), hd.world_size(), hd.is_main()) == (0, 1, True)
    t = torch.ones(3)
    assert hd.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert hd.shard([1, 2, 3]) == [1, 2, 3] and list(hd.shard(iter("ab"))) == ["a", "b"]
    m = torch.nn.Linear(2, 2)
    assert hd.wrap_ddp(m) is m and hd.unwrap(m) is m
    assert hd.amp_dtype("cpu") is None
    with hd.autocast("cpu"):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32
    info = hd.init_from_env("cpu")
    assert (info.world_size, info.backend, info.device) == (1, None, "cpu")
    with pytest.raises(ValueError, match="device"):
        hd.init_from_env("tpu")
