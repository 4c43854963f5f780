"""`hawq run` under a 2-process gloo group (what torchrun launches): traces pooled over ranks, DDP
fine-tuning, only rank 0 writes; the traces agree with a single-process run within their standard errors."""

import json
import os
import socket

import torch.multiprocessing as mp

from hawq.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: list[str], cache: str, codes) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HAWQ_CACHE=cache)
    codes[rank] = main(args)


def test_two_process_run_matches_single_process(fake_fmnist, tmp_path):
    common = ["run", "--quick", "--quiet", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--ft-images", "64",
              "--baselines", "4", "--trace-rel-tol", "0.02"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([*common, "--out", str(single)]) == 0
    codes = mp.Manager().dict()
    same_weights = ["--checkpoint", str(single / "fp32.pt")]  # traces of the same model, split over two ranks
    args = [*common, *same_weights, "--out", str(multi)]
    mp.spawn(_worker, args=(2, _free_port(), args, str(tmp_path / "c2"), codes), nprocs=2, join=True)
    assert dict(codes) == {0: 0, 1: 0}
    assert not list(multi.glob("**/.*.tmp"))  # no half-written file from a second writer
    one = {r["fqn"]: r for r in json.loads((single / "traces.json").read_text())["layers"]}
    two = {r["fqn"]: r for r in json.loads((multi / "traces.json").read_text())["layers"]}
    assert set(one) == set(two)
    for fqn in one:
        se = (one[fqn]["stderr"] ** 2 + two[fqn]["stderr"] ** 2) ** 0.5
        assert abs(one[fqn]["trace"] - two[fqn]["trace"]) <= 4 * se + 1e-12, fqn
    res = json.loads((multi / "results.json").read_text())
    assert {"fp32", "hawq", "uniform4"} <= set(res["models"])
    plan_one = json.loads((single / "plan.json").read_text())["layers"]
    plan_two = json.loads((multi / "plan.json").read_text())["layers"]
    assert plan_one == plan_two
