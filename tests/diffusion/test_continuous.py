"""Continuous processes and samplers, checked against a problem with a known answer: data drawn
from N(mu, sd^2), for which the exact denoiser has a closed form."""

import pytest
import torch

from diffusion import PROCESSES, build_process
from diffusion.guidance import guided
from diffusion.samplers import SAMPLERS

MU, SD = 0.5, 0.3
# sqrt's lowest noise level is sigma ~ 0.18 by design (Diffusion-LM's), so its samples are posterior means
# there and narrower than the data: it is checked by the loss and schedule tests, not by distribution recovery.
CONTINUOUS = [("gaussian", {"schedule": s, "prediction": p}) for s in ("linear", "cosine") for p in ("eps", "v", "x0")]
CONTINUOUS += [("flow", {"timesteps": "uniform"})]
# a shifted schedule must still take every sampler to the data
CONTINUOUS += [("gaussian", {"schedule": "cosine", "prediction": "v", "shift": 3.0}), ("flow", {"shift": 3.0})]
SQRT = [("gaussian", {"schedule": "sqrt", "prediction": p}) for p in ("eps", "v", "x0")]


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
    for name, options in CONTINUOUS + SQRT:
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


@pytest.mark.parametrize(
    "prediction,ab,expected",
    [
        # Hang et al. 2023, min(SNR, gamma) on the x0 error; SNR = ab / (1 - ab), gamma = 5
        ("v", 0.8, 4 * 0.2),  # SNR 4 under the cap: SNR * sigma^2 = ab = 0.8
        ("v", 0.9, 5 * 0.1),  # SNR 9 capped at 5, times sigma^2 = 0.1
        ("eps", 0.9, 5 / 9),  # min(SNR, 5) / SNR
        ("eps", 0.5, 1.0),  # SNR 1: eps weight 1
        ("x0", 0.9, 5.0),  # min(SNR, 5)
        ("x0", 0.2, 0.25),  # SNR 0.25
    ],
)
def test_min_snr_weights_equal_hand_computed_values(prediction, ab, expected):
    process = build_process("gaussian", {"prediction": prediction, "weighting": "min_snr", "snr_gamma": 5.0})
    t = torch.tensor([process.t_of_alpha_bar(ab)], dtype=torch.float64)
    assert process.alpha_bar(t).item() == pytest.approx(ab, rel=1e-9)
    assert process.loss_weight(t).item() == pytest.approx(expected, rel=1e-6)


def test_min_snr_weights_for_flow_and_no_weighting():
    flow = build_process("flow", {"weighting": "min_snr", "snr_gamma": 5.0})
    t = torch.tensor([0.2, 0.5, 0.0])
    # SNR = ((1 - t) / t)^2 = 16, 1, inf; x0_hat = x_t - t v_hat, so the weight is min(SNR, 5) t^2
    torch.testing.assert_close(flow.loss_weight(t), torch.tensor([5 * 0.04, 0.25, 0.0]))
    plain = build_process("gaussian", {})
    torch.testing.assert_close(plain.loss_weight(torch.tensor([0.1, 0.9])), torch.ones(2))


