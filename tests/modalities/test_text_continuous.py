"""Continuous text (Diffusion-LM): the rounding decoder, the embedding norm guard, clamping,
infilling, seeded sampling, the likelihood bound, and a checkpoint that samples on its own."""

from __future__ import annotations

import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from diffusion import build_process
from modalities.base import DiffusionConfig
from modalities.text_continuous import DECODES, TextContinuous, TextContinuousConfig
from modalities.text_metrics import real_word_share

ANIMALS, MANNERS, PLACES = ("cat", "dog", "bird"), ("quietly", "happily"), ("mat", "log")
CORPUS = " ".join(f"the {a} {b} sat on the {c}." for a in ANIMALS for b in MANNERS for c in PLACES) + "\n"


def modality_and_model(tmp_path, seq_len=16, seed=0, **keys):
    """A text_continuous modality on a tiny corpus and its randomly initialised tiny model."""
    from tests.conftest import compose_cfg

    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS * 40)
    data = OmegaConf.create({"path": str(path), "bad_threshold": 0.01})
    cfg = OmegaConf.structured(TextContinuousConfig(seq_len=seq_len, embed_dim=8, **keys))
    train_set = TextContinuous(cfg, patch=1, data=data).dataset("train")
    modality = TextContinuous(
        OmegaConf.merge(cfg, {"vocab": train_set.tokenizer.vocab_size, "tokenizer_state": train_set.tokenizer.state()}),
        1,
        data,
    )
    run = compose_cfg(["modality=text_continuous", "backbone=dit_xs", "backbone.hidden_size=64", "backbone.depth=2"])
    torch.manual_seed(seed)
    return modality, modality.build_model(run), train_set


def fit(modality, model, train_set, steps=1000, lr=3e-3):
    """`steps` Adam steps of the modality's own loss; returns the losses."""
    process = build_process("gaussian", modality.cfg.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator, losses = torch.Generator().manual_seed(0), []
    for step in range(steps):
        batch = {"x": torch.stack([train_set[(step * 8 + i) % len(train_set)]["x"] for i in range(8)])}
        loss = modality.loss(process, model, batch, {}, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    modality, model, train_set = modality_and_model(tmp_path_factory.mktemp("ctext"))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fit(modality, model, train_set)
    return modality, model.eval(), train_set, losses, initial


def test_a_tiny_models_loss_falls_clearly(trained):
    losses = trained[3]
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20


def test_the_rounding_decoder_recovers_tokens_from_clean_embeddings(trained):
    modality, model = trained[:2]
    ids = torch.arange(modality.vocab)
    assert torch.equal(model.logits(model.table()).argmax(-1), ids)
    assert torch.equal(model.nearest(model.table()), ids)


def test_the_norm_guard_holds_while_the_embeddings_learn(trained):
    model, initial = trained[1], trained[4]
    assert not torch.allclose(model.embedding.weight, initial["embedding.weight"])  # training moved them
    raw = model.embedding.weight.norm(dim=-1)
    assert not torch.allclose(raw, torch.full_like(raw, math.sqrt(8)), atol=1e-2)  # the raw rows drift...
    norms = model.table().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(8)))  # ...what is diffused does not


def test_clamping_snaps_to_the_token_the_decoding_reads_from_its_share_of_the_steps(trained):
    modality, model = trained[:2]
    x = torch.randn(3, modality.cfg.seq_len, 8, generator=torch.Generator().manual_seed(0))
    x0_hat = modality.model_fn(model)(x, torch.full((3,), 0.7), {})  # leaves its logits for the argmax clamp
    logits = modality.last_call["logits"]
    table = model.table().detach()
    hooks = {how: modality.sample_options(model, clamp=True, clamp_from=0.5, decode=how)["x0_hook"] for how in DECODES}
    assert torch.equal(hooks["argmax"](x0_hat, 0.2), x0_hat)  # before clamp_from: untouched
    by_argmax, by_nearest = hooks["argmax"](x0_hat, 0.5), hooks["nearest"](x0_hat, 0.5)
    assert torch.equal(by_argmax, table[logits.argmax(-1)])  # the decoder's likeliest token
    assert torch.equal(by_nearest, table[model.nearest(x0_hat)])  # Diffusion-LM's nearest embedding
    assert not torch.equal(by_argmax, by_nearest)  # a mean of embeddings is nearest to other tokens
    for clamped in (by_argmax, by_nearest):
        assert (clamped[..., None, :] == table).all(-1).any(-1).all()  # every vector is a row of the table
    assert modality.sample_options(model, clamp=False) == {}
    modality.last_call.clear()
    with pytest.raises(RuntimeError, match="logits of this model_fn call"):
        hooks["argmax"](x0_hat, 0.5)


