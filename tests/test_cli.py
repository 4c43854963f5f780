"""The command line end to end on tiny data: artifacts, determinism, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hawq.cli import main

ARTIFACTS = ("config.json", "fp32.pt", "traces.json", "sensitivity.json", "frontier.json", "plan.json",
             "results.json", "report.md", "figures/traces.png", "figures/frontier.png", "figures/plan.png")


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def quick_run(fake_fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    args = ["run", "--quick", "--quiet", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--out", str(out),
            "--ft-images", "128", "--baselines", "4"]
    assert main(args) == 0
    return out, args


def test_run_writes_every_artifact(quick_run):
    out, _ = quick_run
    for name in ARTIFACTS:
        assert (out / name).exists(), name
    for name, kind in (("traces.json", "traces"), ("plan.json", "plan"), ("frontier.json", "frontier"),
                       ("results.json", "results"), ("sensitivity.json", "sensitivity")):
        d = json.loads((out / name).read_text())
        assert d["kind"] == kind and d["version"] == 1
    res = json.loads((out / "results.json").read_text())
    assert {"fp32", "hawq", "uniform4"} <= set(res["models"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    assert plan["layers"]["conv1"]["w_bits"] == 8 and plan["layers"]["fc"]["w_bits"] == 8  # first and last
    assert (out / "qat" / "hawq.pt").exists()


def test_same_seed_gives_byte_identical_plan_and_traces(quick_run, tmp_path):
    out, args = quick_run
    args = list(args)
    args[args.index("--out") + 1] = str(tmp_path / "b")
    assert main(args) == 0
    for name in ("plan.json", "traces.json"):
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_stages_rerun_alone(quick_run, capsys):
    out, _ = quick_run
    traces = out / "traces.json"
    stamp, content = traces.stat().st_mtime_ns, traces.read_bytes()
    assert main(["trace", "--out", str(out)]) == 0  # same weights, data and settings: reused, not recomputed
    assert "reusing traces.json" in capsys.readouterr().err
    assert traces.stat().st_mtime_ns == stamp and traces.read_bytes() == content
    before = json.loads((out / "plan.json").read_text())
    assert main(["allocate", "--quiet", "--out", str(out), "--budget-bits", "8"]) == 0
    after = json.loads((out / "plan.json").read_text())
    assert after["size_bytes"] > before["size_bytes"]
    assert all(v["w_bits"] == 8 for v in after["layers"].values())
    assert main(["report", "--quiet", "--out", str(out)]) == 0
    assert main(["allocate", "--quiet", "--out", str(out), "--budget-bits", "3"]) == 0
    assert json.loads((out / "plan.json").read_text())["layers"] == before["layers"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nope"], "unknown model"),
        (["--dataset", "imagenet1k"], "unknown dataset"),
        (["--bits", "2", "9"], "outside 1..8"),
        (["--bits", "0"], "outside 1..8"),
        (["--budget-mb", "-1"], "must be positive"),
        (["--budget-mb", "0.0001"], "smallest feasible size"),
        (["--data-dir", "/nonexistent/folder"], "--data-dir"),
        (["--bn-images", "-1"], "--bn-images must be zero or positive"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(extra, message, fake_fmnist, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "--quick", "--quiet", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--out", str(out)]
    code, err = _run(args + extra, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bits_flag_with_nothing_is_an_error(fake_fmnist, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--bits", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_corrupt_checkpoint(fake_fmnist, tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(b"garbage" * 10)
    out = tmp_path / "out"
    code, err = _run(["run", "--quick", "--quiet", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist),
                      "--checkpoint", str(ckpt), "--out", str(out)], capsys)
    assert code == 2 and "corrupt" in err and not out.exists()


def test_out_folder_of_another_run_is_left_alone(quick_run, fake_fmnist, capsys):
    out, args = quick_run
    snapshot = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    code, err = _run(["run", "--quick", "--quiet", "--model", "tiny_cnn", "--seed", "7", "--data-dir",
                      str(fake_fmnist), "--out", str(out)], capsys)
    assert code == 2 and "different run" in err
    assert snapshot == {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def test_error_exit_code_without_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hawq.cli", "run", "--model", "nope", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_joint_weight_and_activation_allocation_under_bops(fake_fmnist, tmp_path):
    out = tmp_path / "joint"
    args = ["run", "--quick", "--quiet", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--out", str(out),
            "--ft-images", "32", "--baselines", "4", "--a-bits-options", "4", "8", "--budget-gbops", "0.0022"]
    assert main(args) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["bops"] <= 0.0022e9
    assert all(v["a_bits"] in (4, 8) for v in plan["layers"].values())
    assert plan["layers"]["conv2"]["a_bits"] == 4 or plan["layers"]["conv2"]["w_bits"] < 8  # the budget binds
    traces = json.loads((out / "traces.json").read_text())
    assert {r["fqn"] for r in traces["activations"]["layers"]} == {"conv1", "conv2", "fc"}
    sens = json.loads((out / "sensitivity.json").read_text())
    omega = sens["activation_omega"]["conv2"]
    assert omega["4"] > omega["8"] >= 0
    assert "bops_points" in json.loads((out / "frontier.json").read_text())


def test_export_writes_checked_onnx_and_reports_sizes(quick_run, capsys):
    out, _ = quick_run
    assert main(["export", "--quiet", "--out", str(out)]) == 0
    assert (out / "model.onnx").exists()
    res = json.loads((out / "results.json").read_text())
    exp = res["export"]
    assert exp["verify"]["top1_agreement"] >= 0.999
    assert exp["size"]["file_size_bytes"] == (out / "model.onnx").stat().st_size
    assert "Exported model" in (out / "report.md").read_text()


def test_python_dash_m_hawq_runs_the_command_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hawq", "run", "--no-such-flag"], capture_output=True, text=True)
    assert r.returncode == 2 and "--no-such-flag" in r.stderr and "Traceback" not in r.stderr
    assert "see `hawq run --help`" in r.stderr  # the command given, not `hawq hawq --help`
