"""Sampler math (spec §1-3) against closed forms, hand-written lists and independent implementations."""

import math

import pytest
import torch

from g2rpo.flow import granular_indices, granular_schedule, ode_step, quantize_timestep, sde_step, sigma_schedule
from g2rpo.models.flux import latent_image_ids, pack_latents, unpack_latents


def test_sigma_schedule_closed_form():
    # T=4, k=3: t = 1, .75, .5, .25, 0  ->  σ = 3t / (1 + 2t)
    assert sigma_schedule(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-7)
    sigmas = sigma_schedule(16, 3.0)
    assert sigmas.shape == (17,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    for i, sigma in enumerate(sigmas.tolist()):
        t = 1 - i / 16
        assert sigma == pytest.approx(3 * t / (1 + 2 * t), abs=1e-7)
    assert torch.equal(sigma_schedule(8, 1.0), torch.linspace(1, 0, 9))  # shift 1 = no shift
    with pytest.raises(ValueError, match="num_steps=0"):
        sigma_schedule(0, 3.0)


def test_quantize_timestep():
    assert quantize_timestep(torch.tensor([1.0, 0.75, 0.8181818, 0.0999, 0.0])).tolist() == pytest.approx(
        [1.0, 0.75, 0.818, 0.099, 0.0], abs=1e-7)


def _reference_transition(x, v, sigmas, i, eta):
    """The §2 formulas written out in float64 with Python scalars, independently of g2rpo.flow."""
    x, v = x.double(), v.double()
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    dt = sigma_next - sigma
    sigma_tilde = float(sigmas[1]) if sigma == 1.0 else sigma
    s = eta * math.sqrt(sigma / (1 - sigma_tilde))
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * math.sqrt(-dt), x - sigma * v


@pytest.mark.parametrize("index", [0, 1, 7, 15])
def test_sde_step_sample_and_log_prob(index):
    g = torch.Generator().manual_seed(index)
    x, v, noise = (torch.randn(3, 5, 8, generator=g) for _ in range(3))
    sigmas = sigma_schedule(16, 3.0)
    sample, pred_x0, log_prob = sde_step(v, x, sigmas, index, 0.7, noise=noise)
    mean, std, x0 = _reference_transition(x, v, sigmas, index, 0.7)
    torch.testing.assert_close(sample.double(), mean + std * noise.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred_x0.double(), x0, atol=1e-6, rtol=1e-6)
    expected = torch.distributions.Normal(mean, std).log_prob(sample.double()).mean(dim=(1, 2))
    assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob.double(), expected, atol=1e-4, rtol=1e-5)


def test_sde_step_scores_a_given_sample_and_uses_the_generator():
    g = torch.Generator().manual_seed(0)
    x, v, other = (torch.randn(4, 6, generator=g) for _ in range(3))
    sigmas = sigma_schedule(16, 3.0)
    scored, _, log_prob = sde_step(v, x, sigmas, 3, 0.7, prev_sample=other)
    assert torch.equal(scored, other)
    mean, std, _ = _reference_transition(x, v, sigmas, 3, 0.7)
    torch.testing.assert_close(log_prob.double(), torch.distributions.Normal(mean, std).log_prob(other.double()).mean(1),
                               atol=1e-4, rtol=1e-5)
    a = sde_step(v, x, sigmas, 3, 0.7, generator=torch.Generator().manual_seed(5))[0]
    b = sde_step(v, x, sigmas, 3, 0.7, generator=torch.Generator().manual_seed(5))[0]
    c = sde_step(v, x, sigmas, 3, 0.7, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_first_step_uses_sigma_1_in_place_of_sigma_tilde():
    sigmas = sigma_schedule(16, 3.0)
    x, v = torch.ones(1, 4), torch.zeros(1, 4)
    _, _, log_prob = sde_step(v, x, sigmas, 0, 0.7, prev_sample=x)
    assert torch.isfinite(log_prob).all()
    s = 0.7 * math.sqrt(1.0 / (1 - float(sigmas[1])))
    std = s * math.sqrt(1.0 - float(sigmas[1]))
    mean = 1 + s**2 / 2 * (float(sigmas[1]) - 1)  # x·(1 + s²/(2σ)·dt), v = 0
    expected = -((1 - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert log_prob.item() == pytest.approx(expected, rel=1e-5)


def test_eta_zero_is_the_euler_step():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    sigmas = sigma_schedule(16, 3.0)
    for i in (0, 5, 15):
        sample, pred_x0, log_prob = sde_step(v, x, sigmas, i, 0.0)
        torch.testing.assert_close(sample, x + (sigmas[i + 1] - sigmas[i]) * v)
        torch.testing.assert_close(pred_x0, x - sigmas[i] * v)
        assert log_prob is None
        assert torch.equal(ode_step(v, x, sigmas, i)[0], sample)


def test_sde_step_validates():
    sigmas = sigma_schedule(4, 3.0)
    with pytest.raises(ValueError, match="same shape"):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 4), sigmas, 0, 0.7)
    with pytest.raises(ValueError, match="index=4"):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 3), sigmas, 4, 0.7)
    with pytest.raises(ValueError, match="noise"):
        sde_step(torch.zeros(2, 3), torch.zeros(2, 3), sigmas, 0, 0.7, noise=torch.zeros(3))


# (T, k, g) -> the sub-grid of §3.4, written out by hand
GRIDS = {
    (16, 0, 1): list(range(17)),
    (16, 0, 2): [0, 1, 2, 4, 6, 8, 10, 12, 14, 16],
    (16, 1, 2): [0, 1, 2, 3, 5, 7, 9, 11, 13, 15],  # stops short of σ = 0
    (16, 7, 1): list(range(17)),
    (16, 7, 2): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15],  # stops short
    (16, 6, 2): [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16],
    (16, 0, 3): [0, 1, 2, 5, 8, 11, 14],  # stops short
    (16, 2, 3): [0, 1, 2, 3, 4, 7, 10, 13, 16],
    (16, 7, 3): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15],  # stops short
    (16, 14, 2): list(range(17)),
    (8, 3, 2): [0, 1, 2, 3, 4, 5, 7],  # stops short
}


@pytest.mark.parametrize("key", sorted(GRIDS))
def test_granular_sub_grids(key):
    t, k, g = key
    assert granular_indices(t, k, g) == GRIDS[key]
    sigmas = sigma_schedule(t, 3.0)
    assert torch.equal(granular_schedule(sigmas, k, g), sigmas[GRIDS[key]])


def test_granular_schedule_validates():
    sigmas = sigma_schedule(16, 3.0)
    with pytest.raises(ValueError, match="granularity=0"):
        granular_schedule(sigmas, 0, 0)
    with pytest.raises(ValueError, match="branch_step=15"):
        granular_schedule(sigmas, 15, 1)


def test_pack_unpack_and_ids_match_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 10, 6, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 10, 6))
    assert torch.equal(unpack_latents(packed, 10, 6), latents)
    assert torch.equal(unpack_latents(packed, 10, 6), FluxPipeline._unpack_latents(packed, 80, 48, 8))
    assert torch.equal(latent_image_ids(10, 6), FluxPipeline._prepare_latent_image_ids(1, 5, 3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 3, 4))
