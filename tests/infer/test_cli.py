"""Sampling values on the command line: each bad one is refused naming the key and its valid range,
none is silently changed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from diffusion import build_process
from infer.cli import parse, sampling_plan
from infer.evaluate import EvalArgs, default_out
from infer.sample import SampleArgs
from modalities.image import Image, ImageConfig
from modalities.text_discrete import TextDiscrete, TextDiscreteConfig

RUN = OmegaConf.create({"sample": {"steps": 50, "sampler": None, "guidance": 3.0}})  # a run's sample settings


def image(conditional=True):
    cfg = OmegaConf.merge(OmegaConf.structured(ImageConfig), {"size": 8, "classes": ["a", "b"]})
    cfg.conditional = conditional
    return Image(cfg, patch=2), build_process("gaussian", cfg.diffusion)


def text():
    cfg = OmegaConf.structured(TextDiscreteConfig(seq_len=8, vocab=5))
    return TextDiscrete(cfg, patch=1), build_process("masked", cfg.diffusion, vocab_size=5, mask_id=5)


def plan(argv, model=None, schema=SampleArgs):
    modality, process = model or image()
    return sampling_plan(parse(schema, ["ckpt=c", *argv]), RUN, modality, process, "cpu")


@pytest.mark.parametrize(
    "arg, told",
    [
        ("steps=0", "steps must be at least 1"),
        ("n=0", "n must be at least 1"),
        ("batch=0", "batch must be at least 1"),
        ("guidance=-1", r"guidance must be >= 0 \(0: unconditional, 1: no guidance"),
        ("eta=5", r"eta must be in 0..1"),
        ("eta=-0.1", r"eta must be in 0..1"),
        ("block=0", "block must be at least 1 token"),
        ("temperature=0", "temperature must be above 0"),
        ("top_k=0", "top_k must be at least 1"),
        ("top_p=1.5", r"top_p must be in \(0, 1\]"),
    ],
)
def test_out_of_range_sampling_values_are_refused(arg, told):
    with pytest.raises(SystemExit, match=rf"^{arg}.* is out of range: {told}"):
        plan([arg])


def test_evaluation_checks_the_same_ranges():
    with pytest.raises(SystemExit, match="mc_timesteps=0 is out of range"):
        plan(["mc_timesteps=0"], schema=EvalArgs)
    with pytest.raises(SystemExit, match="n=0 is out of range"):
        plan(["n=0"], schema=EvalArgs)


def test_valid_values_are_applied_as_given():
    assert plan(["steps=1", "guidance=0"]) == (1, "dpmpp_2m", 0.0)  # 0: unconditional sampling
    assert plan(["eta=1", "sampler=ddim"]) == (50, "ddim", 3.0)  # the run's steps and guidance
    assert plan(["steps=7", "guidance=4.5"]) == (7, "dpmpp_2m", 4.5)


def test_guidance_on_an_unconditional_model_is_refused_not_dropped():
    for model in (text(), image(conditional=False)):
        with pytest.raises(SystemExit, match="guidance=3 needs a conditional model; this .* model takes no condition"):
            plan(["guidance=3"], model)
        assert plan([], model)[2] == 1.0  # the run's own guidance setting has nothing to act on
        assert plan(["guidance=1"], model)[2] == 1.0


def test_evaluations_under_other_settings_keep_their_own_files():
    def out(argv):
        args = parse(EvalArgs, ["ckpt=runs/r/checkpoints/last", *argv])
        steps, sampler, guidance = sampling_plan(args, RUN, *image(), "cpu")
        return default_out(OmegaConf.merge(args, {"steps": steps, "sampler": sampler, "guidance": guidance}))

    assert out([]).as_posix() == "runs/r/checkpoints/last/eval-dpmpp_2m-50-g3-n1000-seed0.json"  # the run's plan
    names = {out(argv) for argv in ([], ["guidance=2"], ["guidance=2.5"], ["seed=1"], ["n=500"], ["steps=10"])}
    assert len(names) == 6