def sample(modality, model, seed, n=2, steps=10, **request):
    process = build_process("gaussian", modality.cfg.diffusion)
    x0 = process.sample(
        modality.model_fn(model),
        modality.sample_shape(n),
        {},
        steps=steps,
        sampler="ddim",
        generator=torch.Generator().manual_seed(seed),
        **modality.sample_options(model, **request),
    )
    return x0, modality.decode(x0, model, **request)


def test_infilling_puts_the_held_embeddings_back_exactly(trained):
    modality, model = trained[:2]
    x0, texts = sample(modality, model, 0, clamp=False, prompt="the", suffix=".")
    ids = modality.held_tokens("the", ".")[0]
    # the raw vectors, before decoding writes held text in, are the held tokens' own embeddings
    torch.testing.assert_close(x0[:, :3], model.table()[ids[:3]].expand(2, -1, -1), rtol=0, atol=0)
    assert (model.nearest(x0[:, -1]) == ids[-1]).all()
    assert all(t.startswith("the") and t.endswith(".") and len(t) == 16 for t in texts)
    _, filled = sample(modality, model, 0, template="the [3] sat[2]")
    assert all(t.startswith("the ") and t[7:11] == " sat" for t in filled)


def test_sampling_is_deterministic_under_a_seed(trained):
    modality, model = trained[:2]
    a, b, c = (sample(modality, model, seed)[0] for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_turns_samples_into_real_words(tmp_path, trained):
    modality, model, _, _, initial = trained
    fresh = modality_and_model(tmp_path)[1]
    fresh.load_state_dict(initial)
    known = modality.training_words()
    share = [real_word_share(sample(modality, m.eval(), 0, n=16, steps=20)[1], known) for m in (model, fresh)]
    share = [0.0 if math.isnan(s) else s for s in share]  # NaN: not one word of two letters
    assert share[0] > share[1] + 0.15, share


def test_the_bound_falls_with_training(tmp_path, trained):
    modality, model, train_set, _, initial = trained
    process = build_process("gaussian", modality.cfg.diffusion)
    ids = train_set.sequences(0, 8)
    trained_nats = modality.nll(model, process, ids, 4, torch.Generator().manual_seed(0)).mean()
    fresh = modality_and_model(tmp_path)[1]
    fresh.load_state_dict(initial)
    fresh_nats = modality.nll(fresh.eval(), process, ids, 4, torch.Generator().manual_seed(0)).mean()
    assert trained_nats < 0.5 * fresh_nats


def test_bad_requests_and_config_values_are_refused_by_name(trained, tmp_path):
    modality, model = trained[:2]
    with pytest.raises(ValueError, match="decode='round'"):
        modality.sampling(decode="round")
    with pytest.raises(ValueError, match="clamp_from=1.5"):
        modality.sample_options(model, clamp_from=1.5)
    with pytest.raises(ValueError, match="over modality.seq_len=16"):
        modality.held_tokens(template="the cat [20]")
    with pytest.raises(ValueError, match="template= spells the whole sample"):
        modality.held_tokens(prompt="the", template="[3]cat")
    with pytest.raises(ValueError, match="does not diffuse vectors"):
        modality_and_model(tmp_path, process="masked")
    with pytest.raises(ValueError, match="modality.decoder='shared'"):
        modality_and_model(tmp_path, decoder="shared")
    with pytest.raises(ValueError, match="modality.interpolate=true .*prediction=x0, not 'gaussian' and 'eps'"):
        modality_and_model(tmp_path, interpolate=True, diffusion=DiffusionConfig(schedule="sqrt", prediction="eps"))


def test_tied_decoder_decodes_like_the_nearest_embedding(tmp_path):
    modality, model, train_set = modality_and_model(tmp_path, decoder="tied")
    fit(modality, model, train_set, steps=30)
    x = torch.randn(4, 16, 8)
    assert torch.equal(model.logits(x).argmax(-1), model.nearest(x))  # rows of equal norm: same ranking


def test_real_word_share_counts_inner_words_of_two_letters_or_more():
    known = {"the", "cat", "sat"}
    assert real_word_share(["xx the cat qzx sat yy"], known) == pytest.approx(3 / 4)
    assert real_word_share(["a b c"], known) != real_word_share(["a b c"], known)  # no word: NaN


def test_a_checkpoint_alone_samples_and_evaluates(tmp_path, capsys):
    from infer.cli import parse
    from infer.evaluate import EvalArgs, evaluate
    from infer.sample import SampleArgs, sample
    from tests.conftest import TINY_TEXT, compose_cfg
    from train.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 40)
    overrides = [o for o in TINY_TEXT if not o.startswith(("modality=", "sample.sampler"))]
    result = train(
        compose_cfg(
            [
                "modality=text_continuous",
                *overrides,
                "modality.embed_dim=8",
                f"data.path={corpus}",
                f"out_dir={tmp_path}",
                "name=t",
            ]
        )
    )
    ckpt = result.run_dir / "checkpoints" / "last"
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(CORPUS * 3)
    corpus.rename(tmp_path / "away.txt")  # the tokenizer and everything else must come from the checkpoint
    path = sample(parse(SampleArgs, [f"ckpt={ckpt}", "steps=4", "n=2", "prompt=the", "suffix=.", "decode=nearest"]))
    texts = re.split(r"=+ sample \d+ =+\n", open(path, encoding="utf-8").read())[1:]
    assert len(texts) == 2 and all(t.startswith("the") and t.endswith(".\n") and len(t) == 33 for t in texts)
    with pytest.raises(SystemExit, match="first_frame= does not apply"):
        sample(parse(SampleArgs, [f"ckpt={ckpt}", "first_frame=x.png"]))
    with pytest.raises(FileNotFoundError, match="real-word share needs the training text"):
        evaluate(parse(EvalArgs, [f"ckpt={ckpt}", "n=2", "steps=4", "mc_timesteps=2", f"data.path={heldout}"]))
    (tmp_path / "away.txt").rename(corpus)
    metrics = evaluate(
        parse(
            EvalArgs,
            [
                f"ckpt={ckpt}",
                "n=2",
                "steps=4",
                "mc_timesteps=2",
                f"data.path={heldout}",
                f"out={tmp_path / 'eval.json'}",
            ],
        )
    )
    assert metrics["bits_per_char"] > 0 and 0 <= metrics["rounding_changed_share"] <= 1
    assert {"noclamp_argmax_real_word_share", "clamp_nearest_sample_unigram_entropy_bits"} <= metrics.keys()


