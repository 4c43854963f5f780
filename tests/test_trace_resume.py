"""A killed trace stage resumes where it stopped: weight traces and activation traces alike."""

import json
import shutil

import hawq.hessian.accumulator as R
import hawq.hessian.estimate as E
from hawq.cli import main


def _activations(folder):
    d = json.loads((folder / "traces.json").read_text())["activations"]
    d.pop("wall_s", None)
    return d


def test_activation_traces_resume_after_a_kill(fake_fmnist, tmp_path, monkeypatch):
    base = ["--quiet", "--quick", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist),
            "--a-bits-options", "4", "8", "--trace-chunk", "16", "--trace-rel-tol", "0.001"]
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), *base]) == 0
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    assert main(["trace", "--out", str(ref)]) == 0

    monkeypatch.setattr(E, "_SAVE_EVERY_S", 0.0)  # save after every chunk
    step = R.EstimationRun.step

    def killed(self, *args, **kwargs):
        if self.activations and self.images >= 16:
            raise KeyboardInterrupt  # kill -9 stand-in, after one chunk of activation traces
        return step(self, *args, **kwargs)

    monkeypatch.setattr(R.EstimationRun, "step", killed)
    assert main(["trace", "--out", str(cut)]) != 0
    assert (cut / "act_traces.partial.pt").exists()
    monkeypatch.setattr(R.EstimationRun, "step", step)
    resumed_at = []
    resume = R.EstimationRun.maybe_resume

    def spy(self, path, key):
        resume(self, path, key)
        resumed_at.append((self.activations, self.images))

    monkeypatch.setattr(R.EstimationRun, "maybe_resume", spy)
    assert main(["trace", "--out", str(cut)]) == 0
    assert (True, 16) in resumed_at  # the activation estimate started from the saved 16 images
    assert _activations(cut) == _activations(ref)
    assert not (cut / "act_traces.partial.pt").exists()
