"""Prompt adherence on the built-in shapes, measured without any downloaded network: for each
generated image, the colour (the palette colour that most of its foreground pixels are a blend of),
the shape (the shapes classifier of modalities/image_metrics.py) and the position (the place whose
centre is nearest to the foreground's centroid), compared with what its prompt asked.

Prompts are held-out captions ("a small red circle top left"). The same model sampled with no
prompt (the null condition that caption dropout trains) gives the chance level to compare with.
"""

from __future__ import annotations

import torch

from modalities.image_data import BACKGROUND, COLOURS, PLACES, SHAPES
from modalities.image_metrics import get_classifier

ATTRIBUTES = ("colour", "shape", "position")
FOREGROUND = 60.0  # RGB distance (0..255 scale) from the background above which a pixel is foreground


def parse_caption(caption: str) -> dict:
    """A shapes caption -> {"colour", "shape", "position"} (None for a part it does not name)."""
    words = caption.split()
    return {
        "colour": next((w for w in words if w in COLOURS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "position": next((p for p in PLACES if caption.endswith(p)), None),
    }


def measure(images: torch.Tensor) -> list[dict]:
    """Colour and position of each image's foreground.

    Args:
        images: (B, 3, H, W) in [0, 1].
    Returns:
        one {"colour", "position"} per image; None where no pixel stands out from the background.
    """
    d = images.float().permute(0, 2, 3, 1) * 255 - torch.tensor(BACKGROUND, dtype=torch.float32)  # (B, H, W, 3)
    foreground = d.norm(dim=-1) > FOREGROUND  # (B, H, W)
    # Edge pixels blend a colour with the background; so each pixel goes to the palette colour whose
    # line segment from the background passes nearest, not to the nearest colour itself.
    c = torch.tensor(list(COLOURS.values()), dtype=torch.float32) - torch.tensor(BACKGROUND)  # (K, 3)
    share = ((d @ c.T) / (c * c).sum(-1)).clamp(0, 1)  # (B, H, W, K) how much of colour k
    nearest = (d[..., None, :] - share[..., None] * c).norm(dim=-1).argmin(-1)  # (B, H, W)
    places = torch.tensor(list(PLACES.values()), dtype=torch.float32)  # (P, 2) as (x, y) shares
    h, w = foreground.shape[1:]
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    found = []
    for mask, colour in zip(foreground, nearest):
        if not mask.any():
            found.append({"colour": None, "position": None})
            continue
        votes = torch.bincount(colour[mask], minlength=len(COLOURS))
        centroid = torch.stack([xs[mask].mean(), ys[mask].mean()])
        found.append(
            {
                "colour": list(COLOURS)[int(votes.argmax())],
                "position": list(PLACES)[int((places - centroid).norm(dim=-1).argmin())],
            }
        )
    return found


def score(images: torch.Tensor, captions: list[str], classifier) -> torch.Tensor:
    """(B, 4) bool: colour, shape, position and all three right, for images (B, 3, H, W) in [0, 1]
    against the captions that asked for them."""
    device = next(classifier.parameters()).device
    shapes = classifier(images.to(device) * 2 - 1).argmax(1).cpu()
    rows = []
    for asked, seen, shape in zip(map(parse_caption, captions), measure(images), shapes.tolist()):
        right = [
            seen["colour"] == asked["colour"],
            SHAPES[shape] == asked["shape"],
            seen["position"] == asked["position"],
        ]
        rows.append([*right, all(right)])
    return torch.tensor(rows, dtype=torch.bool)


@torch.no_grad()
def evaluate_adherence(modality, model, process, args, device) -> dict:
    """Share of `args.n` samples whose colour, shape, position and all three match their prompt
    (held-out captions), at `args.guidance`; and the same with no prompt ("chance_*"), scored against
    the same captions. Batches are seeded args.seed + i."""
    classifier, _ = get_classifier(modality, device)
    test = modality.pixels("test")
    captions = [test[i % len(test)]["caption"] for i in range(args.n)]
    prompted, chance = [], []
    for i, start in enumerate(range(0, args.n, args.batch)):
        asked = captions[start : start + args.batch]
        for rows, guidance, no_prompt in ((prompted, args.guidance, False), (chance, 1.0, True)):
            cond = {**modality.sample_cond(len(asked), device), **modality.text(asked, device)}  # one prompt each
            if "label" in cond:  # modality.condition=both: the label names the shape the prompt asks for
                cond["label"] = torch.tensor([SHAPES.index(parse_caption(c)["shape"]) for c in asked], device=device)
            if no_prompt:
                cond["drop"] = torch.ones(len(asked), dtype=torch.bool, device=device)  # the null condition
            x0 = process.sample(
                modality.model_fn(model),
                modality.sample_shape(len(asked)),
                cond,
                steps=args.steps,
                sampler=args.sampler,
                guidance=guidance,
                device=device,
                generator=torch.Generator(device=device).manual_seed(args.seed + i),
                **modality.sample_options(model),  # e.g. self-conditioning
            )
            rows.append(score(modality.decode(x0), asked, classifier))
    result = {}
    for name, rows in (("adherence", prompted), ("chance", chance)):
        shares = torch.cat(rows).float().mean(0).tolist()
        result.update({f"{name}_{a}": s for a, s in zip((*ATTRIBUTES, "all"), shares)})
    return result
