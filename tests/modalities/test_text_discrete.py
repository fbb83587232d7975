"""Discrete text: token processes (masked, uniform, autoregressive), their samplers, the text data
pipeline and the text_discrete modality, end to end through the trainer and the sampler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from backbones.dit import DiT
from diffusion import build_process
from diffusion.discrete import Autoregressive, MaskedDiffusion, UniformDiffusion
from diffusion.discrete_samplers import token_probs
from modalities.text_data import ByteTokenizer, HFTokenizer, load_tokenizer, read_corpus
from modalities.text_discrete import TextDiscrete, TextDiscreteConfig
from modalities.text_metrics import generative_perplexity, unigram_entropy

V, N = 7, 12
ANIMALS, MANNERS, PLACES = ("cat", "dog", "bird"), ("quietly", "happily"), ("mat", "log")
CORPUS = " ".join(f"the {a} {b} sat on the {c}." for a in ANIMALS for b in MANNERS for c in PLACES) + "\n"


def cross_entropy(logits, x0, reduction="mean"):
    """-log softmax(logits[:V])[x0] for logits (1, N, V + 1) shared by every row of x0 (B, N)."""
    return F.cross_entropy(logits[0, :, :V].expand(len(x0), -1, -1).transpose(1, 2), x0, reduction=reduction)


def fixed_logits_model(logits):
    """A model_fn whose logits ignore xt and t: the exact ELBO is known in closed form."""
    return lambda xt, t, cond: logits.expand(xt.shape[0], -1, -1)


def text_modality(tmp_path, process="masked", seq_len=32, schedule="loglinear", **keys):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS * 40)
    cfg = OmegaConf.structured(TextDiscreteConfig(process=process, seq_len=seq_len, **keys))
    cfg.diffusion.schedule = schedule
    modality = TextDiscrete(cfg, patch=1, data=OmegaConf.create({"path": str(path), "bad_threshold": 0.01}))
    train_set = modality.dataset("train")
    cfg = OmegaConf.merge(cfg, modality.resolve(train_set))
    return TextDiscrete(cfg, patch=1, data=OmegaConf.create({"path": str(path), "bad_threshold": 0.01})), train_set


def tiny_dit(modality, seed=0):
    torch.manual_seed(seed)
    return DiT(hidden_size=64, depth=2, num_heads=4, **modality.backbone_kwargs())


# --- processes --------------------------------------------------------------------------------


def test_masking_keeps_text_at_t0_and_masks_all_at_t1():
    x0 = torch.randint(V, (4, 64))
    process = MaskedDiffusion(V, V, "linear")
    assert torch.equal(process.corrupt(x0, torch.full((4,), 1e-7)), x0)
    assert (process.corrupt(x0, torch.ones(4)) == V).all()
    loglinear = MaskedDiffusion(V, V, "loglinear")  # keeps a share eps = 1e-3 clean at t = 1
    assert (loglinear.corrupt(x0, torch.ones(4)) == V).float().mean() > 0.98
    uniform = UniformDiffusion(V, "linear")
    assert torch.equal(uniform.corrupt(x0, torch.full((4,), 1e-7)), x0)


def test_subs_loss_matches_hand_computation():
    logits = torch.randn(1, 3, V + 1)
    logits[..., V] = 50.0  # SUBS: the [MASK] logit never counts, however large
    x0 = torch.tensor([[1, 4, 6]])
    xt = torch.tensor([[1, V, V]])  # the last two positions masked
    t = torch.tensor([0.25])
    model = fixed_logits_model(logits)
    logp = [
        logits[0, i, x0[0, i]].item() - math.log(sum(math.exp(v) for v in logits[0, i, :V].tolist())) for i in (1, 2)
    ]
    for schedule, w in (("linear", 1 / 0.25), ("loglinear", 1 / 0.25), ("cosine", None)):
        if w is None:  # w = -alpha' / (1 - alpha) with alpha = 1 - sin(pi t / 2)
            w = math.pi / 2 * math.cos(math.pi / 8) / math.sin(math.pi / 8)
        process = MaskedDiffusion(V, V, schedule)
        expected = w * -(logp[0] + logp[1]) / 3  # normalised per token, over all 3 positions
        assert process.elbo_term(model, x0, xt, t, {}).item() == pytest.approx(expected, rel=1e-5)

    # loss() is that term at its own draws of t and xt
    process, x0 = MaskedDiffusion(V, V, "loglinear"), torch.randint(V, (5, 3))
    generator = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    u = torch.rand(1, generator=replay)
    t = process.t_min + (1 - process.t_min) * ((u + torch.arange(5) / 5) % 1)
    xt = process.corrupt(x0, t, replay)
    expected = process.elbo_term(model, x0, xt, t, {}).mean()
    assert process.loss(model, x0, {}, generator=generator).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_masked_elbo_of_a_context_free_model(schedule):
    # For p(x0_i | xt) that ignores xt, the ELBO is (1 - alpha_1) * mean(-log p) + alpha_1 log V.
    torch.manual_seed(0)
    logits = torch.randn(1, N, V + 1)
    x0 = torch.randint(V, (128, N))
    process, model = MaskedDiffusion(V, V, schedule), fixed_logits_model(logits)
    alpha1 = float(process.schedule.alpha(torch.ones(())))
    exact = (1 - alpha1) * cross_entropy(logits, x0) + alpha1 * math.log(V)
    nll = process.nll(model, x0, {}, mc_timesteps=32, generator=torch.Generator().manual_seed(0)).mean()
    assert nll.item() == pytest.approx(exact.item(), rel=0.02)
    generator = torch.Generator().manual_seed(0)
    loss = torch.stack([process.loss(model, x0, {}, generator=generator) for _ in range(50)]).mean()
    assert loss.item() == pytest.approx(exact.item(), rel=0.03)


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_uniform_elbo(schedule):
    process = UniformDiffusion(V, schedule)
    x0 = torch.randint(V, (256, N), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    # a perfect denoiser pays only the prior term
    perfect = lambda zt, t, cond: 50 * F.one_hot(x0[: zt.shape[0]], V + 1).float()
    assert process.nll(perfect, x0, {}, 8, g).mean().item() == pytest.approx(process.prior_kl(), abs=1e-5)
    # an uninformative denoiser leaves the uniform prior in place: NLL = log V, and the bound is tight
    flat = lambda zt, t, cond: torch.zeros(zt.shape[0], N, V + 1)
    assert process.nll(flat, x0, {}, 32, g).mean().item() == pytest.approx(math.log(V), abs=0.04)


def test_uniform_elbo_term_equals_udlm_form():
    """The cancellation-free integrand equals UDLM's written form
    alpha' / (V alpha) [V / xbar_z - V / xbar_theta_z - sum_y r_y log(r_y / s_y)] where both are accurate."""
    process, logits = UniformDiffusion(V, "linear"), torch.randn(1, N, V + 1)
    x0 = torch.randint(V, (64, N))
    t = torch.rand(64) * 0.9 + 0.05
    zt = process.corrupt(x0, t)
    alpha = (1 - t)[:, None, None]
    xbar = V * alpha * F.one_hot(x0, V) + 1 - alpha
    xbar_theta = V * alpha * logits[..., :V].softmax(-1) + 1 - alpha
    xz, xtz = xbar.gather(-1, zt[..., None]), xbar_theta.gather(-1, zt[..., None])
    r, s = xbar / xz, xbar_theta / xtz
    udlm = (-1 / (V * alpha)) * (V / xz - V / xtz - (r * (r / s).log()).sum(-1, keepdim=True))
    ours = process.elbo_term(fixed_logits_model(logits), x0, zt, t, {})
    torch.testing.assert_close(ours, udlm[..., 0].mean(-1), rtol=1e-4, atol=1e-5)


