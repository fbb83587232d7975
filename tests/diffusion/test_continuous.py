"""Continuous processes and samplers, checked against a problem with a known answer: data drawn
from N(mu, sd^2), for which the exact denoiser has a closed form."""

import pytest
import torch

from diffusion import PROCESSES, build_process
from diffusion.guidance import guided
from diffusion.samplers import SAMPLERS

MU, SD = 0.5, 0.3
CONTINUOUS = [("gaussian", {"schedule": s, "prediction": p}) for s in ("linear", "cosine") for p in ("eps", "v", "x0")]
CONTINUOUS += [("flow", {"timesteps": "uniform"})]


def exact_model(process):
    """The Bayes-optimal network output for Gaussian data, in the process's own parameterization."""

    def fn(xt, t, cond):
        if hasattr(process, "alpha_bar"):
            ab = process.alpha_bar(t).view(-1, 1)
            a, b = ab.sqrt(), (1 - ab).sqrt()
        else:
            a, b = (1 - t).view(-1, 1), t.view(-1, 1)
        x0 = MU + a * SD**2 / (a**2 * SD**2 + b**2) * (xt - a * MU)
        eps = (xt - a * x0) / b
        if not hasattr(process, "prediction"):
            return eps - x0
        return {"eps": eps, "v": a * eps - b * x0, "x0": x0}[process.prediction]

    return fn


@pytest.mark.parametrize("name,options", CONTINUOUS)
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_recover_the_data_distribution(name, options, sampler):
    process = build_process(name, options)
    x = process.sample(
        exact_model(process), (4000, 4), {}, steps=200, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    assert x.isfinite().all()
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - SD) < 0.02


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampling_is_deterministic_under_a_seed(sampler):
    process = build_process("gaussian", {})
    run = lambda seed: process.sample(
        exact_model(process), (8, 4), {}, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_exact_model_has_lower_loss_than_a_wrong_one():
    for name, options in CONTINUOUS:
        process = build_process(name, options)
        x0 = MU + SD * torch.randn(2048, 4, generator=torch.Generator().manual_seed(0))
        good = process.loss(exact_model(process), x0, {}, generator=torch.Generator().manual_seed(1))
        bad = process.loss(lambda xt, t, c: torch.zeros_like(xt), x0, {}, generator=torch.Generator().manual_seed(1))
        assert good < 0.8 * bad, (name, options)


def test_callback_sees_the_x0_estimate_every_step():
    process = build_process("gaussian", {})
    seen = []
    process.sample(
        exact_model(process),
        (16, 4),
        {},
        steps=7,
        sampler="dpmpp_2m",
        callback=lambda i, x0: seen.append((i, x0.mean().item())),
    )
    assert [i for i, _ in seen] == list(range(7))
    assert abs(seen[-1][1] - MU) < 0.2  # the last preview is close to the answer


def test_guidance_applies_to_every_channel():
    def model_fn(xt, t, cond):  # conditional output 1, unconditional 0, on all 4 channels
        return (~cond["drop"]).float().view(-1, 1, 1).expand(-1, xt.shape[1], xt.shape[2])

    fn = guided(model_fn, 3.0, {"label": torch.zeros(2, dtype=torch.long)})
    out = fn(torch.zeros(2, 4, 5), torch.zeros(2), {"label": torch.zeros(2, dtype=torch.long)})
    torch.testing.assert_close(out, torch.full((2, 4, 5), 3.0))


def test_bad_names_are_reported():
    with pytest.raises(ValueError, match="modality.process='ddx'.*choose one of"):
        build_process("ddx", {})
    with pytest.raises(ValueError, match="diffusion.prediction='score'"):
        build_process("gaussian", {"prediction": "score"})
    with pytest.raises(ValueError, match="sampler='plms'"):
        build_process("gaussian", {}).sample(exact_model(PROCESSES["gaussian"]()), (2, 2), {}, sampler="plms")
