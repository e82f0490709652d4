"""benchmarks/gradient_error.py (paper §5.2): its closed-form truth and the MAAC estimate agree where they must."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

# benchmarks/ is a folder of scripts, not a package: its modules import each other by name from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
gradient_error = importlib.import_module("gradient_error")
report = importlib.import_module("report")


THETA = torch.tensor(gradient_error.THETA, dtype=torch.float64)


def _true_gradient() -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gradient_error.true_objective(theta), theta)
    return grad


def test_the_closed_form_gradient_matches_finite_differences():
    eps = 1e-6
    finite = torch.stack([(gradient_error.true_objective(THETA + eps * e) - gradient_error.true_objective(THETA - eps * e))
                          / (2 * eps) for e in torch.eye(3, dtype=torch.float64)])
    assert torch.allclose(_true_gradient(), finite, rtol=1e-5)


def test_with_the_true_model_and_a_long_horizon_the_estimate_is_the_true_gradient():
    """γ^H · (Q̂'s share) vanishes: at H = 60 only Monte-Carlo noise separates the estimate from the truth,
    while at H = 0 the estimate misses the gradient through every later state."""
    torch.manual_seed(0)
    q_hat, _ = gradient_error.fit_q(THETA, samples=400, rollout=200, generator=torch.Generator().manual_seed(0))
    truth = _true_gradient()

    def error(horizon: int) -> float:
        grad = gradient_error.maac_gradient(THETA, gradient_error.true_dynamics, q_hat, horizon, starts=4096, samples=4)
        return float((grad - truth).abs().sum() / truth.abs().sum())

    assert error(60) < 0.05
    assert error(0) > 0.5


def test_verdicts_read_the_shapes():
    mean = {"true dynamics": {0: 0.8, 5: 0.4, 10: 0.1}, "learned, 50 transitions": {0: 0.8, 5: 0.2, 10: 0.5},
            "learned, 9 transitions": {0: 0.8, 5: 0.5, 10: 0.3}}
    lines = report.gradient_error_verdicts(mean)
    assert "falls with H as the paper says" in lines[0]
    assert "intermediate H is best" in lines[1] and "H=5" in lines[1]
    assert "no intermediate optimum" in lines[2]


def test_the_report_table_gives_mean_std_and_median_per_horizon():
    rows = [{"dynamics": "true", "data": "0", "seed": str(s), "horizon": str(h), "rel_l1_error": str(e)}
            for s, errors in enumerate([(0.8, 0.2), (0.6, 0.4)]) for h, e in zip((0, 5), errors)]
    table = report.gradient_error_table(rows)
    assert "| true dynamics | 0.700 ± 0.100 (0.700) | 0.300 ± 0.100 (0.300) |" in table
    assert any("falls with H as the paper says" in line for line in table)