def test_autoregressive_nll_is_exact_cross_entropy():
    logits = torch.randn(1, N, V + 1)
    x0 = torch.randint(V, (3, N))
    process = Autoregressive(V, V)
    seen = []
    model = lambda inputs, t, cond: (seen.append(inputs), logits.expand(inputs.shape[0], -1, -1))[1]
    torch.testing.assert_close(process.nll(model, x0, {}), cross_entropy(logits, x0, "none").mean(-1))
    assert (seen[0][:, 0] == V).all() and torch.equal(seen[0][:, 1:], x0[:, :-1])  # behind the start token


def test_token_probs_filters():
    logits = torch.tensor([[[1.0, 3.0, 2.0, 0.0, 9.0]]])  # the last column is [MASK]
    assert torch.equal(token_probs(logits, 4, top_k=1), torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]))
    top2 = token_probs(logits, 4, top_k=2)
    assert (top2[..., [0, 3]] == 0).all() and top2.sum().item() == pytest.approx(1.0)
    assert token_probs(logits, 4, top_p=0.5)[0, 0, 1] == 1.0  # the top token alone holds >= 50%
    sharp, flat = token_probs(logits, 4, temperature=0.1), token_probs(logits, 4, temperature=10.0)
    assert sharp.max() > 0.99 and flat.max() < 0.4


