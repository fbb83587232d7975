import os
from pathlib import Path

import pytest
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from modalities import MODALITIES, build_modality
from train.config import CONFIG_DIR, validate

GROUP_NAMES = ("modality", "backbone", "optim", "recipe")
GROUPS = {g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml")) for g in GROUP_NAMES}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)
    assert group == "recipe" or cfg[group] is not None  # a recipe sets keys of the other groups


def test_the_cpu_quick_recipe_sets_its_keys_and_the_command_line_wins():
    cfg = compose_cfg(["recipe=cpu_quick"])  # its backbone replaces train.yaml's dit_s
    shape = (cfg.backbone.name, cfg.backbone.depth, cfg.backbone.hidden_size, cfg.backbone.patch)
    assert cfg.modality.name == "image" and cfg.modality.size == 24 and shape == ("dit_xs", 4, 64, 2)
    assert cfg.modality.diffusion.prediction == "x0" and cfg.optim.lr == 2e-3 and cfg.max_minutes == 4.5
    assert compose_cfg([]).get("max_minutes") is None  # no recipe: train.yaml's defaults
    cfg = compose_cfg(["recipe=cpu_quick", "batch_size=16", "max_minutes=1"])
    assert cfg.batch_size == 16 and cfg.max_minutes == 1


def test_every_modality_has_a_config_file():
    assert set(MODALITIES) <= set(GROUPS["modality"])


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="batchsize"):
        compose_cfg(["batchsize=8"])
    with pytest.raises(ConfigCompositionException, match="modality.sise"):
        compose_cfg(["modality.sise=8"])


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException, match="dit_xs"):
        compose_cfg(["backbone=dit_q"])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError), match="steps"):
        compose_cfg(["steps=many"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("mixed_precision=fp8", r"mixed_precision='fp8' is not valid; choose one of \['no', 'bf16', 'fp16'\]"),
        ("attention=flash9", "attention='flash9'"),
        ("modality.process=ddx", "modality.process='ddx'"),
        ("batch_size=0", "batch_size=0 must be at least 1"),
        ("data.bad_threshold=2", "data.bad_threshold=2"),
        ("max_minutes=0", r"max_minutes=0(\.0)? must be positive"),
        ("modality.head_channels=-4", r"modality.head_channels=-4 must be 0 \(no head\) or positive"),
        (
            "backbone.layout=diagonal",
            r"backbone.layout='diagonal' is not valid; choose one of \['full', 'factorized'\]",
        ),
        (
            "modality=text_discrete backbone.layout=factorized",
            "modality text_discrete has a 1-D grid; use backbone.layout=full",
        ),
        ("coarse_share=1", r"coarse_share=1(\.0)? must be in \[0, 1\)"),
        (
            "modality=text_discrete coarse_share=0.3",
            r"modality text_discrete has no coarse form to start on \(modalities with one: \['image'\]\)",
        ),
    ],
)
def test_bad_values_fail_with_the_choices(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_cfg(override.split()))


def test_patch_must_divide_the_image():
    cfg = compose_cfg(["modality.size=30", "backbone.patch=4"])
    with pytest.raises(
        ValueError, match=r"backbone.patch=4 does not divide modality.size=30; use backbone.patch in \[1, 2\]"
    ):
        build_modality(cfg.modality, cfg.backbone.patch).check(cfg.backbone)


def test_configs_hold_no_machine_paths():
    for root, _, files in os.walk(CONFIG_DIR):
        for name in files:
            text = Path(root, name).read_text()
            assert "/work/" not in text and "/home/" not in text and "../shared" not in text, name


def test_the_learning_rate_follows_the_backbone_preset_unless_set():
    import torch

    from train.train import make_optimizer

    model = torch.nn.Linear(2, 2)
    for overrides, lr in (
        (["backbone=dit_xs"], 1e-3),
        (["backbone=dit_cpu"], 2e-3),
        (["backbone=dit_xl"], 1e-4),
        (["backbone=dit_xs", "optim.lr=3e-4"], 3e-4),
        (["backbone=dit_xl", "backbone.lr=2e-4"], 2e-4),
    ):
        optimizer, scheduler = make_optimizer(compose_cfg(overrides), model, torch.device("cpu"))
        assert optimizer.param_groups[0]["initial_lr"] == lr, overrides
        assert scheduler.get_last_lr()[0] == pytest.approx(lr / 100)  # step 0 of the 100-step warm-up


def test_adamw_is_fused_on_a_cpu_unless_switched_off():
    """optim.fused (on by default) gives torch's one-kernel AdamW on a CPU too, and its steps equal the
    loop implementation's (to float rounding); optim.fused=false gives the loop."""
    import torch

    from train.train import make_optimizer

    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        start = model.weight.detach().clone()
        cfg = compose_cfg([f"optim.fused={fused}", "optim.lr=1e-2"])
        optimizer, _ = make_optimizer(cfg, model, torch.device("cpu"))
        assert bool(optimizer.defaults["fused"]) is fused
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[fused] = model.weight.detach().clone()
        assert (results[fused] - start).abs().max() > 1e-4  # five warm-up steps at 1e-4 moved it
    torch.testing.assert_close(results[True], results[False])


def test_positions_follow_the_modality_unless_set(tiny_cfg, text_run):
    """backbone.pos=null (every preset) means the modality's choice: absolute sincos positions for
    images, rotary ones for the rest; the run's config.yaml records what the model was built with,
    and the checkpoint loads back with it."""
    from omegaconf import OmegaConf

    from train.checkpoint import load_model
    from train.train import train

    image = train(tiny_cfg("steps=2", "sample.every=0"))
    text = text_run("steps=2", "sample.every=0")
    pinned = train(tiny_cfg("steps=2", "sample.every=0", "backbone.pos=rope", "name=pinned"))
    for result, pos in ((image, "sincos"), (text, "rope"), (pinned, "rope")):
        assert result.model.pos == pos
        assert OmegaConf.load(result.run_dir / "config.yaml").backbone.pos == pos
        assert load_model(result.run_dir / "checkpoints" / "last")[2].pos == pos
    assert compose_cfg(["backbone=dit_s"]).backbone.pos is None
