"""Discrete token processes: masked (absorbing) diffusion, uniform-noise diffusion and the
autoregressive baseline they are measured against.

Data are token ids x0 (B, N) over V data tokens. The network sees ids, possibly including one
extra id outside the vocabulary ([MASK] for masked diffusion, the start token for the
autoregressive baseline) and returns logits (B, N, C), C >= V; columns past V are never
predicted. ``model_fn(xt, t, cond)`` is the modality-wrapped backbone, t (B,) in [0, 1].

Every process has `loss` (a training objective), `nll` (a likelihood bound in nats per token for
evaluation) and `sample`. Text models here are unconditional: with an empty `cond`, classifier-free
guidance is a no-op; with conditions it mixes logits (diffusion/guidance.py).
"""

from __future__ import annotations

import math

import torch

from diffusion.discrete_samplers import (
    sample_ancestral,
    sample_autoregressive,
    sample_blocks,
    sample_confidence,
    sample_uniform,
    token_probs,
)
from diffusion.guidance import guided


class LinearSchedule:
    """alpha_t = 1 - t: the share of tokens still clean at time t."""

    def alpha(self, t):
        return 1 - t

    def dalpha(self, t):
        return -torch.ones_like(t)

    def t_of_alpha(self, alpha):
        return 1 - alpha