# --- samplers ---------------------------------------------------------------------------------


class Spy:
    """Wraps a model_fn and records every input it is called with."""

    def __init__(self, model_fn):
        self.model_fn, self.inputs = model_fn, []

    def __call__(self, xt, t, cond):
        self.inputs.append(xt.clone())
        return self.model_fn(xt, t, cond)


@pytest.fixture
def random_model():
    torch.manual_seed(0)
    logits = torch.randn(1, 32, V + 1) * 2
    return lambda xt, t, cond: logits.expand(xt.shape[0], -1, -1) + 0.5 * torch.randn(xt.shape[0], 32, V + 1)


def prompt(n_fixed, length=32):
    fixed = torch.zeros(length, dtype=torch.long)
    fixed[:n_fixed] = torch.arange(n_fixed) % V
    return {"fixed": fixed, "fixed_mask": torch.arange(length) < n_fixed}


def test_ancestral_never_changes_a_known_token_and_caches(random_model):
    spy, process = Spy(random_model), MaskedDiffusion(V, V, "loglinear")
    generator = torch.Generator().manual_seed(0)
    x = process.sample(spy, (3, 32), {}, steps=500, sampler="ancestral", generator=generator, cache="off", **prompt(5))
    assert (x < V).all() and (x[:, :5] == torch.arange(5)).all()
    steps = spy.inputs + [x]
    for before, after in zip(steps, steps[1:]):
        known = before != V
        assert torch.equal(after[known], before[known])
    spy = Spy(random_model)
    process.sample(spy, (3, 32), {}, steps=500, sampler="ancestral", generator=generator, **prompt(5))
    assert len(spy.inputs) <= 3 * 27 + 1 < 500  # a network call only after some token of a sequence was unmasked


@pytest.mark.parametrize("sampler", ["confidence", "blocks"])
def test_confidence_and_block_samplers_finish_in_steps(random_model, sampler):
    spy, process = Spy(random_model), MaskedDiffusion(V, V, "linear")
    previews, generator = [], torch.Generator().manual_seed(0)
    x = process.sample(
        spy,
        (2, 32),
        {},
        steps=8,
        sampler=sampler,
        block=8,
        generator=generator,
        callback=lambda i, x0_hat: previews.append(i),
        **prompt(3),
    )
    assert len(spy.inputs) == 8 and previews == list(range(8))
    assert (x < V).all() and (x[:, :3] == torch.arange(3)).all()
    masked = [(xt == V).sum().item() for xt in spy.inputs]
    assert masked == sorted(masked, reverse=True) and masked[0] == 2 * 29
    if sampler == "blocks":  # two steps per block of 8, left to right
        third_call = spy.inputs[2]
        assert (third_call[:, :8] != V).all() and (third_call[:, 8:] == V).all()