def test_the_default_x0_estimate_is_the_embeddings_mean_under_the_decoder(trained):
    modality, model = trained[:2]
    assert modality.cfg.interpolate  # score interpolation is the default
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    seen = {}
    x0_hat = modality.model_fn(model, seen)(x, torch.ones(2), {})
    weights = seen["logits"].softmax(-1)
    torch.testing.assert_close(x0_hat, weights @ model.table())  # the estimate is the embeddings' mean
    assert (x0_hat.norm(dim=-1) <= math.sqrt(8) + 1e-4).all()  # ...so inside their hull, never beyond


def test_regressed_x0_trains_and_samples_words(tmp_path):
    modality, model, train_set = modality_and_model(tmp_path, interpolate=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fit(modality, model, train_set)
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    t = torch.ones(2)
    raw = modality.from_tokens(model.eval().dit(*modality.to_tokens(x), t), x.shape)
    assert torch.equal(modality.model_fn(model)(x, t, {}), raw)  # the DiT's own vector, not interpolated
    hook = modality.sample_options(model, clamp=True, decode="argmax")["x0_hook"]
    assert torch.equal(hook(raw, 0.0), model.table()[model.logits(raw).argmax(-1)])  # its decoder's likeliest token
    fresh = modality_and_model(tmp_path, interpolate=False)[1]
    fresh.load_state_dict(initial)
    known = modality.training_words()
    share = [real_word_share(sample(modality, m.eval(), 0, n=16, steps=20)[1], known) for m in (model, fresh)]
    share = [0.0 if math.isnan(s) else s for s in share]
    assert share[0] > share[1] + 0.15, share


def test_runs_saved_before_score_interpolation_load_as_they_were_trained(tmp_path):
    from tests.conftest import compose_cfg
    from train.config import load_run_config

    cfg = OmegaConf.to_container(compose_cfg(["modality=text_continuous"]))
    OmegaConf.save(cfg, tmp_path / "today.yaml")
    del cfg["modality"]["interpolate"]  # what a run saved before the key existed holds
    OmegaConf.save(cfg, tmp_path / "older.yaml")
    assert load_run_config(tmp_path / "today.yaml").modality.interpolate is True
    assert load_run_config(tmp_path / "older.yaml").modality.interpolate is False