class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t, MDLM's log-linear noise sigma(t) = -log(1 - (1 - eps) t), alpha = e^-sigma:
    a share eps of tokens is still clean at t = 1."""

    eps = 1e-3

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1 - self.eps))

    def t_of_alpha(self, alpha):
        return ((1 - alpha) / (1 - self.eps)).clamp(0, 1)


class CosineSchedule:
    """alpha_t = 1 - sin(pi t / 2), i.e. a masked share cos(pi (1 - t) / 2): MaskGIT's cosine mask
    schedule (Chang et al. 2022) in continuous time (MD4, Shi et al. 2024)."""

    def alpha(self, t):
        return 1 - torch.sin(math.pi / 2 * t)

    def dalpha(self, t):
        return -math.pi / 2 * torch.cos(math.pi / 2 * t)

    def t_of_alpha(self, alpha):
        return torch.asin((1 - alpha).clamp(0, 1)) * 2 / math.pi


SCHEDULES = {"linear": LinearSchedule, "loglinear": LogLinearSchedule, "cosine": CosineSchedule}


def antithetic_t(n: int, generator, device) -> torch.Tensor:
    """n times in [0, 1), evenly spread from one uniform draw: t_i = (u + i / n) mod 1, the
    low-discrepancy sampler of VDM (Kingma et al. 2021) that MDLM trains with. Returns (n,)."""
    u = torch.rand(1, generator=generator, device=device)
    return (u + torch.arange(n, device=device) / n) % 1


def noised(x0, alpha, generator) -> torch.Tensor:
    """Which tokens the forward process touches: each independently w.p. 1 - alpha_t.
    x0: (B, N); alpha: (B,). Returns (B, N) bool."""
    return torch.rand(x0.shape, generator=generator, device=x0.device) < 1 - alpha[:, None]


def token_nll(logits, x0, vocab_size: int) -> torch.Tensor:
    """-log p(x0) per position from logits (B, N, C) over the V data tokens. Returns (B, N)."""
    logp = logits[..., :vocab_size].float().log_softmax(-1)
    return -logp.gather(-1, x0[..., None])[..., 0]


def check_sampler(sampler: str, valid: tuple, process: str):
    if sampler not in valid:
        raise ValueError(
            f"sampler={sampler!r} does not apply to {process}; choose one of {list(valid)} "
            f"(e.g. sample.sampler={valid[0]} in training)"
        )


def start_tokens(shape, device, fill, fixed, fixed_mask):
    """The sampler's start: `fill` (B, N) everywhere except the held tokens.

    Args:
        fixed: (N,) or (B, N) ids held fixed where fixed_mask; None: nothing held.
    Returns:
        x (B, N) ids and keep (B, N) bool.
    """
    if fixed is None:
        return fill, torch.zeros(shape, dtype=torch.bool, device=device)
    fixed = fixed.to(device).expand(shape)
    keep = fixed_mask.to(device).expand(shape)
    return torch.where(keep, fixed, fill), keep


def time_grid(schedule, steps: int, device):
    """(ts, alphas): steps + 1 times from 1 down to 0 and alpha_t on them, each (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    ts = torch.linspace(1, 0, steps + 1, device=device)
    return ts, schedule.alpha(ts)


def make_schedule(name: str, process: str):
    if name not in SCHEDULES:
        raise ValueError(f"diffusion.schedule={name!r} for {process}; choose one of {list(SCHEDULES)}")
    return SCHEDULES[name]()


class TokenProcess:
    """What every token process exposes to the modality and the entry points."""

    causal = False  # True: the backbone must attend only to earlier tokens
    samplers: tuple = ("ancestral",)  # valid `sampler` names, the first the default

    def sample_steps(self, steps: int, shape) -> int:
        """The steps `sample` takes when asked for `steps` on (B, N) tokens."""
        return steps

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


class MaskedDiffusion(TokenProcess):
    """Masked (absorbing-state) diffusion with MDLM's SUBS parameterization (Sahoo et al. 2024).

    q(xt | x0): each token independently stays x0 with probability alpha_t, else becomes [MASK].
    SUBS: the denoiser never predicts [MASK] (its logit is -inf: the column is dropped) and known
    tokens are carried over, so only masked positions enter the loss and samplers never change a
    known token. Continuous-time ELBO (Eq. 10-11), normalised per token:

        NLL <= E_t [ w(t) / N * sum_{i: xt_i = [MASK]} -log p(x0_i | xt) ] + KL(q(x1 | x0) || p(x1)),
        w(t) = -alpha'_t / (1 - alpha_t).

    Args:
        vocab_size: V data tokens. mask_id: the [MASK] id, outside the data vocabulary (>= V).
        schedule: "linear", "loglinear" (MDLM's default) or "cosine".
    """

    samplers = ("ancestral", "confidence", "blocks")
    t_min = 1e-3  # training draws t in [t_min, 1]: w(t) ~ 1/t makes the smallest times too noisy (MDLM)

    def __init__(self, vocab_size: int, mask_id: int, schedule: str = "loglinear"):
        super().__init__(vocab_size)
        self.schedule = make_schedule(schedule, "masked diffusion")
        if mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is a data token; [MASK] must be >= vocab_size={vocab_size}")
        self.mask_id = mask_id

    def corrupt(self, x0, t, generator=None):
        """q(xt | x0), MDLM's q_xt: x0 (B, N), t (B,) -> xt (B, N), each token masked w.p. 1 - alpha_t."""
        return torch.where(noised(x0, self.schedule.alpha(t), generator), self.mask_id, x0)

    def elbo_term(self, model_fn, x0, xt, t, cond) -> torch.Tensor:
        """The integrand of the ELBO at one draw (Eq. 11): w(t) / N * sum over masked positions of
        -log p(x0 | xt). x0, xt: (B, N); t: (B,). Returns (B,) nats per token."""
        w = -self.schedule.dalpha(t) / (1 - self.schedule.alpha(t))
        masked = xt == self.mask_id
        nll = token_nll(model_fn(xt, t, cond), x0, self.vocab_size).masked_fill(~masked, 0)
        return w * nll.sum(-1) / x0.shape[1]

    def loss(self, model_fn, x0, cond, generator=None):
        """MDLM's training loss: the ELBO integrand at antithetic t in [t_min, 1], averaged over the batch."""
        t = self.t_min + (1 - self.t_min) * antithetic_t(x0.shape[0], generator, x0.device)
        return self.elbo_term(model_fn, x0, self.corrupt(x0, t, generator), t, cond).mean()

    def prior_kl(self) -> float:
        """KL(q(x1 | x0) || p(x1)) per token. With alpha_1 > 0 (log-linear) a share alpha_1 of tokens is
        still clean at t = 1; p(x1) charges them as uniform draws: alpha_1 log V (0 when alpha_1 = 0).
        The samplers start from all [MASK], which differs from this p(x1) by that share alone."""
        alpha1 = float(self.schedule.alpha(torch.ones(())))
        return alpha1 * math.log(self.vocab_size)

    @torch.no_grad()
    def nll(self, model_fn, x0, cond, mc_timesteps: int = 32, generator=None) -> torch.Tensor:
        """The ELBO above, in nats per token, for each sequence: (B,).

        The time integral takes mc_timesteps stratified times t_j = (j + u) / K per sequence. At
        each, one uniformly chosen position is always masked and the others with probability 1 - alpha_t;
        importance-weighting that proposal against q turns the integrand into
        -alpha'_t * mean_{masked i} -log p(x0_i | xt), an unbiased estimate with no 1/t weight, so
        small t cost no variance and need no cut-off.
        """
        b, n = x0.shape
        u = torch.rand(b, generator=generator, device=x0.device)
        total = torch.zeros(b, device=x0.device)
        for j in range(mc_timesteps):
            t = (j + u) / mc_timesteps
            masked = noised(x0, self.schedule.alpha(t), generator)
            forced = torch.randint(n, (b, 1), generator=generator, device=x0.device)
            masked = masked.scatter(1, forced, True)
            xt = torch.where(masked, self.mask_id, x0)
            nll = token_nll(model_fn(xt, t, cond), x0, self.vocab_size).masked_fill(~masked, 0)
            total += -self.schedule.dalpha(t) * nll.sum(-1) / masked.sum(-1)
        return total / mc_timesteps + self.prior_kl()

    def denoiser(self, model_fn, cond, temperature, top_k, top_p):
        """x -> p(x0 | x), (B, N, V). The network is given the time whose expected masked share is
        the observed one, t = alpha^-1(1 - masked share) per row, so the output depends on x alone
        (which makes the ancestral sampler's cache exact)."""

        def denoise(x, rows=None):
            t = self.schedule.t_of_alpha(1 - (x == self.mask_id).float().mean(-1))
            c = cond if rows is None else {k: v[rows] for k, v in cond.items()}
            return token_probs(model_fn(x, t, c), self.vocab_size, temperature, top_k, top_p)

        return denoise

    @torch.no_grad()
    def sample(
        self,
        model_fn,
        shape,
        cond,
        steps=64,
        sampler="ancestral",
        guidance=1.0,
        generator=None,
        device="cpu",
        callback=None,
        temperature=1.0,
        top_k=None,
        top_p=None,
        block=None,
        fixed=None,
        fixed_mask=None,
        cache=None,
        rows_per_call=None,
    ):
        """Draw token ids, starting from all [MASK] except the `fixed` tokens.

        Args:
            shape: (B, N). cond: condition tensors (empty for unconditional text).
            sampler: "ancestral", "confidence" or "blocks" (discrete_samplers.py); block: block length
                for "blocks" (default: N / 4).
            fixed, fixed_mask: (N,) or (B, N) ids and bool, tokens held from the start (prompts, infilling).
            temperature, top_k, top_p: applied to every per-token distribution.
            callback: callback(i, x0_hat) at every step.
            cache, rows_per_call: the ancestral sampler's network cache ("row", "batch" or "off"; all
                give the same samples) and sequences per network call (see sample_ancestral);
                None: its defaults.
        Returns:
            (B, N) ids in [0, V).
        """
        check_sampler(sampler, self.samplers, "masked diffusion")
        cache_options = {k: v for k, v in {"cache": cache, "rows_per_call": rows_per_call}.items() if v is not None}
        if sampler != "ancestral" and cache_options:
            raise ValueError(f"cache= and rows_per_call= apply to the ancestral sampler, not {sampler}")
        denoise = self.denoiser(guided(model_fn, guidance, cond), cond, temperature, top_k, top_p)
        x, _ = start_tokens(shape, device, torch.full(shape, self.mask_id, device=device), fixed, fixed_mask)
        options = dict(mask_id=self.mask_id, generator=generator, callback=callback)
        if sampler == "blocks":
            return sample_blocks(denoise, x, steps, block=block or max(1, shape[1] // 4), **options)
        alphas = time_grid(self.schedule, steps, device)[1]
        if sampler == "ancestral":
            return sample_ancestral(denoise, x, alphas, **cache_options, **options)
        return sample_confidence(denoise, x, alphas, **options)


class UniformDiffusion(TokenProcess):
    """Uniform-noise diffusion in continuous time (D3PM's uniform transitions, Austin et al. 2021;
    UDLM, Schiff et al. 2024): q(zt | x0) = Cat(alpha_t x0 + (1 - alpha_t) / V), i.e. each token
    jumps to a uniformly random token at rate beta_t = -alpha'_t / alpha_t.

    ELBO: the diffusion-weighted denoising score entropy bound of SEDD (Lou et al. 2024) with the
    ratios s parameterized through the denoiser's x0_hat as in UDLM; per token, with z = zt,
    xbar = V alpha_t x0 + (1 - alpha_t) and xbar_theta = V alpha_t x0_hat + (1 - alpha_t) over the V tokens,

        NLL <= int_0^1 E_q [ (-alpha'_t / (V alpha_t)) sum_y r_y g(s_y / r_y) ] dt + KL(q(z1 | x0) || U),
        r_y = xbar_y / xbar_z,  s_y = xbar_theta_y / xbar_theta_z,  g(u) = u - 1 - log u >= 0,

    which is UDLM's continuous-time bound (Schiff et al. 2024, "Simple Guidance Mechanisms for
    Discrete Diffusion Models": alpha'_t / (V alpha_t) [V / xbar_z - V / xbar_theta_z - sum_y r_y
    log(r_y / s_y)]) rewritten, and zero for a perfect denoiser. Evaluated in a cancellation-free
    form (see `elbo_term`).

    Args:
        vocab_size: V data tokens. schedule: "linear", "loglinear" or "cosine".
    """

    def __init__(self, vocab_size: int, schedule: str = "loglinear"):
        super().__init__(vocab_size)
        self.schedule = make_schedule(schedule, "uniform diffusion")

    def corrupt(self, x0, t, generator=None):
        """q(zt | x0): x0 (B, N), t (B,) -> zt (B, N), each token redrawn uniformly w.p. 1 - alpha_t."""
        noise = torch.randint(self.vocab_size, x0.shape, generator=generator, device=x0.device)
        return torch.where(noised(x0, self.schedule.alpha(t), generator), noise, x0)

    def elbo_term(self, model_fn, x0, zt, t, cond) -> torch.Tensor:
        """The ELBO integrand at one draw, (B,) nats per token. With a = V x0_hat - 1, b = V x0 - 1,

            s_y / r_y - 1 = [alpha ((a-b)_y - (a-b)_z) + alpha^2 (a_y b_z - a_z b_y)] / (xbar_theta_z xbar_y),

        which stays accurate as alpha -> 0, where the integrand vanishes like alpha."""
        v = self.vocab_size
        alpha = self.schedule.alpha(t)[:, None, None]
        x0_hat = model_fn(zt, t, cond)[..., :v].float().softmax(-1)  # (B, N, V)
        a, b = v * x0_hat - 1, v * torch.nn.functional.one_hot(x0, v).float() - 1
        a_z, b_z = a.gather(-1, zt[..., None]), b.gather(-1, zt[..., None])  # (B, N, 1)
        # xbar_y -> 0 as alpha -> 1 for y != x0; the term r g(s / r) -> s stays finite, so keep xbar_y > 0
        xbar, xbar_theta_z = (1 + alpha * b).clamp_min(1e-20), 1 + alpha * a_z
        delta = (alpha * ((a - b) - (a_z - b_z)) + alpha**2 * (a * b_z - a_z * b)) / (xbar_theta_z * xbar)
        r = xbar / (1 + alpha * b_z)
        g = delta - torch.log1p(delta)
        # at alpha = 0 the sum is 0 and beta_t infinite: the integrand's limit is 0
        weight = -self.schedule.dalpha(t) / (v * self.schedule.alpha(t).clamp_min(1e-12))
        return weight * (r * g).sum(-1).mean(-1)

    def loss(self, model_fn, x0, cond, generator=None):
        """The ELBO integrand at antithetic t in [0, 1), averaged over the batch."""
        t = antithetic_t(x0.shape[0], generator, x0.device)
        return self.elbo_term(model_fn, x0, self.corrupt(x0, t, generator), t, cond).mean()

    def prior_kl(self) -> float:
        """KL(q(z1 | x0) || uniform) per token: 0 when alpha_1 = 0."""
        v, alpha1 = self.vocab_size, float(self.schedule.alpha(torch.ones(())))
        p_x0, p_other = alpha1 + (1 - alpha1) / v, (1 - alpha1) / v
        return p_x0 * math.log(v * p_x0) + (v - 1) * p_other * math.log(v * p_other) if alpha1 > 0 else 0.0

    @torch.no_grad()
    def nll(self, model_fn, x0, cond, mc_timesteps: int = 32, generator=None) -> torch.Tensor:
        """The ELBO above in nats per token for each sequence, (B,), from mc_timesteps stratified
        times t_j = (j + u) / K per sequence.

        Near t = 0 a token that left x0 (probability pi_t = (1 - alpha_t)(V - 1) / V) contributes
        ~1 / t: a heavy tail that plain draws from q under-sample. Defensive importance sampling
        (Hesterberg 1995) bounds it: half the sequences get one uniformly chosen position moved off
        x0, the proposal is q(zt) (1 + |E| / (N pi_t)) / 2 with |E| the positions off x0, and each
        draw is weighted by q / proposal <= 2.
        """
        b, n = x0.shape
        rows = torch.arange(b, device=x0.device)
        u = torch.rand(b, generator=generator, device=x0.device)
        total = torch.zeros(b, device=x0.device)
        for j in range(mc_timesteps):
            t = (j + u) / mc_timesteps
            zt = self.corrupt(x0, t, generator)
            forced = torch.rand(b, generator=generator, device=x0.device) < 0.5
            pos = torch.randint(n, (b,), generator=generator, device=x0.device)
            shift = torch.randint(1, self.vocab_size, (b,), generator=generator, device=x0.device)
            off_x0 = (x0[rows, pos] + shift) % self.vocab_size  # uniform over the other V - 1 tokens
            zt[rows, pos] = torch.where(forced, off_x0, zt[rows, pos])
            pi = ((1 - self.schedule.alpha(t)) * (self.vocab_size - 1) / self.vocab_size).clamp_min(1e-30)
            weight = 2 / (1 + (zt != x0).sum(-1) / (n * pi))
            total += weight * self.elbo_term(model_fn, x0, zt, t, cond)
        return total / mc_timesteps + self.prior_kl()

    @torch.no_grad()
    def sample(
        self,
        model_fn,
        shape,
        cond,
        steps=64,
        sampler="ancestral",
        guidance=1.0,
        generator=None,
        device="cpu",
        callback=None,
        temperature=1.0,
        top_k=None,
        top_p=None,
        fixed=None,
        fixed_mask=None,
    ):
        """Draw token ids from uniform noise by ancestral sampling; arguments as MaskedDiffusion.sample.
        Held `fixed` tokens are put back after every step. Returns (B, N) ids."""
        check_sampler(sampler, self.samplers, "uniform diffusion")
        model_fn = guided(model_fn, guidance, cond)

        def denoise(x, t):
            return token_probs(model_fn(x, t, cond), self.vocab_size, temperature, top_k, top_p)

        noise = torch.randint(self.vocab_size, shape, generator=generator, device=device)
        x, keep = start_tokens(shape, device, noise, fixed, fixed_mask)
        ts, alphas = time_grid(self.schedule, steps, device)
        return sample_uniform(denoise, x, ts, alphas, keep, generator=generator, callback=callback)


class Autoregressive(TokenProcess):
    """The next-token baseline, p(x) = prod_i p(x_i | x_<i), trained by cross-entropy with the same
    backbone made causal. The input is x0 shifted right behind a start token `bos_id`, so every
    position, the first included, is predicted; t is always 0. `nll` is exact.

    Args:
        vocab_size: V data tokens. bos_id: the start token, outside the data vocabulary (>= V).
    """

    causal = True

    def __init__(self, vocab_size: int, bos_id: int):
        if bos_id < vocab_size:
            raise ValueError(f"bos_id={bos_id} is a data token; the start token must be >= {vocab_size}")
        super().__init__(vocab_size)
        self.bos_id = bos_id

    def sample_steps(self, steps: int, shape) -> int:
        """Left to right: one step per token, whatever `steps` says."""
        return shape[-1]

    def logits(self, model_fn, x0, cond):
        """(B, N, C): position i predicts x0_i from x0_<i."""
        inputs = torch.cat([torch.full_like(x0[:, :1], self.bos_id), x0[:, :-1]], dim=1)
        return model_fn(inputs, torch.zeros(x0.shape[0], device=x0.device), cond)

    def loss(self, model_fn, x0, cond, generator=None):
        """Next-token cross-entropy, nats per token."""
        return token_nll(self.logits(model_fn, x0, cond), x0, self.vocab_size).mean()

    @torch.no_grad()
    def nll(self, model_fn, x0, cond, mc_timesteps: int = 32, generator=None) -> torch.Tensor:
        """Exact -log p(x0) in nats per token, (B,); mc_timesteps and generator are not needed."""
        return token_nll(self.logits(model_fn, x0, cond), x0, self.vocab_size).mean(-1)

    @torch.no_grad()
    def sample(
        self,
        model_fn,
        shape,
        cond,
        steps=None,
        sampler="ancestral",
        guidance=1.0,
        generator=None,
        device="cpu",
        callback=None,
        temperature=1.0,
        top_k=None,
        top_p=None,
        fixed=None,
        fixed_mask=None,
    ):
        """Left to right, one network call per token: N steps whatever `steps` says. Other arguments as
        MaskedDiffusion.sample; `fixed` tokens are taken as given at their positions. Returns (B, N) ids."""
        check_sampler(sampler, self.samplers, "the autoregressive baseline")
        model_fn = guided(model_fn, guidance, cond)
        t = torch.zeros(shape[0], device=device)

        def next_token(inputs):
            return token_probs(model_fn(inputs, t, cond), self.vocab_size, temperature, top_k, top_p)

        blank = torch.zeros(shape, dtype=torch.long, device=device)
        x, keep = start_tokens(shape, device, blank, fixed, fixed_mask)
        return sample_autoregressive(next_token, x, keep, bos_id=self.bos_id, generator=generator, callback=callback)
