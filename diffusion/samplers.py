"""Samplers for continuous processes, as pure functions.

Every continuous process is sampled in the same coordinates: x = x0 + sigma * eps
(the "variance exploding" form of Karras et al. 2022, Sec. 2). A VP process with
x_t = alpha x0 + sigma_t eps is the same family after dividing by alpha (sigma =
sigma_t / alpha), and rectified flow x_t = (1 - t) x0 + t eps after dividing by 1 - t
(sigma = t / (1 - t)); the process object does that change of variables, so each
sampler below is written once.

    denoise(x, sigma) -> x0_hat     sigmas: decreasing, ending at 0

``callback(i, x, sigma, denoised)`` sees the current x0 estimate at every step.
"""

from __future__ import annotations

import torch


def _noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the move sigma -> sigma_next into a deterministic part down to sigma_down and
    fresh noise sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 gives the
    DDPM posterior q(x_next | x, x0_hat) exactly; eta = 0 gives DDIM (Song et al. 2021, Eq. 16)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def sample_ddim(denoise, x, sigmas, *, eta: float = 0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta; eta = 1 is DDPM ancestral sampling
    (Ho et al. 2020, Algorithm 2) and eta = 0 the deterministic DDIM, which is also Euler's
    method on the probability-flow ODE in these coordinates."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, x, sigma, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(denoise, x, sigmas, *, generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), i.e. DDIM with eta = 1."""
    return sample_ddim(denoise, x, sigmas, eta=1.0, generator=generator, callback=callback)


@torch.no_grad()
def sample_euler(denoise, x, sigmas, *, generator=None, callback=None):
    """Euler's method on dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Algorithm 2,
    first-order part, no churn). The step to sigma = 0 lands on D(x, sigma) itself (the same value
    without round-off)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, x, sigma, denoised)
        x = denoised if sigma_next == 0 else x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_heun(denoise, x, sigmas, *, generator=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1): an Euler step, then the
    average of the slopes at both ends; the last step to sigma = 0 stays first order and lands on
    D(x, sigma) itself."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            break
        d = (x - denoised) / sigma
        x_next = x + d * (sigma_next - sigma)
        d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022,
    Algorithm 2), in log-sigma time lambda = -log(sigma). The first step is first order
    (it is DDIM) and the last step to sigma = 0 returns the denoised estimate."""
    previous = None  # (denoised, h) of the step before
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = torch.log(torch.tensor(sigma / sigma_next)).item()  # lambda_next - lambda
        d = denoised
        if previous is not None:
            r = previous[1] / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous[0]
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * d  # (sigma'/sigma) x - expm1(-h) d
        previous = (denoised, h)
    return x


SAMPLERS = {  # the first is the default
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler": sample_euler,
    "heun": sample_heun,
}
