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

SELF_COND = "x0_self"  # the condition key of the self-conditioning estimate


class ContinuousProcess:
    """What VP diffusion and rectified flow share: the training-time density and weighting over noise
    levels, and the sampler loop.

    Training draws t from `timesteps` on [t_min, 1): "uniform", or "logit_normal" (t = sigmoid(n),
    n ~ N(0, 1), Esser et al. 2024, Sec. 3.1), which spends the steps on the middle noise levels where
    the target is hardest to predict. `shift` s multiplies the noise level sigma = 1/sqrt(SNR) at every
    time by s, in training and sampling alike: data with much redundancy (eight near-identical frames of
    a clip, large frames) is still recognisable at noise levels that hide a small image, so a schedule
    made for small images spends most of its time where the answer is already decided (Hoogeboom et al.
    2023, "simple diffusion", Sec. 3.1, shift the log-SNR by 2 log s; Esser et al. 2024, Sec. 5.3.2).
    `stratified` spreads each batch's times over the density: example i of n draws its u in the i-th
    n-quantile band [i/n, (i+1)/n) instead of anywhere on [0, 1) (Kingma et al. 2021, "Variational
    Diffusion Models", App. I.1: the low-discrepancy sampler), so a small batch never spends all its
    examples at one end of the noise range; each example's time keeps its marginal density, so the
    expected loss is unchanged and only its variance falls.
    `weighting` multiplies each example's squared error:
    "none", or "min_snr" (Hang et al. 2023): the error measured on x0 weighted by min(SNR(t), gamma),
    i.e. the weight min(SNR, gamma) * (d x0_hat / d output)^2 on the network's own target. It stops the
    many easy low-noise examples from dominating the gradient.
    """

    t_max: float = 1.0
    t_min: float = 1e-3
    samplers = tuple(SAMPLERS)  # valid names, the first the default
    TIMESTEPS = ("uniform", "logit_normal")
    WEIGHTINGS = ("none", "min_snr")
    default_timesteps = "uniform"  # the density while `timesteps` is None

    def __init__(
        self,
        timesteps: str | None = None,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        shift: float = 1.0,
        stratified: bool = False,
    ):
        if not shift > 0:
            raise ValueError(f"diffusion.shift={shift} must be positive (1: the schedule as written)")
        timesteps = timesteps or self.default_timesteps
        if timesteps not in self.TIMESTEPS:
            raise ValueError(f"diffusion.timesteps={timesteps!r}; choose one of {self.TIMESTEPS}")
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"diffusion.weighting={weighting!r}; choose one of {self.WEIGHTINGS}")
        if not snr_gamma > 0:
            raise ValueError(f"diffusion.snr_gamma={snr_gamma} must be positive (Hang et al. use 5)")
        self.timesteps, self.weighting = timesteps, weighting
        self.snr_gamma, self.shift = float(snr_gamma), float(shift)
        self.stratified = bool(stratified)

    def draw_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        """n training times on [t_min, 1) from the `timesteps` density (one per quantile band of it
        where `stratified`, in band order: the batch's examples are already in random order)."""
        if self.stratified:
            u = (torch.arange(n, device=device) + torch.rand(n, generator=generator, device=device)) / n
            if self.timesteps == "logit_normal":  # through the normal's inverse CDF
                u = torch.sigmoid(torch.special.ndtri(u))
        elif self.timesteps == "logit_normal":
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

    def self_conditioned(self, model_fn, xt, t, cond, generator=None) -> dict:
        """`cond` plus SELF_COND, the x0 estimate a network trained with self-conditioning (Chen et al.
        2023, "Analog Bits", Sec. 3.3) sees beside x_t: for a random half of the examples the network's
        own estimate from a first pass without it (no gradient), zeros for the rest; so the network
        learns both to start from nothing and to refine an estimate, as it does along a sampling run.
        The first pass runs on that half alone (every condition is per example), a sixth of a training
        step instead of a third."""
        keep = (torch.rand(xt.shape[0], generator=generator, device=xt.device) < 0.5).nonzero().squeeze(1)
        estimate = torch.zeros_like(xt)
        if len(keep):  # no collective is skipped where a process keeps none: the DiT has no buffers for DDP to sync
            part = {key: value[keep] for key, value in cond.items()}
            part[SELF_COND] = torch.zeros_like(xt[keep])
            with torch.no_grad():
                estimate[keep] = self.to_x0(model_fn(xt[keep], t[keep], part), xt[keep], t[keep]).to(xt.dtype)
        return {**cond, SELF_COND: estimate}

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

    def denoiser(self, model_fn, cond, x0_hook=None, sigmas=None, self_condition=False):
        """D(x, sigma) -> x0_hat in the sampler's coordinates, corrected by x0_hook when given.

        self_condition: pass the previous call's x0 estimate (before the hook, as in training) to
        the network as cond[SELF_COND], zeros at the first call.

        x0_hook is called as x0_hook(x0_hat, progress), progress = i / (len(sigmas) - 1) for the
        sampler's noise level sigmas[i] (0 at pure noise, towards 1 at the data; 0 when `sigmas` is
        not given); a second-order sampler's evaluation at sigmas[i + 1] counts as step i + 1."""
        position = {} if sigmas is None else {float(s): i / (len(sigmas) - 1) for i, s in enumerate(sigmas)}

        previous = {}

        def denoise(x, sigma: float):
            t, c = self.native(sigma)
            xt = x * c
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            if self_condition:
                given = {**cond, SELF_COND: previous.get("x0", torch.zeros_like(xt))}
            x0_hat = self.to_x0(model_fn(xt, tt, given if self_condition else cond), xt, tt)
            previous["x0"] = x0_hat.to(xt.dtype)
            return x0_hat if x0_hook is None else x0_hook(x0_hat, position.get(float(sigma), 0.0))

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
        self_condition=False,
        **sampler_options,
    ):
        """Draw x0 samples.

        Args:
            model_fn: (xt, t, cond) -> network output, the modality-wrapped backbone.
            shape: shape of x0, batch first. cond: dict of condition tensors (may be empty).
            steps: sampler steps; sampler: a name in SAMPLERS; guidance: classifier-free
                guidance scale (1 = conditional only).
            callback: called as callback(i, x0_preview) at every step.
            x0_hook: (x0_hat, progress) -> corrected x0_hat, applied to the denoiser's estimate at
                every step (progress: the share of the steps done, 0 at pure noise), so a modality
                steers sampling without touching the samplers: holding known values fixed (a given
                first frame, replacement as in RePaint, Lugmayr et al. 2022) or projecting onto
                valid data (the clamping trick of Diffusion-LM, Li et al. 2022, from some progress
                on). Every sampler's last step to sigma = 0 returns the estimate itself, so what the
                hook fixes holds exactly in the output.
            self_condition: for a network trained with self-conditioning (see self_conditioned):
                feed it its previous x0 estimate at every step.
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
        denoise = self.denoiser(guided(model_fn, guidance, cond), cond, x0_hook, sigmas, self_condition)
        return SAMPLERS[sampler](denoise, x, sigmas, generator=generator, callback=hook, **sampler_options)


class GaussianVP(ContinuousProcess):
    """Variance-preserving Gaussian diffusion, x_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1.

    Args:
        schedule: "linear" (the continuous limit of DDPM's linear betas, beta(t) = 0.1 + 19.9 t,
            Song et al. 2021), "cosine" (Nichol & Dhariwal 2021, Eq. 17) or "sqrt"
            (alpha_bar = 1 - sqrt(t + s), Li et al. 2022, Sec. 4.2: noise rises fast at the start,
            where the cosine schedule leaves discrete data such as word embeddings trivially easy).
        prediction: what the network predicts: "eps", "v" (Salimans & Ho 2022) or "x0".
        timesteps, weighting, snr_gamma, stratified: the training density, its stratification per
            batch and the weighting (ContinuousProcess).
        shift: sigma times shift at every t (ContinuousProcess), i.e. SNR / shift^2, folded into
            alpha_bar so that training, sampling and the bound all see the shifted schedule.
    """

    SCHEDULES = ("linear", "cosine", "sqrt")
    PREDICTIONS = ("eps", "v", "x0")
    beta0, beta1, cosine_s, sqrt_s = 0.1, 20.0, 0.008, 1e-4
    min_alpha_bar = 1e-6  # cosine reaches 0 at t = 1; clip so sigma/alpha stays finite

    def __init__(
        self,
        schedule: str = "cosine",
        prediction: str = "v",
        timesteps: str | None = None,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        shift: float = 1.0,
        stratified: bool = False,
    ):
        super().__init__(timesteps, weighting, snr_gamma, shift, stratified)
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
        elif self.schedule == "sqrt":
            ab = 1 - torch.sqrt(t + self.sqrt_s)
        else:
            f = lambda u: torch.cos((u + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
            ab = f(t) / f(torch.zeros_like(t))
        if self.shift != 1:  # SNR / shift^2: ab / (1 - ab) divided by shift^2, solved for ab
            ab = ab / (ab + self.shift**2 * (1 - ab))
        return ab.clamp(min=self.min_alpha_bar)

    def t_of_alpha_bar(self, ab: float) -> float:
        ab = ab * self.shift**2 / (1 - ab + self.shift**2 * ab)  # undo the shift (alpha_bar's last step)
        if self.schedule == "linear":  # solve 0.5 (b1 - b0) t^2 + b0 t + log(ab) = 0
            db = self.beta1 - self.beta0
            return (-self.beta0 + math.sqrt(self.beta0**2 - 2 * db * math.log(ab))) / db
        if self.schedule == "sqrt":
            return min(1.0, max(0.0, (1 - ab) ** 2 - self.sqrt_s))
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

    def loss_and_x0(self, model_fn, x0, cond, generator=None, self_condition=False):
        """MSE on the chosen target (Ho et al. 2020, Eq. 14), t from `timesteps`, weighted by
        `weighting`; with the network's x0 estimate, for objectives that add terms on it.
        self_condition: train the network to take its own estimate too (see self_conditioned)."""
        t = self.draw_t(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        xt, alpha, sigma = self.corrupt(x0, t, eps)
        target = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}[self.prediction]
        if self_condition:
            cond = self.self_conditioned(model_fn, xt, t, cond, generator)
        out = model_fn(xt, t, cond)
        return self.weighted_mse(out, target, t), self.to_x0(out, xt, t)

    def bound(self, model_fn, x0, cond, mc_timesteps: int, generator=None) -> torch.Tensor:
        """The diffusion and prior terms of the variational bound on -log p(x0), in nats per example.

        The continuous-time diffusion loss from t_min to t_max (Kingma et al. 2021, Eq. 17) written in
        lambda = log SNR, where it is 1/2 int exp(lambda) ||x0 - x0_hat(z_lambda)||^2 d lambda, and
        estimated with `mc_timesteps` lambdas uniform on that range: the importance sampling that keeps
        the estimate's variance small (uniform t puts a 1/t-heavy tail near t_min); plus
        KL(q(z_t_max | x0) || N(0, I)). What it leaves out is the decoder term -log p(x0 | z_t_min),
        which depends on what x0 is (text adds its rounding decoder's cross-entropy there).

        Returns:
            (B,) nats summed over each example's elements.
        """
        b, device = x0.shape[0], x0.device
        ends = self.sigma_of_t(torch.tensor([self.t_min, self.t_max], dtype=torch.float64)).pow(-2).log()
        total = torch.zeros(b, dtype=torch.float64, device=device)
        for _ in range(mc_timesteps):
            lam = ends[1] + (ends[0] - ends[1]) * torch.rand(b, generator=generator, device=device).double().cpu()
            t = torch.tensor([self.native(s)[0] for s in torch.exp(-lam / 2).tolist()], device=device)
            eps = torch.randn(x0.shape, generator=generator, device=device)
            xt = self.corrupt(x0, t, eps)[0]
            error = (x0.float() - self.to_x0(model_fn(xt, t, cond), xt, t)).pow(2).flatten(1).sum(1)
            total += 0.5 * (ends[0] - ends[1]) * lam.exp().to(device) * error.double()
        ab1 = self.alpha_bar(torch.tensor(self.t_max, device=device, dtype=torch.float64))
        prior = 0.5 * (ab1 * x0.double().pow(2) + (1 - ab1) - 1 - torch.log(1 - ab1)).flatten(1).sum(1)
        return total / mc_timesteps + prior

    def loss(self, model_fn, x0, cond, generator=None):
        """The training loss of loss_and_x0."""
        return self.loss_and_x0(model_fn, x0, cond, generator)[0]


class RectifiedFlow(ContinuousProcess):
    """Rectified flow / flow matching with the straight path x_t = (1 - t) x0 + t eps and
    velocity target v = eps - x0 (Liu et al. 2023; Lipman et al. 2023).

    Args:
        timesteps, weighting, snr_gamma, stratified: the training density, its stratification per batch
            and the weighting (ContinuousProcess);
            here the density defaults to "logit_normal" (Esser et al. 2024, SD3, m=0, s=1).
        shift: sigma times shift (ContinuousProcess). The path x_t stays as written; the times drawn
            in training and the sampler's times move to t' = shift t / (1 + (shift - 1) t), whose
            sigma = t' / (1 - t') is shift times t's (SD3's timestep shift, Esser et al. 2024, Eq. 23).
    """

    t_max = 0.999  # sigma = t / (1 - t) is infinite at t = 1
    t_min = 0.0
    default_timesteps = "logit_normal"

    def shifted(self, t):
        return self.shift * t / (1 + (self.shift - 1) * t)

    def draw_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        return self.shifted(super().draw_t(n, generator, device))

    def sigmas(self, steps: int) -> torch.Tensor:
        """Uniform in the unshifted time from t_max down to 0, then shifted (SD3's sampling schedule)."""
        return self.sigma_of_t(self.shifted(torch.linspace(self.t_max, 0, steps + 1, dtype=torch.float64)))

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

    def loss_and_x0(self, model_fn, x0, cond, generator=None, self_condition=False):
        """Conditional flow matching: MSE between the predicted and the path velocity, weighted by
        `weighting`; with the network's x0 estimate, for objectives that add terms on it.
        self_condition: train the network to take its own estimate too (see self_conditioned)."""
        t = self.draw_t(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        xt = self.corrupt(x0, t, eps)
        if self_condition:
            cond = self.self_conditioned(model_fn, xt, t, cond, generator)
        out = model_fn(xt, t, cond)
        return self.weighted_mse(out, eps - x0, t), self.to_x0(out, xt, t)

    def loss(self, model_fn, x0, cond, generator=None):
        """The training loss of loss_and_x0."""
        return self.loss_and_x0(model_fn, x0, cond, generator)[0]