def test_weighted_loss_is_the_weighted_mean_of_per_example_errors():
    process = build_process("gaussian", {"prediction": "x0", "weighting": "min_snr", "snr_gamma": 2.0})
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    zero = lambda xt, t, cond: torch.zeros_like(xt)
    loss = process.loss(zero, x0, {}, generator=torch.Generator().manual_seed(1))
    t = process.draw_t(64, torch.Generator().manual_seed(1))  # the same first draw as inside loss
    expected = (process.loss_weight(t) * x0.pow(2).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = build_process("gaussian", {"prediction": "x0"}).loss(zero, x0, {}, torch.Generator().manual_seed(1))
    assert unweighted.item() == pytest.approx(x0.pow(2).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(unweighted.item(), rel=1e-2)


@pytest.mark.parametrize("name", ["gaussian", "flow"])
def test_logit_normal_timesteps_concentrate_on_the_middle(name):
    draw = lambda density: build_process(name, {"timesteps": density}).draw_t(20000, torch.Generator().manual_seed(0))
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()
    # logit-normal: P(|n| < logit(0.75)) = 2 Phi(1.0986) - 1 = 0.728; uniform: 0.5
    assert middle(draw("logit_normal")) == pytest.approx(0.728, abs=0.015)
    assert middle(draw("uniform")) == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize("name,density", [("gaussian", "uniform"), ("flow", "logit_normal"), ("flow", "uniform")])
def test_stratified_timesteps_put_one_example_in_each_quantile_band(name, density):
    """Example i of a batch of n lands in the density's i-th n-quantile band; over many batches each
    example's time still has the density's distribution, and the batch's mean time varies far less."""
    plain = build_process(name, {"timesteps": density})
    strat = build_process(name, {"timesteps": density, "stratified": True})
    gen = torch.Generator().manual_seed(0)
    batches = torch.stack([strat.draw_t(8, gen) for _ in range(4000)])  # (4000, 8)
    # band edges: the density's n-quantiles, estimated from many plain draws (so a few times right at
    # an edge land on its other side); unstratified draws would match their band 1 time in 8
    edges = plain.draw_t(400_000, torch.Generator().manual_seed(1)).quantile(torch.linspace(0, 1, 9)[1:-1])
    assert (torch.bucketize(batches, edges) == torch.arange(8)).float().mean() > 0.98
    mixed = batches.flatten()  # one time from a random band of each batch: the plain density
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()
    assert middle(mixed) == pytest.approx(middle(plain.draw_t(32000, gen)), abs=0.015)
    plain_means = torch.stack([plain.draw_t(8, gen) for _ in range(4000)]).mean(1)
    assert batches.mean(1).std() < 0.2 * plain_means.std()


def test_bad_density_options_are_refused_by_name():
    with pytest.raises(ValueError, match="diffusion.weighting='snr'"):
        build_process("gaussian", {"weighting": "snr"})
    with pytest.raises(ValueError, match="diffusion.timesteps='beta'"):
        build_process("flow", {"timesteps": "beta"})
    with pytest.raises(ValueError, match="snr_gamma=0"):
        build_process("gaussian", {"weighting": "min_snr", "snr_gamma": 0})


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "sqrt"])
def test_every_schedule_maps_sigma_back_to_its_time(schedule, shift):
    """native(sigma) must find the t whose sigma it is, or samplers run at the wrong noise levels."""
    process = build_process("gaussian", {"schedule": schedule, "shift": shift})
    for t in (0.001, 0.05, 0.3, 0.7, 0.95):
        sigma = process.sigma_of_t(torch.tensor(t, dtype=torch.float64)).item()
        assert process.native(sigma)[0] == pytest.approx(t, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sqrt"])
def test_shift_multiplies_every_noise_level(schedule):
    base = build_process("gaussian", {"schedule": schedule})
    shifted = build_process("gaussian", {"schedule": schedule, "shift": 3.0})
    t = torch.tensor([0.001, 0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(shifted.sigma_of_t(t), 3 * base.sigma_of_t(t))
    # the training loss weights follow: min-SNR caps SNR / 9 instead of SNR
    snr = lambda p: p.sigma_of_t(t).pow(-2)
    torch.testing.assert_close(snr(shifted), snr(base) / 9)


def test_shift_moves_flow_times_towards_noise_in_training_and_sampling():
    base, shifted = (
        build_process("flow", {"timesteps": "uniform"}),
        build_process("flow", {"timesteps": "uniform", "shift": 3.0}),
    )
    t = shifted.draw_t(20000, torch.Generator().manual_seed(0))
    # t' = 3 t / (1 + 2 t) with t uniform: P(t' < 0.75) = P(t < 0.5) = 0.5
    assert (t < 0.75).float().mean().item() == pytest.approx(0.5, abs=0.015)
    torch.testing.assert_close(shifted.sigmas(10), 3 * base.sigmas(10))
    assert build_process("flow", {}).sigmas(10).equal(build_process("flow", {"shift": 1.0}).sigmas(10))


def test_a_shift_that_is_not_positive_is_refused_by_name():
    for name in ("gaussian", "flow"):
        with pytest.raises(ValueError, match="diffusion.shift=0"):
            build_process(name, {"shift": 0})


def test_sqrt_schedule_adds_noise_faster_than_cosine_early_on():
    sqrt, cosine = build_process("gaussian", {"schedule": "sqrt"}), build_process("gaussian", {"schedule": "cosine"})
    t = torch.tensor([0.01, 0.05, 0.1])
    assert (sqrt.alpha_bar(t) < cosine.alpha_bar(t) - 0.09).all()
    assert sqrt.alpha_bar(torch.tensor(0.0)).item() == pytest.approx(0.99)  # 1 - sqrt(1e-4)


def test_bound_is_exact_for_the_bayes_optimal_model_on_gaussian_data():
    """For x0 ~ N(mu, sd^2) the exact denoiser makes the bound's diffusion + prior terms plus the
    decoder term at t_min equal -log p(x0) on average, up to the Monte-Carlo error; a worse model's
    bound is higher."""
    process = build_process("gaussian", {"schedule": "cosine", "prediction": "x0"})
    x0 = MU + SD * torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    terms = process.bound(exact_model(process), x0, {}, mc_timesteps=8, generator=torch.Generator().manual_seed(1))
    # decoder term: the Gaussian -log q(x0 | z_t_min) / alpha, estimated by its entropy at that level
    ab = process.alpha_bar(torch.tensor(process.t_min, dtype=torch.float64))
    sigma0 = ((1 - ab) / ab).sqrt()
    decoder = 0.5 * torch.log(2 * torch.pi * torch.e * sigma0**2)
    true_nll = 0.5 * torch.log(torch.tensor(2 * torch.pi * torch.e * SD**2, dtype=torch.float64))
    assert (terms.mean() + decoder).item() == pytest.approx(true_nll.item(), abs=0.05)
    worse = process.bound(lambda xt, t, c: torch.zeros_like(xt), x0, {}, 8, torch.Generator().manual_seed(1))
    assert worse.mean() > terms.mean() + 0.5


def test_self_conditioning_feeds_each_step_the_previous_estimate():
    process = build_process("gaussian", {"prediction": "x0"})
    seen, outputs = [], []

    def model_fn(xt, t, cond):
        seen.append(cond["x0_self"].clone())
        outputs.append(exact_model(process)(xt, t, cond))
        return outputs[-1]

    process.sample(model_fn, (4, 2), {}, steps=4, sampler="ddim", self_condition=True)
    assert len(seen) == 4 and (seen[0] == 0).all()
    for given, previous in zip(seen[1:], outputs[:-1]):
        torch.testing.assert_close(given, previous)  # x0 prediction: the output is the estimate
    calls = []
    process.sample(lambda xt, t, c: calls.append(c) or xt * 0, (4, 2), {}, steps=2, sampler="ddim")
    assert all("x0_self" not in c for c in calls)  # off unless asked


def test_self_conditioned_training_gives_half_the_examples_a_first_estimate():
    process = build_process("gaussian", {"prediction": "x0"})
    calls = []

    def model_fn(xt, t, cond):
        calls.append({key: value.clone() for key, value in cond.items()})
        return torch.full_like(xt, 0.7) + cond["label"][:, None]  # its estimate: 0.7 plus the label

    label = torch.arange(4000).float()
    process.loss_and_x0(
        model_fn, torch.zeros(4000, 1), {"label": label}, torch.Generator().manual_seed(0), self_condition=True
    )
    first, second = calls
    assert (first["x0_self"] == 0).all()  # the first pass starts from nothing
    given = second["x0_self"][:, 0] != 0
    assert 0.45 < given.float().mean().item() < 0.55
    # the first pass ran on the given half alone, each example with its own condition
    assert torch.equal(first["label"], label[given])
    torch.testing.assert_close(second["x0_self"][given, 0], 0.7 + label[given])
    assert torch.equal(second["label"], label)