def test_discrete_processes_reject_continuous_samplers(random_model):
    with pytest.raises(ValueError, match="ancestral"):
        MaskedDiffusion(V, V).sample(random_model, (1, 32), {}, steps=4, sampler="dpmpp_2m")


def test_uniform_and_autoregressive_sampling_hold_the_prompt(random_model):
    generator = torch.Generator().manual_seed(0)
    x = UniformDiffusion(V, "linear").sample(random_model, (2, 32), {}, steps=6, generator=generator, **prompt(4))
    assert x.shape == (2, 32) and (x < V).all() and (x[:, :4] == torch.arange(4)).all()
    spy = Spy(random_model)
    x = Autoregressive(V, V).sample(spy, (2, 32), {}, generator=generator, top_k=3, **prompt(4))
    assert (x < V).all() and (x[:, :4] == torch.arange(4)).all() and len(spy.inputs) == 32


# --- training and evaluation ------------------------------------------------------------------


@pytest.mark.parametrize("process_name", ["masked", "uniform", "autoregressive"])
def test_training_lowers_the_bound(tmp_path, process_name):
    modality, train_set = text_modality(tmp_path, process_name, seq_len=32)
    assert modality.vocab <= 70
    assert modality.backbone_kwargs()["causal"] == (process_name == "autoregressive")
    process = build_process(process_name, modality.cfg.diffusion, **modality.process_kwargs())
    model = tiny_dit(modality)
    model_fn = modality.model_fn(model)
    heldout = modality.dataset("test").sequences(0, 4)

    def bound():
        return process.nll(model_fn, heldout, {}, 8, torch.Generator().manual_seed(0)).mean().item()

    before = bound()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    batches = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True)
    step = 0
    while step < 150:
        for batch in batches:
            loss = process.loss(model_fn, modality.encode(batch), {}, generator=generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    after = bound()
    # below the characters' own entropy: the model has learnt context, not just letter frequencies
    unigram_nats = unigram_entropy(train_set.ids, modality.vocab) * math.log(2)
    assert after < unigram_nats - 0.4 < before, (before, after, unigram_nats)


def test_evaluation_is_reproducible(tmp_path):
    modality, _ = text_modality(tmp_path, "masked", seq_len=16)
    model = tiny_dit(modality).eval()
    process = build_process("masked", modality.cfg.diffusion, **modality.process_kwargs())
    args = OmegaConf.create(
        {
            "data": {"path": None},
            "reference": None,
            "mc_timesteps": 4,
            "seed": 0,
            "batch": 64,
            "n": 4,
            "steps": 4,
            "sampler": "confidence",
            "guidance": 1.0,
        }
    )
    first, second = (modality.evaluate(model, process, args, torch.device("cpu")) for _ in range(2))
    assert first == second
    assert first["bits_per_char"] == pytest.approx(first["bits_per_token"])  # one character per token
    # untrained, the bound is near the uniform log V (plus a little for the log-linear prior term)
    assert first["nll_nats_per_token"] == pytest.approx(math.log(modality.vocab), rel=0.15)
    assert 0 < first["sample_unigram_entropy_bits"] <= math.log2(modality.vocab)


# --- tokenizers and data ----------------------------------------------------------------------


def test_tokenizers_round_trip(tmp_path):
    text = 'Déjà vu: the naïve café ☕ re-opened.\n\tTabs, "quotes" and 123!'
    corpus = [CORPUS, text]
    modality, _ = text_modality(tmp_path, tokenizer="char")
    restored = load_tokenizer("char", modality.cfg.tokenizer_state)
    assert restored.decode(restored.encode(CORPUS)) == CORPUS
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        restored.encode("☕")
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    bpe = HFTokenizer.train_bpe(corpus, 300)
    assert bpe.vocab_size <= 300 and len(bpe.encode(CORPUS)) < len(CORPUS) / 2  # merges were learnt
    for tokenizer in (bpe, load_tokenizer("bpe", bpe.state())):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer).save_pretrained(tmp_path / "pretrained")
    pretrained = load_tokenizer(str(tmp_path / "pretrained"), None)
    assert pretrained.encode(text) == bpe.encode(text) and pretrained.decode(pretrained.encode(text)) == text


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (b"caf\xe9 au lait", "not UTF-8"),
    ],
)
def test_unreadable_text_files_are_named(tmp_path, content, reason):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as error:
        read_corpus(str(bad))
    assert str(bad) in str(error.value)
    (tmp_path / "good.txt").write_text(CORPUS)
    with pytest.raises(ValueError, match="1 of 2 text files") as error:  # 50% bad: too many to skip
        read_corpus(str(tmp_path))
    assert str(bad) in str(error.value)
    for i in range(150):
        (tmp_path / f"more_{i}.txt").write_text(CORPUS)
    with pytest.warns(UserWarning, match="bad.txt"):  # under 1% bad: skipped and reported
        texts, skipped = read_corpus(str(tmp_path))
    assert len(texts) == 151 and len(skipped) == 1 and str(bad) in skipped[0]


