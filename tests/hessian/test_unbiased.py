"""The stochastic trace methods are unbiased: checked on many distinct images, tightly enough that a 5% bias fails.

A check against an exact reference on the same images passes when |estimate - exact| <= 3 standard errors.
That only means something when 3 standard errors are well below the bias one wants to catch, so every case
here uses thousands of distinct images (no batch repeated: the standard error then includes the spread
between images, and a repeated batch would hide a bias behind its own noise) and requires 3 standard errors
to be under 3.5% of the trace; `test_a_five_percent_bias_is_caught` shows that a 5% bias fails these checks.

Cases: (1) tiny_mlp on 65,536 random inputs, its last layer scaled so that some images are confident (then
`hybrid` mixes exact and sampled images); reference: the `exact` method (equal to the dense Hessian blocks,
tests/hessian/test_estimate.py). (2) two linear heads on one-hot inputs (logistic regression with two
blocks of different size), where the Hessian trace has a closed form, Tr(H)/n = mean_i sum_c p_ic (1 - p_ic)
/ (C * D): a reference that shares no code with hawq, and a Hessian whose blocks are so sparse that Rademacher
probes (`hutchinson`) reach 1% in a few hundred probes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hawq.models as M
from hawq.hessian import estimate_traces

TOL_SE = 3.0  # standard errors allowed between estimate and reference
MAX_REL_BAND = 0.035  # 3 standard errors must be below this share of the trace (a 5% bias then shows)


def _check(layers, reference: dict[str, float]) -> None:
    """Raise AssertionError unless every layer's (fqn, trace, stderr) is within 3 stderr of the reference,
    with a band narrow enough to catch a 5% bias."""
    for fqn, trace, stderr in layers:
        ref = reference[fqn]
        assert TOL_SE * stderr <= MAX_REL_BAND * ref, (fqn, "error bar too wide to catch a 5% bias", stderr / ref)
        assert abs(trace - ref) <= TOL_SE * stderr, (fqn, trace, ref, stderr)


def _run(model, batches, method, **kw):
    with warnings.catch_warnings():  # rel_tol is set unreachably low on purpose: use every image
        warnings.simplefilter("ignore", UserWarning)
        r = estimate_traces(model, batches, method=method, max_images=None, rel_tol=1e-9, max_probes=100_000,
                            progress=False, seed=3, **kw)
    assert r.method == method
    return r


class TwoHeads(nn.Module):
    """logits = A x[:, :256] + B x[:, 256:], inputs one-hot in each part: piecewise linear, closed-form Hessian."""

    def __init__(self, d1: int = 256, d2: int = 128, classes: int = 3) -> None:
        super().__init__()
        self.d1 = d1
        self.a = nn.Linear(d1, classes)
        self.b = nn.Linear(d2, classes, bias=False)

    def forward(self, x):
        return self.a(x[:, : self.d1]) + self.b(x[:, self.d1 :])


@pytest.fixture(scope="module")
def mlp_case():
    n, size = 65536, 2048
    torch.manual_seed(0)
    model = M.create_model("tiny_mlp").double().eval()
    with torch.no_grad():
        model.fc3.weight.mul_(4.0)  # confident and uncertain images both
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]
    exact = _run(model, batches, "exact", chunk_size=size)
    return model, batches, {lt.fqn: lt.trace for lt in exact.layers}


@pytest.fixture(scope="module")
def onehot_case():
    n, size = 4096, 256
    torch.manual_seed(0)
    model = TwoHeads().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([F.one_hot(torch.randint(0, 256, (n,), generator=g), 256),
                   F.one_hot(torch.randint(0, 128, (n,), generator=g), 128)], 1).double()
    y = torch.randint(0, 3, (n,), generator=g)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    curvature = float((p * (1 - p)).sum(1).mean())  # Tr(S) per image; ||x_part||^2 = 1
    reference = {"a": curvature / model.a.weight.numel(), "b": curvature / model.b.weight.numel()}
    return model, [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)], reference


@pytest.fixture(scope="module")
def estimates(mlp_case, onehot_case):
    out = {}
    model, batches, _ = mlp_case
    for method in ("mc_fisher", "mc_fisher_is", "hybrid"):
        out["mlp", method] = _run(model, batches, method, chunk_size=2048, diagonal=method == "hybrid")
    model, batches, _ = onehot_case
    for method in ("mc_fisher", "mc_fisher_is", "hybrid", "hutchinson", "exact"):
        out["onehot", method] = _run(model, batches, method, chunk_size=256, probes_per_batch=16)
    return out


def _layers(result, bias: float = 1.0):
    """(fqn, trace, stderr) per layer; `bias` multiplies the traces (a biased estimator with the same noise)."""
    return [(lt.fqn, lt.trace * bias, lt.stderr) for lt in result.layers]


@pytest.mark.parametrize("method", ["mc_fisher", "mc_fisher_is", "hybrid"])
def test_per_sample_methods_unbiased_on_many_distinct_images(method, estimates, mlp_case):
    _check(_layers(estimates["mlp", method]), mlp_case[2])


def test_hybrid_really_samples_and_its_diagonal_matches_its_trace(estimates, mlp_case):
    from hawq.hessian.persample import hybrid_split

    model, batches, _ = mlp_case
    hard, easy, _ = hybrid_split(model, batches[0][0])
    assert len(hard) > 0 and len(easy) > 0  # both the exact and the sampled branch are exercised
    r = estimates["mlp", "hybrid"]
    for lt in r.layers:
        assert float(r.diagonals[lt.fqn].double().mean()) == pytest.approx(lt.trace, rel=1e-5)


@pytest.mark.parametrize("method", ["mc_fisher", "mc_fisher_is", "hybrid", "hutchinson", "exact"])
def test_methods_unbiased_against_a_closed_form_hessian(method, estimates, onehot_case):
    _check(_layers(estimates["onehot", method]), onehot_case[2])


@pytest.mark.parametrize("bias", [1.05, 0.95])
def test_a_five_percent_bias_is_caught(bias, estimates, mlp_case, onehot_case):
    """The same results, off by 5%, fail the checks above, for every method and case..."""
    for (case, _method), result in estimates.items():
        reference = (mlp_case if case == "mlp" else onehot_case)[2]
        with pytest.raises(AssertionError):
            _check(_layers(result, bias), reference)
    # ... and so does an estimator that is really biased: Hutchinson on a loss scaled by the bias, through
    # the public API with every other setting unchanged
    model, batches, reference = onehot_case
    biased = _run(model, batches, "hutchinson", chunk_size=256, probes_per_batch=16,
                  loss=lambda out, y: bias * F.cross_entropy(out, y))
    with pytest.raises(AssertionError):
        _check(_layers(biased), reference)
