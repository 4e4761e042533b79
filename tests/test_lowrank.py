"""The shared low-rank math: rank formula, Eckart-Young, transforms, layers."""

import copy

import pytest
import torch

from bench.api.lowrank import (
    Diagonal,
    Eigen,
    Factorization,
    Identity,
    LowerTriangular,
    cholesky_whitening,
    eigen_whitening,
    factorize,
    is_worth_factorizing,
    rank_for_ratio,
)
from bench.engine.compress import compress_model
from bench.model.layers import LowRankLinear
from bench.model.targets import find_targets, footprint, set_module
from methods.svd import VanillaSVD


def test_rank_formula_matches_methods_md():
    # r = floor(m*n*(1-rho)/(m+n)), at least 1
    assert rank_for_ratio(576, 576, 0.2) == (576 * 576 * 8 // 10) // (576 + 576)
    assert rank_for_ratio(1536, 576, 0.6) == int(1536 * 576 * 0.4 // (1536 + 576))
    assert rank_for_ratio(4, 4, 0.99) == 1
    for m, n, ratio in [(576, 192, 0.2), (1536, 576, 0.4), (64, 128, 0.8)]:
        r = rank_for_ratio(m, n, ratio)
        assert r * (m + n) <= m * n * (1 - ratio) < (r + 1) * (m + n)
    with pytest.raises(ValueError):
        rank_for_ratio(8, 8, 1.0)


def test_dense_is_kept_where_factors_would_not_save():
    assert not is_worth_factorizing(64, 64, 32)
    assert is_worth_factorizing(64, 64, 31)


def test_eckart_young_truncation_error():
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.float64)
    fact = factorize(w)
    for rank in (1, 5, 20, 31):
        w_u, w_v = fact.factors(rank, dtype=torch.float64)
        error = torch.linalg.matrix_norm(w - w_u @ w_v) ** 2
        assert torch.isclose(error, torch.tensor(fact.truncation_loss(rank), dtype=torch.float64), rtol=1e-9)
        assert w_u.shape == (48, rank) and w_v.shape == (rank, 32)


@pytest.mark.parametrize("transform", ["identity", "diag", "chol", "eigen"])
def test_right_transform_is_undone(transform):
    torch.manual_seed(1)
    w = torch.randn(20, 12, dtype=torch.float64)
    x = torch.randn(12, 40, dtype=torch.float64)
    if transform == "identity":
        s = Identity()
    elif transform == "diag":
        s = Diagonal(torch.rand(12, dtype=torch.float64) + 0.1)
    elif transform == "chol":
        s = LowerTriangular(torch.linalg.cholesky(x @ x.T))
    else:
        s = eigen_whitening(x @ x.T)
        assert isinstance(s, Eigen)
    fact = factorize(w, s)
    assert isinstance(fact, Factorization) and fact.facts == {} and fact.shape == (20, 12)
    w_u, w_v = fact.factors(12, dtype=torch.float64)
    assert torch.allclose(w_u @ w_v, w, atol=1e-10)


def test_cholesky_whitening_reports_the_shift_it_needed():
    x = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, shift = cholesky_whitening(x @ x.T)
    assert shift == 0.0
    singular = x[:, :5] @ x[:, :5].T  # rank 5 < 12 channels
    transform, shift = cholesky_whitening(singular)
    assert shift > 0 and torch.isfinite(transform.factor).all()


def test_low_rank_linear_matches_factors_with_bias():
    torch.manual_seed(2)
    w_u, w_v, bias = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    layer = LowRankLinear.from_factors(w_u, w_v, bias)
    x = torch.randn(4, 5)
    assert torch.allclose(layer(x), x @ (w_u @ w_v).T + bias, atol=1e-6)


def _tiny(family="llama"):
    from conftest import tiny_model
    return tiny_model(family)


def test_full_rank_compression_gives_identical_outputs():
    model = _tiny()
    targets = find_targets(model)
    facts = {t.name: factorize(model.get_submodule(t.name).weight) for t in targets}
    full = {t.name: min(t.out_features, t.in_features) for t in targets}
    # Force factorization even where it saves nothing, to test exactness.
    clone = copy.deepcopy(model)
    for t in targets:
        w_u, w_v = facts[t.name].factors(full[t.name])
        set_module(clone, t.name, LowRankLinear.from_factors(w_u, w_v, None))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, clone(ids).logits, atol=1e-4)


def test_compression_really_removes_parameters():
    model = _tiny()
    targets = find_targets(model)
    method = VanillaSVD()
    facts = {t.name: method.decompose(t, model.get_submodule(t.name).weight, None, method.config) for t in targets}
    ranks = {t.name: rank_for_ratio(t.out_features, t.in_features, 0.4) for t in targets}
    compressed, layers = compress_model(model, targets, facts, ranks)
    before, after = footprint(model)["params"], footprint(compressed)["params"]
    target_dense = sum(t.params for t in targets)
    target_kept = sum(v["params"] for v in layers.values())
    assert before - after == target_dense - target_kept
    # floor() keeps at most (1 - ratio) of each matrix, and less than one rank step below it
    step = max((t.out_features + t.in_features) / t.params for t in targets)
    assert 0.40 <= 1 - target_kept / target_dense < 0.40 + step
    assert all(isinstance(compressed.get_submodule(t.name), LowRankLinear) for t in targets)
    # the original model is untouched
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
