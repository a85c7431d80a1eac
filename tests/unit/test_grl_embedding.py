"""Gradient reversal, its λ schedules, sinusoidal condition codes and FiLM."""

from __future__ import annotations

import math

import pytest
import torch

from ctray.nn.embedding import FiLM, SinusoidalEmbedding
from ctray.nn.grl import GRL_SCHEDULES, grad_reverse, grl_lambda

# --------------------------------------------------------------------------- GRL


def test_grl_forward_is_identity() -> None:
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    assert y.requires_grad


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grl_backward_multiplies_by_minus_lambda(lam: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64)
    # Reference gradient of the same loss without the reversal.
    (x * w).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    (grad_reverse(x, lam) * w).sum().backward()
    assert torch.equal(plain, w)
    assert torch.equal(x.grad, -lam * w)


def test_grl_reverses_only_below_the_layer() -> None:
    """Parameters above the GRL get the ordinary gradient; inputs below get it reversed."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    a = torch.tensor(3.0, requires_grad=True)
    z = x * 2.0  # "encoder"
    out = (a * grad_reverse(z, 0.5)).sum()  # "detector" parameter a above the GRL
    out.backward()
    assert a.grad.item() == pytest.approx(6.0)  # d/da sum(a * 2x) = 2 * (1 + 2)
    assert torch.equal(x.grad, torch.tensor([-3.0, -3.0]))  # -0.5 * a * 2


def test_grl_lambda_constant() -> None:
    for p in (0.0, 0.5, 1.0):
        assert grl_lambda("constant", p) == 1.0
        assert grl_lambda("constant", p, maximum=0.4) == 0.4


def test_grl_lambda_linear() -> None:
    assert grl_lambda("linear", 0.0) == 0.0
    assert grl_lambda("linear", 0.5) == 0.5
    assert grl_lambda("linear", 1.0) == 1.0
    assert grl_lambda("linear", 0.5, maximum=0.4) == pytest.approx(0.2)
    # progress is clipped to [0, 1]
    assert grl_lambda("linear", -3.0) == 0.0
    assert grl_lambda("linear", 7.0, maximum=0.4) == 0.4


@pytest.mark.parametrize("gamma", [10.0, 3.0])
@pytest.mark.parametrize("maximum", [1.0, 0.25])
def test_grl_lambda_dann(gamma: float, maximum: float) -> None:
    def ref(p: float) -> float:
        return maximum * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)

    assert grl_lambda("dann", 0.0, maximum=maximum, gamma=gamma) == 0.0
    for p in (0.5, 1.0):
        assert grl_lambda("dann", p, maximum=maximum, gamma=gamma) == pytest.approx(ref(p))
    assert grl_lambda("dann", 2.0, maximum=maximum, gamma=gamma) == pytest.approx(ref(1.0))
    # γ = 10 as in Ganin et al.: λ(0.5) = 2/(1+e^-5) - 1 ≈ 0.98661
    if gamma == 10.0 and maximum == 1.0:
        assert grl_lambda("dann", 0.5) == pytest.approx(0.9866142981514303)


def test_grl_lambda_unknown_kind() -> None:
    with pytest.raises(ValueError) as info:
        grl_lambda("cosine", 0.5)
    assert str(info.value) == "unknown GRL schedule 'cosine'; valid: constant, linear, dann"
    assert GRL_SCHEDULES == ("constant", "linear", "dann")


# --------------------------------------------------------------------------- embedding


def _classic(pos: float, dim: int, base: float = 10000.0) -> list[float]:
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d))."""
    out = []
    for i in range(dim // 2):
        angle = pos / base ** (2 * i / dim)
        out += [math.sin(angle), math.cos(angle)]
    return out


@pytest.mark.parametrize("dim", [2, 8, 32])
def test_sinusoidal_shape_and_classic_formula(dim: int) -> None:
    emb = SinusoidalEmbedding(dim)
    index = torch.tensor([0, 1, 2, 3, 17])
    codes = emb(index)
    assert codes.shape == (5, dim)
    assert codes.dtype == torch.float32
    expected = torch.tensor([_classic(float(i), dim) for i in index.tolist()])
    torch.testing.assert_close(codes, expected, rtol=0, atol=1e-5)
    # vectorised == one sample at a time
    loop = torch.cat([emb(i.reshape(1)) for i in index])
    torch.testing.assert_close(codes, loop, rtol=0, atol=0)


def test_sinusoidal_accepts_int8_and_2d_index() -> None:
    emb = SinusoidalEmbedding(16)
    a = emb(torch.tensor([1, 3], dtype=torch.int8))
    b = emb(torch.tensor([[1], [3]]))
    assert a.shape == b.shape == (2, 16)
    assert torch.equal(a, b)


def test_sinusoidal_codes_are_distinct_for_four_phases() -> None:
    codes = SinusoidalEmbedding(16)(torch.arange(4))
    dist = torch.cdist(codes, codes)
    off_diag = dist[~torch.eye(4, dtype=torch.bool)]
    assert off_diag.min() > 0.1
    # ordered conditions: neighbours are closer than the extremes
    assert dist[0, 1] < dist[0, 3]


@pytest.mark.parametrize("dim", [1, 7, 33])
def test_sinusoidal_odd_dim_is_an_error(dim: int) -> None:
    with pytest.raises(ValueError, match=f"embedding dim must be even, got {dim}"):
        SinusoidalEmbedding(dim)


def test_sinusoidal_has_no_trainable_or_saved_state() -> None:
    emb = SinusoidalEmbedding(8)
    assert list(emb.parameters()) == []
    assert emb.state_dict() == {}


# --------------------------------------------------------------------------- FiLM


@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 6), (2, 4, 7), (2, 4)])
def test_film_zero_init_is_identity(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    film = FiLM(cond_dim=6, channels=4)
    x = torch.randn(*shape)
    cond = torch.randn(2, 6) * 100
    assert torch.equal(film(x, cond), x)


def test_film_modulates_per_sample_and_channel() -> None:
    film = FiLM(cond_dim=2, channels=3)
    with torch.no_grad():
        film.proj.weight.zero_()
        film.proj.bias.copy_(torch.tensor([1.0, 0.0, -0.5, 10.0, 20.0, 30.0]))
    x = torch.ones(2, 3, 4, 4)
    y = film(x, torch.zeros(2, 2))
    # scale = 1 + (1, 0, -0.5), shift = (10, 20, 30)
    for c, value in enumerate((12.0, 21.0, 30.5)):
        assert torch.all(y[:, c] == value)
