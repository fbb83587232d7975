"""Samplers for discrete token processes, as pure functions.

Masked-diffusion samplers share one interface:

    denoise(x, rows=None) -> probs     x: (B, N) ids with [MASK] at unknown positions;
                                       probs: (B, N, V) p(x0 | x) over the V data tokens;
                                       rows: which sequences of the batch x holds (None: all),
                                       so that per-sequence conditions follow them

and only ever replace [MASK] tokens, so a token that is known (a prompt, or one unmasked
earlier) never changes. ``callback(i, x0_hat)`` sees, at every step, the current sequence with
each [MASK] replaced by its most likely token.

`token_probs` turns network logits into those distributions (temperature, top-k, top-p);
`categorical` draws from them with an explicit generator, so a seed fixes every sample.
"""

from __future__ import annotations

import torch


def token_probs(
    logits, vocab_size: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Network logits -> per-token distributions over the data vocabulary.

    Args:
        logits: (B, N, C) with C >= vocab_size; columns past vocab_size (the [MASK] / start id)
            are dropped, which is MDLM's zero-masking of the [MASK] logit (Sahoo et al. 2024, Sec. 3.2.3).
        temperature: divides the logits (< 1 sharper). top_k: keep the k most likely tokens.
        top_p: nucleus sampling, keep the smallest set with mass >= top_p (Holtzman et al. 2020).
    Returns:
        (B, N, vocab_size) probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    logits = logits[..., :vocab_size].float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1")
        kth = logits.topk(min(top_k, vocab_size), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return logits.softmax(-1)


def categorical(probs, generator=None) -> torch.Tensor:
    """Draw one token per position. probs: (B, N, V) -> (B, N) ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def _preview(x, probs, mask_id):
    return torch.where(x == mask_id, probs.argmax(-1), x)


CACHES = ("row", "batch", "off")


def evaluate_rows(denoise, x, rows, rows_per_call: int) -> torch.Tensor:
    """p(x0 | x) of the sequences x[rows], in network calls of exactly `rows_per_call` rows (the last
    call padded by repeating its last row, the padding's output dropped).

    Why fixed-size calls: matrix kernels (MKL, oneDNN, cuBLAS) choose their blocking, and so the
    order of their sums, by the shape of the call, so a row evaluated in a batch of 3 can differ in
    its last bits from the same row in a batch of 32; with every call the same shape, a row's output
    depends on that row alone, and evaluating fewer rows cannot change a sample.

    Args:
        x: (B, N) ids. rows: (R,) indices into x. Returns: (R, N, V).
    """
    out = []
    for start in range(0, len(rows), rows_per_call):
        part = rows[start : start + rows_per_call]
        idx = torch.cat([part, part[-1:].expand(rows_per_call - len(part))])
        out.append(denoise(x[idx], idx)[: len(part)])
    return torch.cat(out)


@torch.no_grad()
def sample_ancestral(
    denoise, x, alphas, *, mask_id: int, generator=None, callback=None, cache: str = "row", rows_per_call: int = 8
):
    """Exact reverse steps of the masked process (MDLM's SUBS reverse step, Sahoo et al. 2024): from t to
    s < t each [MASK] becomes a token drawn from p(x0 | xt) with probability (alpha_s - alpha_t) /
    (1 - alpha_t), and stays masked otherwise; known tokens are carried over.

    Most steps unmask nothing in a given sequence when steps exceed its length, and then p(x0 | x)
    of that sequence is unchanged: `denoise` depends on x alone. The cache (MDLM's cached sampler,
    Sahoo et al. 2024, Sec. 4.2, here per sequence) re-evaluates the network only where it must:

    - "row": only the sequences with a token unmasked since their last evaluation;
    - "batch": every sequence, but only when some sequence of the batch changed (MDLM's form);
    - "off": every sequence at every step.

    All three draw the same random numbers and give identical samples: the random draws cover the
    whole batch at every step whatever was evaluated, and the network always sees calls of
    min(rows_per_call, B) rows (see `evaluate_rows`).

    Args:
        x: (B, N) start, [MASK] wherever the sample is unknown.
        alphas: (steps + 1,) alpha_t on the time grid from t = 1 down to t = 0 (alpha = 1).
        denoise: denoise(x_rows, rows) -> p(x0 | x_rows), (R, N, V), rows indexing the batch.
        rows_per_call: sequences per network call.
    """
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}; choose one of {CACHES}")
    if rows_per_call < 1:
        raise ValueError(f"rows_per_call={rows_per_call} must be at least 1")
    rows_per_call = min(rows_per_call, x.shape[0])
    everyone = torch.arange(x.shape[0], device=x.device)
    probs, stale = None, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(len(alphas) - 1):
        if cache == "off" or (cache == "batch" and stale.any()):
            stale[:] = True
        if stale.any():
            rows = everyone[stale]
            fresh = evaluate_rows(denoise, x, rows, rows_per_call)
            probs = fresh if probs is None else probs.index_copy(0, rows, fresh)
        if callback is not None:
            callback(i, _preview(x, probs, mask_id))
        masked = x == mask_id
        p_unmask = (alphas[i + 1] - alphas[i]) / (1 - alphas[i])
        unmask = masked & (torch.rand(x.shape, generator=generator, device=x.device) < p_unmask)
        x = torch.where(unmask, categorical(probs, generator), x)
        stale = unmask.any(-1)
    return x


def unmask_most_confident(x, probs, allowed, k, *, mask_id: int, generator=None):
    """One step of low-confidence remasking: draw x0 ~ probs at every [MASK] in `allowed` and keep
    the k[b] draws of row b with the highest probability; the others stay masked.

    Args:
        x: (B, N) ids. probs: (B, N, V). allowed: (B, N) or (N,) bool, positions open this step.
        k: (B,) tokens to unmask per row.
    Returns:
        (B, N) ids.
    """
    candidates = (x == mask_id) & allowed
    draw = categorical(probs, generator)
    confidence = probs.gather(-1, draw[..., None])[..., 0].masked_fill(~candidates, -1.0)
    rank = confidence.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = most confident
    return torch.where(candidates & (rank < k[:, None]), draw, x)


@torch.no_grad()
def sample_confidence(denoise, x, alphas, *, mask_id: int, generator=None, callback=None):
    """Confidence-ordered unmasking (MaskGIT's iterative decoding, Chang et al. 2022, Sec. 3.2; LLaDA's
    low-confidence remasking, Nie et al. 2025): every step predicts all masked tokens and keeps the
    most confident ones. The count still masked after step i follows the process's schedule,
    round(m_0 (1 - alpha_{i+1}) / (1 - alpha_0)) for m_0 masked at the start, so a cosine schedule
    gives MaskGIT's cosine order; every token is known after exactly len(alphas) - 1 steps, one
    network call each.

    Args:
        x: (B, N) start, [MASK] wherever the sample is unknown.
        alphas: (steps + 1,) alpha_t on the time grid from t = 1 down to t = 0.
    """
    start = (x == mask_id).sum(-1)  # (B,)
    everywhere = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    for i in range(len(alphas) - 1):
        probs = denoise(x)
        if callback is not None:
            callback(i, _preview(x, probs, mask_id))
        still_masked = torch.round(start * (1 - alphas[i + 1]) / (1 - alphas[0])).long()
        k = (x == mask_id).sum(-1) - still_masked
        x = unmask_most_confident(x, probs, everywhere, k, mask_id=mask_id, generator=generator)
    return x


@torch.no_grad()
def sample_blocks(denoise, x, steps: int, *, block: int, mask_id: int, generator=None, callback=None):
    """Semi-autoregressive sampling (LLaDA's semi-autoregressive remasking, Nie et al. 2025): blocks
    of `block` tokens left to right, each filled in parallel by confidence-ordered unmasking while
    later blocks stay masked. The steps are shared out evenly (the first blocks take the remainder) and each
    block's tokens are spread evenly over its steps: `steps` network calls in all.

    Args:
        x: (B, N) start, [MASK] wherever the sample is unknown. steps: total steps, at least one
            per block.
    """
    n = x.shape[-1]
    n_blocks = -(-n // block)
    if steps < n_blocks:
        raise ValueError(
            f"steps={steps} is fewer than the {n_blocks} blocks of block={block} tokens; "
            f"use steps>={n_blocks} or a larger block"
        )
    positions = torch.arange(n, device=x.device)
    i = 0
    for b in range(n_blocks):
        allowed = (positions >= b * block) & (positions < (b + 1) * block)
        block_steps = steps // n_blocks + (b < steps % n_blocks)
        for j in range(block_steps):
            probs = denoise(x)
            if callback is not None:
                callback(i, _preview(x, probs, mask_id))
            masked = ((x == mask_id) & allowed).sum(-1)
            k = -(-masked // (block_steps - j))  # ceil: the block is complete after its last step
            x = unmask_most_confident(x, probs, allowed, k, mask_id=mask_id, generator=generator)
            i += 1
    return x


@torch.no_grad()
def sample_uniform(denoise, x, ts, alphas, keep, *, generator=None, callback=None):
    """Ancestral sampling of uniform-noise diffusion with D3PM's x0-parameterization (Austin et al.
    2021, Eq. 4: p(z_s | z_t) ∝ sum_x0 q(z_t | z_s) q(z_s | x0) x0_hat(x0)), which for uniform noise is

        p(z_s | z_t) ∝ [alpha_{t|s} z_t + (1 - alpha_{t|s}) / V] * [alpha_s x0_hat + (1 - alpha_s) / V],

    alpha_{t|s} = alpha_t / alpha_s, elementwise over the V tokens. Tokens in `keep` (a prompt)
    are put back after every step.

    Args:
        denoise: (x, t) -> (B, N, V) x0_hat, with t (B,).
        x: (B, N) start: uniform random tokens, prompt tokens where `keep`.
        ts, alphas: (steps + 1,) the time grid from t = 1 to t = 0 and alpha_t on it.
        keep: (B, N) bool.
    """
    held = x
    for i in range(len(ts) - 1):
        x0_hat = denoise(x, ts[i].expand(x.shape[0]))
        if callback is not None:
            callback(i, torch.where(keep, held, x0_hat.argmax(-1)))
        v = x0_hat.shape[-1]
        alpha_ts = alphas[i] / alphas[i + 1]
        from_zt = alpha_ts * torch.nn.functional.one_hot(x, v) + (1 - alpha_ts) / v
        posterior = from_zt * (alphas[i + 1] * x0_hat + (1 - alphas[i + 1]) / v)  # (B, N, V)
        x = torch.where(keep, held, categorical(posterior / posterior.sum(-1, keepdim=True), generator))
    return x


@torch.no_grad()
def sample_autoregressive(next_token, x, keep, *, bos_id: int, generator=None, callback=None):
    """Left-to-right ancestral sampling of p(x) = prod_i p(x_i | x_<i); tokens in `keep` (a prompt,
    or held positions for infilling) are taken as given instead of drawn.

    Args:
        next_token: (inputs (B, N)) -> (B, N, V) distributions, position i predicting token i
            from inputs up to i (causal); inputs are x shifted right behind a start token.
        x: (B, N) prompt tokens where `keep`, anything elsewhere. keep: (B, N) bool.
    """
    inputs = torch.full_like(x, bos_id)
    for i in range(x.shape[-1]):
        probs = next_token(inputs)
        token = torch.where(keep[:, i], x[:, i], categorical(probs[:, i : i + 1], generator)[:, 0])
        x = x.clone()
        x[:, i] = token
        if callback is not None:
            callback(i, torch.cat([x[:, : i + 1], probs[:, i + 1 :].argmax(-1)], dim=1))
        if i + 1 < x.shape[-1]:
            inputs[:, i + 1] = token
    return x
