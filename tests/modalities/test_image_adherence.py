"""The prompt-adherence checker: it must read hand-drawn shapes right, and evaluation reports it."""

import itertools

import pytest
import torch

from modalities.image_adherence import measure, parse_caption, score
from modalities.image_data import COLOURS, PLACES, SHAPES, Shapes, draw_shape
from modalities.image_metrics import train_classifier


def drawn(shape, colour, place, big, size=32):
    return (draw_shape(shape, colour, PLACES[place], big, size) + 1) / 2  # (3, H, W) in [0, 1]


def test_captions_are_parsed():
    assert parse_caption("a small red circle top left") == {"colour": "red", "shape": "circle", "position": "top left"}
    assert parse_caption("a large white cross centre")["position"] == "centre"
    assert parse_caption("") == {"colour": None, "shape": None, "position": None}


def test_colour_and_position_of_drawn_shapes_are_read_right():
    cases = list(itertools.product(SHAPES, COLOURS, PLACES, (False, True)))
    images = torch.stack([drawn(*case) for case in cases])
    found = measure(images)
    wrong = [(case, f) for case, f in zip(cases, found) if (f["colour"], f["position"]) != (case[1], case[2])]
    assert not wrong, wrong[:5]
    assert measure(torch.zeros(1, 3, 32, 32) + torch.tensor([20, 20, 28]).view(1, 3, 1, 1) / 255) == [
        {"colour": None, "position": None}
    ]  # an empty picture names nothing


def test_score_needs_every_attribute_for_all():
    torch.manual_seed(0)
    classifier, accuracy = train_classifier(Shapes(3000, 32), Shapes(300, 32, seed=1), epochs=3, workers=0)
    assert accuracy > 0.9
    images = torch.stack([drawn("circle", "red", "top left", True), drawn("square", "blue", "centre", True)])
    right = score(images, ["a large red circle top left", "a large blue square centre"], classifier)
    assert right.all()
    wrong = score(images, ["a large green circle top left", "a large blue triangle bottom right"], classifier)
    assert wrong.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_evaluation_reports_adherence_and_chance(tiny_cfg, tmp_path, monkeypatch):
    import train.train as trainer
    from infer.cli import parse
    from infer.evaluate import EvalArgs, evaluate

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    run = trainer.train(tiny_cfg("steps=4", "modality.condition=caption"))
    ckpt = run.run_dir / "checkpoints" / "last"
    result = evaluate(parse(EvalArgs, [f"ckpt={ckpt}", "n=8", "batch=4", "steps=2", "device=cpu"]))
    for name in ("adherence", "chance"):
        for attribute in ("colour", "shape", "position", "all"):
            assert 0 <= result[f"{name}_{attribute}"] <= 1
    assert result["adherence_all"] <= min(result["adherence_colour"], result["adherence_shape"])
    assert "label_agreement" not in result  # a caption model has no labels to agree with


@pytest.mark.parametrize("colour", ["white", "yellow"])
def test_light_colours_are_not_background(colour):
    assert measure(drawn("ring", colour, "bottom right", False)[None])[0] == {
        "colour": colour,
        "position": "bottom right",
    }