def test_the_runs_bad_threshold_governs_the_text_folder(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    for i in range(3):
        (tmp_path / f"good_{i}.txt").write_text(CORPUS * 10)
    cfg = OmegaConf.structured(TextDiscreteConfig(seq_len=16))
    strict = TextDiscrete(cfg, patch=1, data=OmegaConf.create({"path": str(tmp_path), "bad_threshold": 0.01}))
    with pytest.raises(ValueError, match=r"data.bad_threshold=0.01"):
        strict.dataset("train")
    lenient = TextDiscrete(cfg, patch=1, data=OmegaConf.create({"path": str(tmp_path), "bad_threshold": 0.5}))
    with pytest.warns(UserWarning, match="bad.txt"):
        chunks = lenient.dataset("train")
    assert len(chunks) > 0 and len(chunks.skipped) == 1


def test_jsonl_corpus_and_its_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    assert read_corpus(str(good))[0] == ["first doc", "second doc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=f"{bad}:2"):
        read_corpus(str(bad))


def test_a_bad_jsonl_line_is_skipped_and_counted_under_the_threshold(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = [f'{{"text": "doc {i}"}}' for i in range(150)]
    corpus.write_text("\n".join(lines[:70] + ["{not json"] + lines[70:]) + "\n")
    cfg = OmegaConf.structured(TextDiscreteConfig(seq_len=16))
    modality = TextDiscrete(cfg, patch=1, data=OmegaConf.create({"path": str(corpus), "bad_threshold": 0.01}))
    with pytest.warns(UserWarning, match=f"{corpus}:71: not JSON"):
        chunks = modality.dataset("train")
    assert chunks.skipped == [f"{corpus}:71: not JSON (Expecting property name enclosed in double quotes)"]
    assert "doc 149" in modality.tokenizer.decode(modality.dataset("test").ids.tolist())  # the rest was read
    corpus.write_text('{"text": "ok"}\n{"body": 1}\n{"text": 2}\n')  # 2 of 3 bad: over the threshold
    with pytest.raises(ValueError, match=rf"2 of 3 lines of {corpus} cannot be read .*data.bad_threshold=0.01") as e:
        read_corpus(str(corpus))
    assert f"{corpus}:2" in str(e.value) and f"{corpus}:3" in str(e.value)


def test_byte_order_mark_and_cr_line_ends_are_read_as_universal_newlines(tmp_path):
    text = b"\xef\xbb\xbfFirst line\rsecond line\r\nthird line\n"
    (tmp_path / "old.txt").write_bytes(text)
    assert read_corpus(str(tmp_path / "old.txt"))[0] == ["First line\nsecond line\nthird line\n"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_bytes(text)
    assert read_corpus(str(tmp_path / "folder"))[0] == ["First line\nsecond line\nthird line\n"]
    (tmp_path / "old.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a\\rb\\r\\nc"}\r{"text": "d"}\r')
    assert read_corpus(str(tmp_path / "old.jsonl"))[0] == ["a\nb\nc", "d"]
    modality, train_set = text_modality(tmp_path)
    (tmp_path / "corpus.txt").write_bytes(text + text[3:] * 20)  # one BOM, at the start
    modality.tokenizer = None
    vocabulary = modality.dataset("train").tokenizer.chars
    assert "\ufeff" not in vocabulary and "\r" not in vocabulary and "\n" in vocabulary


def test_text_modality_needs_a_token_process():
    with pytest.raises(ValueError, match="autoregressive"):
        TextDiscrete(OmegaConf.structured(TextDiscreteConfig(process="gaussian")), patch=1)


# --- end to end -------------------------------------------------------------------------------


def test_trainer_then_sampler_and_evaluator(tmp_path, capsys, text_run):
    from infer.cli import parse
    from infer.evaluate import EvalArgs, evaluate
    from infer.sample import SampleArgs, sample
    from train.checkpoint import load_model
    from train.config import load_run_config

    result = text_run()
    assert result.step == 20 and (result.run_dir / "samples" / "step_00000020.txt").exists()
    ckpt = result.run_dir / "checkpoints" / "last"
    saved = load_run_config(ckpt / "config.yaml")
    assert saved.modality.vocab > 50 and saved.modality.tokenizer_state  # the tokenizer travels with the run

    path = sample(parse(SampleArgs, [f"ckpt={ckpt}", "sampler=confidence", "steps=8", "n=2", "prompt=the"]))
    samples = open(path, encoding="utf-8").read().split("\n", 1)[1]
    assert path.endswith(".txt") and samples.startswith("the") and "sample 1" in samples

    heldout = tmp_path / "heldout.txt"
    heldout.write_text(CORPUS * 3)
    metrics = evaluate(
        parse(
            EvalArgs,
            [
                f"ckpt={ckpt}",
                "n=2",
                "steps=4",
                "sampler=blocks",
                "mc_timesteps=2",
                f"data.path={heldout}",
                f"reference={ckpt}",
                f"out={tmp_path / 'eval.json'}",
            ],
        )
    )
    assert metrics["generative_perplexity"] > 1  # infer/ loaded the reference and handed it over
    assert metrics["bits_per_char"] > 0 and metrics["heldout_tokens"] == 32 * (len(CORPUS) * 3 // 32)
    texts = ["the cat sat", "on the mat and the dog sat on the log"]
    args = OmegaConf.create({"seed": 0, "batch": 8, "mc_timesteps": 2})
    reference = load_model(ckpt, "cpu")
    assert generative_perplexity(texts, reference, args, torch.device("cpu")) > 1


def test_autoregressive_sampling_reports_one_step_per_token(tmp_path, capsys, text_run):
    from infer.cli import parse
    from infer.sample import SampleArgs, sample

    result = text_run("modality.process=autoregressive")
    ckpt = result.run_dir / "checkpoints" / "last"
    path = sample(parse(SampleArgs, [f"ckpt={ckpt}", "steps=3", "n=2", "prompt=the", "preview=true"]))
    out = capsys.readouterr().out
    # `steps` has no say left to right: 32 tokens take 32 network calls, and the previews span them all
    assert "32 steps" in out and "x0 previews at steps [0, 4, 9, 13, 18, 22, 27, 31]" in out
    assert open(path, encoding="utf-8").read().split("\n", 1)[1].startswith("the")


@pytest.fixture
def text_dit():
    """A randomly initialised tiny DiT for text: its output depends on its input alone."""
    from modalities import build_modality
    from tests.conftest import TINY_TEXT, compose_cfg

    cfg = compose_cfg([*TINY_TEXT, f"modality.vocab={V}"])
    modality = build_modality(cfg.modality, cfg.backbone.patch, cfg.data)
    torch.manual_seed(0)
    model = modality.build_model(cfg).eval()
    for p in model.parameters():  # adaLN-Zero starts as the identity: give every layer a say
        torch.nn.init.normal_(p, std=0.2)
    return modality.model_fn(model)


def counting(model_fn):
    def call(xt, t, cond):
        call.rows += xt.shape[0]
        call.calls += 1
        return model_fn(xt, t, cond)

    call.rows = call.calls = 0
    return call


def test_per_sequence_cache_gives_the_uncached_samples_with_fewer_evaluations(text_dit):
    process = MaskedDiffusion(V, V, "loglinear")
    samples, rows, calls = {}, {}, {}
    for cache in ("off", "batch", "row"):
        fn = counting(text_dit)
        generator = torch.Generator().manual_seed(3)
        samples[cache] = process.sample(
            fn, (10, 32), {}, steps=200, generator=generator, cache=cache, rows_per_call=4, **prompt(6)
        )
        rows[cache], calls[cache] = fn.rows, fn.calls
    assert torch.equal(samples["row"], samples["off"]) and torch.equal(samples["batch"], samples["off"])
    assert (samples["row"][:, :6] == torch.arange(6)).all() and (samples["row"] < V).all()
    # 10 sequences x 200 steps, in calls of 4 (10 rows padded to 12); each sequence has 26 tokens to
    # unmask, so it is evaluated at most 27 times, plus at most 3 padding rows a call
    assert rows["off"] == 200 * 12
    assert rows["row"] - 3 * calls["row"] <= 10 * 27
    assert rows["row"] < rows["batch"] / 2 and rows["batch"] < rows["off"]


def test_a_rows_network_output_does_not_depend_on_its_call_mates(text_dit):
    from diffusion.discrete_samplers import evaluate_rows

    process = MaskedDiffusion(V, V, "loglinear")
    denoise = process.denoiser(text_dit, {}, 1.0, None, None)
    x = torch.randint(V + 1, (9, 32), generator=torch.Generator().manual_seed(0))
    everyone = evaluate_rows(denoise, x, torch.arange(9), 4)
    alone = evaluate_rows(denoise, x, torch.tensor([7, 2]), 4)
    assert torch.equal(alone, everyone[[7, 2]])


def test_bad_cache_options_are_refused(text_dit):
    process = MaskedDiffusion(V, V, "loglinear")
    with pytest.raises(ValueError, match="cache='rows'"):
        process.sample(text_dit, (2, 32), {}, steps=4, cache="rows")
    with pytest.raises(ValueError, match="rows_per_call=0"):
        process.sample(text_dit, (2, 32), {}, steps=4, rows_per_call=0)
    with pytest.raises(ValueError, match="apply to the ancestral sampler, not confidence"):
        process.sample(text_dit, (2, 32), {}, steps=4, sampler="confidence", cache="off")


def test_masked_model_fills_a_template_and_keeps_prompt_and_suffix(tmp_path):
    modality, _ = text_modality(tmp_path, seq_len=16)
    model_fn = modality.model_fn(tiny_dit(modality).eval())
    process = build_process("masked", modality.cfg.diffusion, **modality.process_kwargs())
    for request, check in (
        ({"prompt": "the", "suffix": "."}, lambda t: t.startswith("the") and t.endswith(".")),
        ({"template": "the [4] sat[3]."}, lambda t: t.startswith("the ") and t[8:12] == " sat" and t[15] == "."),
    ):
        ids = process.sample(
            model_fn,
            (3, 16),
            {},
            steps=4,
            generator=torch.Generator().manual_seed(0),
            **modality.sample_options(**request),
        )
        texts = modality.decode(ids)
        assert all(check(t) and len(t) == 16 for t in texts), texts
    fixed, held = modality.held_tokens(template="the [4] sat[3].")
    assert held.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 3 + [True]
    assert modality.strings(fixed[None])[0][8:12] == " sat"


def test_the_autoregressive_baseline_refuses_a_suffix(tmp_path):
    modality, _ = text_modality(tmp_path, process="autoregressive")
    assert modality.sample_options(prompt="the")["fixed_mask"].sum() == 3
    with pytest.raises(ValueError, match="continues a prefix"):
        modality.sample_options(prompt="the", suffix=".")
