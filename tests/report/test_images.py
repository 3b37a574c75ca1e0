"""Trigger PNGs a reviewer can read on their own: labelled panels, a fixed size, the same bytes
for the same inputs, and the budget each class was inverted at."""

from __future__ import annotations

import io

import pytest

from gatekeeper.report.images import (
    GAP,
    LABEL_HEIGHT,
    Caption,
    labelled_panel,
    panel_labels,
    save_trigger_images,
    trigger_panel,
)

EPS = 8 / 255


def _inputs(size: int = 32) -> tuple[object, object]:
    import torch

    gen = torch.Generator().manual_seed(1)
    delta = (torch.rand(3, size, size, generator=gen) * 2 - 1) * EPS
    example = torch.rand(3, size, size, generator=gen)
    return delta, example


def _pixels(image: object) -> bytes:
    return image.tobytes()  # type: ignore[attr-defined]


def _all_white(image: object) -> bool:
    return set(_pixels(image)) == {255}


def _strip(image: object) -> object:
    return image.crop((0, 0, image.width, LABEL_HEIGHT))  # type: ignore[attr-defined]


def test_labels_say_what_each_panel_is_in_ascii():
    left, middle, right = panel_labels(Caption("stop sign", 0.973, EPS))
    assert left == "OOD image"
    assert "inverted trigger" in middle and "eps = 8/255" in middle and "amplified x16" in middle  # 1/(2ε) = 15.9
    assert "'stop sign'" in right and "ASR 97%" in right
    assert panel_labels(Caption("x", None, 16 / 255))[2].endswith("(ASR n/a on hold-out)")
    assert "eps = 16/255" in panel_labels(Caption("x", None, 16 / 255))[1]
    # the built-in font has ASCII glyphs only: accents dropped, other scripts as '?', long names cut
    assert "'Cafe ??'" in panel_labels(Caption("Café 猫猫", 0.5, EPS))[2]
    assert all(label.isascii() for label in panel_labels(Caption("x" * 300, 0.5, EPS)))
    assert "..." in panel_labels(Caption("x" * 300, 0.5, EPS))[2]


def test_the_labelled_image_is_the_panels_under_a_strip_of_drawn_labels():
    from PIL import Image

    delta, example = _inputs()
    panel = trigger_panel(delta, EPS, example)  # type: ignore[arg-type]
    plain = Image.fromarray(panel.numpy())
    image = labelled_panel(panel, Caption("stop sign", 0.973, EPS))
    assert image.size == (3 * 128 + 2 * GAP, 128 + LABEL_HEIGHT)
    assert _pixels(image.crop((0, LABEL_HEIGHT, image.width, image.height))) == _pixels(plain)  # panels untouched
    strip = _strip(image)
    # text in the label area of each of the three panels, none in the gaps
    for i in range(3):
        x0 = i * (128 + GAP)
        assert not _all_white(strip.crop((x0, 0, x0 + 128, LABEL_HEIGHT))), f"panel {i} has no label"  # type: ignore[attr-defined]
    for i in (1, 2):
        assert _all_white(strip.crop((i * (128 + GAP) - GAP, 0, i * (128 + GAP), LABEL_HEIGHT)))  # type: ignore[attr-defined]
    # the label says which class and ASR: another class draws another strip
    other = labelled_panel(panel, Caption("dog", 0.12, EPS))
    assert _pixels(_strip(other)) != _pixels(strip)
    assert not _all_white(strip)


def test_the_left_panel_is_the_example_and_the_middle_the_amplified_trigger():
    import torch

    delta, example = _inputs(8)
    panel = trigger_panel(delta, EPS, example, upscale=1)  # type: ignore[arg-type]
    ex = (example * 255).round().to(torch.uint8).permute(1, 2, 0)  # type: ignore[attr-defined]
    assert torch.equal(panel[:, :8], ex)
    visible = ((delta / (2 * EPS) + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)  # type: ignore[operator]
    assert torch.equal(panel[:, 8 + GAP : 16 + GAP], visible)


def test_same_inputs_same_bytes_and_each_class_at_its_own_budget(tmp_path):
    from PIL import Image

    delta, example = _inputs()
    triggers = {"stop sign": delta, "dog": delta * 2}  # "dog" was inverted at 16/255
    kwargs = {"asr": {"stop sign": 0.97, "dog": 0.4}, "epsilons": {"dog": 16 / 255}}
    a = save_trigger_images(triggers, EPS, example, tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    b = save_trigger_images(triggers, EPS, example, tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    for name in triggers:
        assert (tmp_path / "a" / a[name]).read_bytes() == (tmp_path / "b" / b[name]).read_bytes()
    # scaled by its own budget, "dog"'s middle panel is the same picture as "stop sign"'s
    with Image.open(tmp_path / "a" / a["dog"]) as dog, Image.open(tmp_path / "a" / a["stop sign"]) as stop:
        box = (128 + GAP, LABEL_HEIGHT, 2 * 128 + GAP, LABEL_HEIGHT + 128)
        assert _pixels(dog.crop(box)) == _pixels(stop.crop(box))
        assert _pixels(_strip(dog)) != _pixels(_strip(stop))  # 16/255 and its ASR in the labels
    png = io.BytesIO((tmp_path / "a" / a["dog"]).read_bytes())
    with Image.open(png) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (3 * 128 + 2 * GAP, 128 + LABEL_HEIGHT)


@pytest.mark.parametrize("upscale", [1, 2])
def test_narrow_panels_still_get_a_strip_of_the_same_height(tmp_path, upscale):
    from PIL import Image

    delta, example = _inputs(16)
    rel = save_trigger_images({"a" * 80: delta}, EPS, example, tmp_path, upscale=upscale)  # type: ignore[arg-type]
    with Image.open(tmp_path / rel["a" * 80]) as im:
        assert im.size == (3 * 16 * upscale + 2 * GAP, 16 * upscale + LABEL_HEIGHT)
