"""GaussianEnsemble: batched members = independent MLPs, fits known systems, elite-only differentiable step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maac_robot.learn.config import ModelConfig
from maac_robot.learn.ensemble import GaussianEnsemble, holdout_split

S, A = 3, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small nets on a shared 2-core box: one thread is faster and immune to oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ensemble(num_models=4, num_elites=3, hidden=32, layers=2, learn_reward=False, net_obs_idx=(1, 2), state_dim=S):
    torch.manual_seed(0)
    return GaussianEnsemble(state_dim, A, num_models=num_models, num_elites=num_elites, hidden=hidden, layers=layers,
                            learn_reward=learn_reward, net_obs_idx=net_obs_idx, min_logvar=-10.0, max_logvar=0.5)


def linear_system(n: int, sigma: float, seed: int) -> tuple[torch.Tensor, ...]:
    """x' = A x + B u + N(0, sigma^2): fixed A, B; fresh states/actions/noise per seed."""
    g = torch.Generator().manual_seed(1234)
    a_mat, b_mat = torch.eye(S) + 0.1 * torch.randn(S, S, generator=g), 0.5 * torch.randn(A, S, generator=g)
    g.manual_seed(seed)
    x, u = torch.randn(n, S, generator=g), torch.rand(n, A, generator=g) * 2 - 1
    return x, u, x @ a_mat.T + u @ b_mat + sigma * torch.randn(n, S, generator=g)


