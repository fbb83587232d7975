"""Continuous noise processes: Gaussian VP diffusion and rectified flow.

Both are described to the samplers by one change of variables (see samplers.py):
``native(sigma) -> (t, c)`` gives the process time t for a sampler sigma and the
factor c with x_native = c * x_sampler. ``model_fn(xt, t, cond)`` always sees the
process's own x_t and t.
"""

from __future__ import annotations

import inspect
import math

import torch

from diffusion.guidance import guided
from diffusion.samplers import SAMPLERS


class ContinuousProcess:
    """What VP diffusion and rectified flow share: the training-time density and weighting over noise
    levels, and the sampler loop.

    Training draws t from `timesteps` on [t_min, 1): "uniform", or "logit_normal" (t = sigmoid(n),
    n ~ N(0, 1), Esser et al. 2024, Sec. 3.1), which spends the steps on the middle noise levels where
    the target is hardest to predict. `weighting` multiplies each example's squared error:
    "none", or "min_snr" (Hang et al. 2023): the error measured on x0 weighted by min(SNR(t), gamma),
    i.e. the weight min(SNR, gamma) * (d x0_hat / d output)^2 on the network's own target. It stops the
    many easy low-noise examples from dominating the gradient.
    """

    t_max: float = 1.0
    t_min: float = 1e-3
    samplers = tuple(SAMPLERS)  # valid names, the first the default
    TIMESTEPS = ("uniform", "logit_normal")
    WEIGHTINGS = ("none", "min_snr")

    def __init__(self, timesteps: str = "uniform", weighting: str = "none", snr_gamma: float = 5.0):
        if timesteps not in self.TIMESTEPS:
            raise ValueError(f"diffusion.timesteps={timesteps!r}; choose one of {self.TIMESTEPS}")
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"diffusion.weighting={weighting!r}; choose one of {self.WEIGHTINGS}")
        if not snr_gamma > 0:
            raise ValueError(f"diffusion.snr_gamma={snr_gamma} must be positive (Hang et al. use 5)")
        self.timesteps, self.weighting, self.snr_gamma = timesteps, weighting, float(snr_gamma)

    def draw_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        """n training times on [t_min, 1) from the `timesteps` density."""
        if self.timesteps == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        else:
            u = torch.rand(n, generator=generator, device=device)
        return self.t_min + (1 - self.t_min) * u

    def x0_error_scale(self, t: torch.Tensor) -> torch.Tensor:
        """|d x0_hat / d output| at t: how an error in the network's target moves the x0 estimate."""
        raise NotImplementedError

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weights (B,) on the squared error of the network's target at times t."""
        if self.weighting == "none":
            return torch.ones_like(t)
        snr = self.sigma_of_t(t).pow(-2)
        return snr.clamp(max=self.snr_gamma) * self.x0_error_scale(t).pow(2)

    def weighted_mse(self, pred, target, t) -> torch.Tensor:
        """The mean over the batch of loss_weight(t) times each example's mean squared error."""
        per_example = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (self.loss_weight(t) * per_example).mean()

    def sample_steps(self, steps: int, shape) -> int:
        """The network steps `sample` takes when asked for `steps`: exactly those."""
        return steps

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def native(self, sigma: float) -> tuple[float, float]:
        raise NotImplementedError

    def to_x0(self, out, xt, t):
        raise NotImplementedError

    def sigmas(self, steps: int) -> torch.Tensor:
        """Sampler noise levels for `steps` steps: uniform in process time from t_max down to
        t_min, then 0 (processes whose t_min is 0 end there)."""
        if self.t_min == 0:
            return self.sigma_of_t(torch.linspace(self.t_max, 0, steps + 1, dtype=torch.float64))
        t = torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)
        return torch.cat([self.sigma_of_t(t), torch.zeros(1, dtype=torch.float64)])

    def denoiser(self, model_fn, cond, x0_hook=None):
        """D(x, sigma) -> x0_hat in the sampler's coordinates, corrected by x0_hook when given."""

        def denoise(x, sigma: float):
            t, c = self.native(sigma)
            xt = x * c
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            x0_hat = self.to_x0(model_fn(xt, tt, cond), xt, tt)
            return x0_hat if x0_hook is None else x0_hook(x0_hat)

        return denoise

    @torch.no_grad()
    def sample(
        self,
        model_fn,
        shape,
        cond,
        steps=50,
        sampler="dpmpp_2m",
        guidance=1.0,
        generator=None,
        device="cpu",
        callback=None,
        x0_hook=None,
        **sampler_options,
    ):
        """Draw x0 samples.

        Args:
            model_fn: (xt, t, cond) -> network output, the modality-wrapped backbone.
            shape: shape of x0, batch first. cond: dict of condition tensors (may be empty).
            steps: sampler steps; sampler: a name in SAMPLERS; guidance: classifier-free
                guidance scale (1 = conditional only).
            callback: called as callback(i, x0_preview) at every step.
            x0_hook: x0_hat -> corrected x0_hat, applied to the denoiser's estimate at every step,
                so a modality steers sampling without touching the samplers: holding known
                values fixed (a given first frame, replacement as in RePaint, Lugmayr et al.
                2022) or projecting onto valid data. Every sampler's last step to sigma = 0
                returns the estimate itself, so what the hook fixes holds exactly in the output.
        Returns:
            x0 samples of `shape`.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not a continuous sampler; choose one of {list(SAMPLERS)}")
        accepted = inspect.signature(SAMPLERS[sampler]).parameters
        unused = sorted(set(sampler_options) - set(accepted))
        if unused:
            raise ValueError(f"option(s) {unused} do not apply to sampler={sampler}")
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        sigmas = self.sigmas(steps)
        noise = torch.randn(shape, generator=generator, device=device)
        x = noise / self.native(float(sigmas[0]))[1]
        hook = None if callback is None else (lambda i, x, sigma, denoised: callback(i, denoised))
        denoise = self.denoiser(guided(model_fn, guidance, cond), cond, x0_hook)
        return SAMPLERS[sampler](denoise, x, sigmas, generator=generator, callback=hook, **sampler_options)


class GaussianVP(ContinuousProcess):
    """Variance-preserving Gaussian diffusion, x_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1.

    Args:
        schedule: "linear" (the continuous limit of DDPM's linear betas, beta(t) = 0.1 + 19.9 t,
            Song et al. 2021) or "cosine" (Nichol & Dhariwal 2021, Eq. 17).
        prediction: what the network predicts: "eps", "v" (Salimans & Ho 2022) or "x0".
        timesteps, weighting, snr_gamma: the training density and weighting (ContinuousProcess).
    """

    SCHEDULES = ("linear", "cosine")
    PREDICTIONS = ("eps", "v", "x0")
    beta0, beta1, cosine_s = 0.1, 20.0, 0.008
    min_alpha_bar = 1e-6  # cosine reaches 0 at t = 1; clip so sigma/alpha stays finite

    def __init__(
        self,
        schedule: str = "cosine",
        prediction: str = "v",
        timesteps: str = "uniform",
        weighting: str = "none",
        snr_gamma: float = 5.0,
    ):
        super().__init__(timesteps, weighting, snr_gamma)
        if schedule not in self.SCHEDULES:
            raise ValueError(f"diffusion.schedule={schedule!r} for gaussian; choose one of {self.SCHEDULES}")
        if prediction not in self.PREDICTIONS:
            raise ValueError(f"diffusion.prediction={prediction!r}; choose one of {self.PREDICTIONS}")
        self.schedule, self.prediction = schedule, prediction

    def sigmas(self, steps: int) -> torch.Tensor:
        """Noise levels uniform in log-SNR between t = 1 and t_min, then 0: the spacing DPM-Solver
        recommends for VP models (Lu et al. 2022, Sec. 3.3); on a Gaussian toy problem it beats
        uniform-t spacing for every sampler at 10-25 steps."""
        ends = self.sigma_of_t(torch.tensor([self.t_max, self.t_min], dtype=torch.float64)).log()
        return torch.cat(
            [torch.linspace(ends[0], ends[1], steps, dtype=torch.float64).exp(), torch.zeros(1, dtype=torch.float64)]
        )

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            ab = torch.exp(-(self.beta0 * t + 0.5 * (self.beta1 - self.beta0) * t**2))
        else:
            f = lambda u: torch.cos((u + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
            ab = f(t) / f(torch.zeros_like(t))
        return ab.clamp(min=self.min_alpha_bar)

    def t_of_alpha_bar(self, ab: float) -> float:
        if self.schedule == "linear":  # solve 0.5 (b1 - b0) t^2 + b0 t + log(ab) = 0
            db = self.beta1 - self.beta0
            return (-self.beta0 + math.sqrt(self.beta0**2 - 2 * db * math.log(ab))) / db
        f0 = math.cos(self.cosine_s / (1 + self.cosine_s) * math.pi / 2) ** 2
        return min(1.0, math.acos(math.sqrt(ab * f0)) * 2 / math.pi * (1 + self.cosine_s) - self.cosine_s)

    def sigma_of_t(self, t):
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt()

    def native(self, sigma):
        ab = 1 / (1 + sigma**2)
        return self.t_of_alpha_bar(ab), math.sqrt(ab)

    def corrupt(self, x0, t, eps):
        """q(x_t | x0): (x_t, alpha, sigma) with alpha, sigma broadcast to x0."""
        ab = self.alpha_bar(t).view(-1, *[1] * (x0.dim() - 1))
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        return alpha * x0 + sigma * eps, alpha, sigma

    def to_x0(self, out, xt, t):
        ab = self.alpha_bar(t).view(-1, *[1] * (xt.dim() - 1))
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        out = out.float()
        if self.prediction == "eps":
            return (xt - sigma * out) / alpha
        if self.prediction == "v":
            return alpha * xt - sigma * out
        return out

    def x0_error_scale(self, t):
        ab = self.alpha_bar(t)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        return {"eps": sigma / alpha, "v": sigma, "x0": torch.ones_like(t)}[self.prediction]

    def loss(self, model_fn, x0, cond, generator=None):
        """MSE on the chosen target (Ho et al. 2020, Eq. 14), t from `timesteps`, weighted by `weighting`."""
        t = self.draw_t(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        xt, alpha, sigma = self.corrupt(x0, t, eps)
        target = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}[self.prediction]
        return self.weighted_mse(model_fn(xt, t, cond), target, t)


class RectifiedFlow(ContinuousProcess):
    """Rectified flow / flow matching with the straight path x_t = (1 - t) x0 + t eps and
    velocity target v = eps - x0 (Liu et al. 2023; Lipman et al. 2023).

    Args:
        timesteps, weighting, snr_gamma: the training density and weighting (ContinuousProcess);
            here the density defaults to "logit_normal" (Esser et al. 2024, SD3, m=0, s=1).
    """

    t_max = 0.999  # sigma = t / (1 - t) is infinite at t = 1
    t_min = 0.0

    def __init__(self, timesteps: str = "logit_normal", weighting: str = "none", snr_gamma: float = 5.0):
        super().__init__(timesteps, weighting, snr_gamma)

    def sigma_of_t(self, t):
        return t / (1 - t)

    def native(self, sigma):
        return sigma / (1 + sigma), 1 / (1 + sigma)

    def corrupt(self, x0, t, eps):
        tt = t.view(-1, *[1] * (x0.dim() - 1))
        return (1 - tt) * x0 + tt * eps

    def to_x0(self, out, xt, t):
        return xt - t.view(-1, *[1] * (xt.dim() - 1)) * out.float()

    def x0_error_scale(self, t):
        return t  # x0_hat = x_t - t v_hat

    def loss(self, model_fn, x0, cond, generator=None):
        """Conditional flow matching: MSE between the predicted and the path velocity, weighted by `weighting`."""
        t = self.draw_t(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        return self.weighted_mse(model_fn(self.corrupt(x0, t, eps), t, cond), eps - x0, t)