def test_batched_members_equal_independent_mlps():
    model = ensemble(num_models=3, layers=3)
    with torch.no_grad():  # non-trivial normaliser and bias values, so nothing cancels by accident
        model.in_mean.normal_()
        model.in_std.uniform_(0.5, 2.0)
        for b in model.biases:
            b.normal_(std=0.1)
    state, action = torch.randn(3, 7, S), torch.randn(3, 7, A)
    mean, logvar = model(state, action)
    for m in range(3):
        net = nn.Sequential()
        for i, (w, b) in enumerate(zip(model.weights, model.biases)):
            lin = nn.Linear(w.shape[1], w.shape[2])
            lin.weight.data, lin.bias.data = w[m].detach().T.clone(), b[m, 0].detach().clone()
            net.append(lin)
            if i < len(model.weights) - 1:
                net.append(nn.SiLU())
        x = (torch.cat([state[m][:, [1, 2]], action[m]], -1) - model.in_mean) / model.in_std
        ref_mean, raw_logvar = net(x).chunk(2, -1)
        hi, lo = model.max_logvar[m], model.min_logvar[m]
        ref_logvar = lo + nn.functional.softplus(hi - nn.functional.softplus(hi - raw_logvar) - lo)
        torch.testing.assert_close(mean[m], ref_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(logvar[m], ref_logvar, atol=1e-6, rtol=0)
    assert (logvar > -10).all() and (logvar < 0.5).all()


def test_position_dims_do_not_change_predictions():
    model = ensemble(net_obs_idx=(1, 2))
    state, action = torch.randn(5, S), torch.randn(5, A)
    moved = state.clone()
    moved[:, 0] += 100.0
    a, b = model.predict_all(state, action), model.predict_all(moved, action)
    torch.testing.assert_close(b[0] - moved, a[0] - state)  # same Δ, whatever the absolute position
    torch.testing.assert_close(b[1], a[1])


def test_predict_members_matches_predict_all():
    model = ensemble(learn_reward=True)
    state, action = torch.randn(6, S), torch.randn(6, A)
    members = torch.tensor([3, 0])
    picked = model.predict_members(state.expand(2, -1, -1), action.expand(2, -1, -1), members)
    for part, full in zip(picked, model.predict_all(state, action)):
        torch.testing.assert_close(part, full[members])


def test_fits_linear_system_to_noise_level():
    """Bound: the best possible predictor has held-out MSE sigma^2 (the noise); allowing 30 % estimation error
    on 1200 training points is tight next to the trivial 'no change' predictor (~57 sigma^2), and the learned
    variance must land within a factor 2 of sigma^2."""
    sigma = 0.05
    model = ensemble(net_obs_idx=(0, 1, 2))
    cfg = ModelConfig(num_models=4, num_elites=3, hidden=32, layers=2, lr=3e-3, batch_size=128, max_epochs=150)
    stats = model.fit(*linear_system(1500, sigma, seed=0), None, cfg, torch.Generator().manual_seed(0))
    assert stats["num_holdout"] == 300 and stats["epochs"] < 150  # early stopping ended it
    x, u, y = linear_system(2000, sigma, seed=1)
    with torch.no_grad():
        pred, _ = model.step(x, u, sample=False)
        _, logvar, _, _ = model.predict_all(x, u)
    mse = (pred - y).square().mean().item()
    assert mse < 1.3 * sigma**2 < 0.05 * (x - y).square().mean().item()
    assert 0.5 < logvar[model.elites].exp().mean().item() / sigma**2 < 2.0


def test_step_uses_only_elites_uniformly_and_is_differentiable():
    model = ensemble(num_models=4, num_elites=2)
    model.elites.copy_(torch.tensor([1, 3]))
    with torch.no_grad():
        model.biases[-1][[0, 2]] = float("nan")  # any use of a non-elite member poisons the output
    state, action = torch.randn(601, S), torch.randn(601, A, requires_grad=True)
    next_state, reward = model.step(state, action, generator=torch.Generator().manual_seed(0))
    assert reward is None and next_state.shape == (601, S) and torch.isfinite(next_state).all()
    next_state.sum().backward()
    assert torch.isfinite(action.grad).all() and (action.grad.abs().sum(-1) > 0).all()

    with torch.no_grad():
        mean, _ = model.step(state, action, sample=False)
        all_means = model.predict_all(state, action)[0]  # [M, B, S]
    member = (all_means - mean).abs().sum(-1).nan_to_num(float("inf")).argmin(0)
    torch.testing.assert_close(mean, all_means[member, torch.arange(601)])
    assert set(member.tolist()) == {1, 3} and abs((member == 1).float().mean().item() - 0.5) < 0.01
    # a batch of one still reaches every elite: the chunk-to-elite assignment is shuffled too
    hits = {model.step(state[:1], action[:1], sample=False)[0].sum().item() for _ in range(40)}
    assert len(hits) == 2
    assert model.step(state[:0], action[:0])[0].shape == (0, S)  # every imagined row terminated: still fine


def test_step_samples_with_std_exp_half_logvar_and_is_reproducible():
    model = ensemble(num_models=2, num_elites=2)
    with torch.no_grad():
        model.weights[-1].zero_()
        model.biases[-1].zero_()
        model.biases[-1][..., S:] = -1.5  # logvar; mean 0
    state, action = torch.zeros(4000, S), torch.zeros(4000, A)
    logvar = model(state[None].expand(2, -1, -1), action[None].expand(2, -1, -1))[1][0, 0]
    with torch.no_grad():
        draws, _ = model.step(state, action, generator=torch.Generator().manual_seed(3))
        again, _ = model.step(state, action, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draws.std(0), (0.5 * logvar).exp(), rtol=0.05, atol=0)
    assert torch.equal(draws, again)


def test_early_stopping_keeps_each_members_best_weights():
    """Pure-noise targets on 60 points: anything the big net learns is overfitting, so the holdout error
    rises, training must stop well before max_epochs, and every member must be back at its best epoch."""
    model = ensemble(hidden=64, net_obs_idx=(0, 1, 2))
    g = torch.Generator().manual_seed(5)
    state, action, noise = (torch.randn(60, d, generator=g) for d in (S, A, S))
    cfg = ModelConfig(num_models=4, num_elites=3, hidden=64, layers=2, lr=1e-2, batch_size=16, patience=3,
                      max_epochs=200)
    stats = model.fit(state, action, state + noise, None, cfg, torch.Generator().manual_seed(9))
    assert stats["epochs"] < 50
    assert stats["holdout_mse"] < stats["last_epoch_holdout_mse"]  # the last epoch was worse than the kept one
    _, hold = holdout_split(60, cfg.holdout_ratio, torch.Generator().manual_seed(9))  # fit's first draw
    with torch.no_grad():
        pred = model.predict_all(state[hold], action[hold])[0]
    per_member = ((pred - (state + noise)[hold]) / model.out_std).square().mean((1, 2))
    assert per_member.mean().item() == pytest.approx(stats["holdout_mse"], rel=1e-4)
    assert model.elites.tolist() == per_member.argsort()[:3].tolist()


def test_unmodelled_dims_are_carried_over_and_left_out_of_the_fit():
    """A state dim that is pure noise (Ant's contact forces) is not predicted: imagined steps carry it over
    unchanged (zero variance), and it neither shapes the fit nor the holdout error that picks the elites."""
    g = torch.Generator().manual_seed(2)
    state, action = torch.randn(400, S, generator=g), torch.rand(400, A, generator=g) * 2 - 1
    next_state = state + 0.1 * action.sum(-1, keepdim=True)
    next_state[:, 2] = 10 * torch.randn(400, generator=g)  # unpredictable sensor dim
    reward = action.sum(-1)
    torch.manual_seed(0)
    model = GaussianEnsemble(S, A, num_models=4, num_elites=3, hidden=32, layers=2, learn_reward=True,
                             net_obs_idx=(0, 1), min_logvar=-10.0, max_logvar=0.5, modelled_idx=(0, 1))
    assert "modelled_idx" not in model.state_dict() and model.out_std.shape == (3,)  # dims 0, 1 and the reward
    cfg = ModelConfig(num_models=4, num_elites=3, hidden=32, layers=2, lr=3e-3, batch_size=64, max_epochs=30)
    stats = model.fit(state, action, next_state, reward, cfg, torch.Generator().manual_seed(4))
    _, hold = holdout_split(400, cfg.holdout_ratio, torch.Generator().manual_seed(4))
    with torch.no_grad():
        pred, logvar, pred_reward, _ = model.predict_all(state[hold], action[hold])
        stepped, _ = model.step(state[hold], action[hold], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pred[..., 2], state[hold, 2].expand(4, -1))  # carried over
    assert torch.equal(stepped[:, 2], state[hold, 2]) and (logvar[..., 2] < -19).all()
    target = torch.cat([next_state[:, :2] - state[:, :2], reward[:, None]], -1)[hold]
    per_member = ((torch.cat([pred[..., :2] - state[hold, :2], pred_reward[..., None]], -1) - target)
                  / model.out_std).square().mean((1, 2))
    assert per_member.mean().item() == pytest.approx(stats["holdout_mse"], rel=1e-4)
    assert stats["holdout_mse"] < 0.2  # learnable once the noise dim is out of the targets
    assert model.elites.tolist() == per_member.argsort()[:3].tolist()
    with pytest.raises(ValueError, match="modelled_idx"):
        GaussianEnsemble(S, A, num_models=2, num_elites=1, hidden=8, layers=1, learn_reward=False,
                         net_obs_idx=(0,), min_logvar=-10.0, max_logvar=0.5, modelled_idx=(0, S))


def test_learned_reward_head():
    """Envs without a closed-form reward: the ensemble's extra output learns r(s, a) = -|s|^2 - 0.1 |a|^2."""
    g = torch.Generator().manual_seed(0)
    state, action = torch.randn(1500, S, generator=g), torch.rand(1500, A, generator=g) * 2 - 1
    next_state = state + 0.1 * action.sum(-1, keepdim=True)
    reward = -state.square().sum(-1) - 0.1 * action.square().sum(-1)
    model = ensemble(learn_reward=True, net_obs_idx=(0, 1, 2))
    cfg = ModelConfig(num_models=4, num_elites=3, hidden=32, layers=2, lr=3e-3, batch_size=128, max_epochs=150)
    model.fit(state, action, next_state, reward, cfg, torch.Generator().manual_seed(0))
    test_state = torch.randn(500, S, generator=g)
    test_action = (torch.rand(500, A, generator=g) * 2 - 1).requires_grad_()
    true = -test_state.square().sum(-1) - 0.1 * test_action.detach().square().sum(-1)
    pred_next, pred_reward = model.step(test_state, test_action, sample=False)
    assert pred_reward.shape == (500,)
    assert (pred_reward - true).square().mean() < 0.05 * true.var()
    pred_reward.sum().backward()
    assert torch.isfinite(test_action.grad).all() and test_action.grad.abs().sum() > 0
    reward_mean, reward_logvar = model.predict_all(test_state, test_action)[2:]
    assert reward_mean.shape == reward_logvar.shape == (4, 500)


def test_fit_rejects_bad_inputs():
    cfg = ModelConfig(num_models=4, num_elites=3)
    with pytest.raises(ValueError, match="needs rewards"):
        ensemble(learn_reward=True).fit(torch.zeros(10, S), torch.zeros(10, A), torch.zeros(10, S), None, cfg, None)
    with pytest.raises(ValueError, match="hold out"):
        ensemble().fit(torch.zeros(3, S), torch.zeros(3, A), torch.zeros(3, S), None, cfg, None)
    with pytest.raises(ValueError, match="num_elites"):
        ensemble(num_models=2, num_elites=3)
    with pytest.raises(ValueError, match="net_obs_idx"):
        ensemble(net_obs_idx=(0, 3))
    with pytest.raises(ValueError, match=r"action \[N, 2\]"):
        ensemble().fit(torch.zeros(10, S), torch.zeros(10, 3), torch.zeros(10, S), None, cfg, None)
