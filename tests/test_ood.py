from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gatekeeper.errors import PoolError, UsageError
from gatekeeper.ood import check_spec, load_pool, procedural_images


def test_procedural_is_deterministic_and_in_range():
    a, b = procedural_images(20, 32, 7), procedural_images(20, 32, 7)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, procedural_images(20, 32, 8))
    assert a.std(dim=(1, 2, 3)).min() > 0.02  # not flat images


def test_pool_split_is_disjoint_and_recorded():
    pool = load_pool("procedural", 32, 40, 10, seed=0)
    assert pool.inversion.shape == (40, 3, 32, 32) and pool.holdout.shape == (10, 3, 32, 32)
    flat_d = {t.numpy().tobytes() for t in pool.inversion}
    assert not any(t.numpy().tobytes() in flat_d for t in pool.holdout)
    assert pool.info.source == "procedural:0" and pool.info.n_inversion == 40 and len(pool.info.content_hash) == 64
    assert load_pool("procedural", 32, 40, 10, seed=0).info.content_hash == pool.info.content_hash


def _write_images(folder, n, size=(48, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_dir_pool_reads_recursively_skips_unreadable(tmp_path):
    _write_images(tmp_path / "a", 10)
    _write_images(tmp_path / "b" / "c", 10)
    (tmp_path / "0broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    pool = load_pool(f"dir:{tmp_path}", 32, 15, 5, seed=0)
    assert pool.inversion.shape == (15, 3, 32, 32)
    assert pool.info.n_skipped == 1 and pool.info.n_found == 20


def test_dir_pool_too_small_says_how_many(tmp_path):
    _write_images(tmp_path, 7)
    with pytest.raises(PoolError, match="has 7 usable images .*needs 30"):
        load_pool(f"dir:{tmp_path}", 32, 20, 10, seed=0)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(PoolError, match="has 0 usable images"):
        load_pool(f"dir:{tmp_path}", 32, 20, 10, seed=0)
    # a missing folder or a file is the user's typo: refused before any model is fetched (exit 4)
    with pytest.raises(UsageError, match="does not exist"):
        load_pool(f"dir:{tmp_path / 'nope'}", 32, 20, 10, seed=0)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_spec(f"dir:{tmp_path / 'file.png'}")


@pytest.mark.parametrize("spec", ["imagenet", "dir:", "procedural:x", "", "procedural:\u00b2", "procedural:99999999999", "procedural:-1"])
def test_bad_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError):
        check_spec(spec)


def _wide_image(path):
    """64x32: a red left quarter, green middle half, blue right quarter."""
    a = np.zeros((32, 64, 3), dtype=np.uint8)
    a[:, :16, 0] = 255
    a[:, 16:48, 1] = 255
    a[:, 48:, 2] = 255
    Image.fromarray(a).save(path)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_folder_images_are_fitted_as_the_backbone_resizes(tmp_path, mode):
    """shortest: the centre crop (green only); longest: the whole image on black bars; squash: all of it."""
    from gatekeeper.ood import folder_images

    _wide_image(tmp_path / "a.png")
    images, found, _ = folder_images(tmp_path, 16, 1, (mode, "bilinear"))
    assert found == 1 and images.shape == (1, 3, 16, 16)
    img = images[0].float() / 255
    if mode == "shortest":
        inner = img[:, :, 2:-2]  # the crop's edge columns blend in a little red / blue
        assert inner[1].min() > 0.95 and inner[0].max() < 0.05 and inner[2].max() < 0.05
    elif mode == "longest":
        assert img[:, :3].max() < 0.05 and img[:, -3:].max() < 0.05  # black above and below
        assert img[0, 8, 0] > 0.9 and img[2, 8, -1] > 0.9
    else:
        assert img[0, 0, 0] > 0.9 and img[1, 0, 8] > 0.9 and img[2, -1, -1] > 0.9


def test_the_model_says_how_folder_images_are_resized(tmp_path):
    from gatekeeper.models.loader import load_model
    from tests.conftest import custom_backbone, make_model_folder

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    stated = {"mean": mean, "std": std, "resize_mode": "squash", "interpolation": "bilinear"}
    backbone = custom_backbone(tmp_path / "b" / "backbone", preprocess_cfg=stated)
    model = load_model(make_model_folder(backbone, tmp_path / "b" / "m", "coop", ("a", "b")))
    assert model.resize == ("squash", "bilinear")
    plain = custom_backbone(tmp_path / "p" / "backbone")  # states only mean and std
    assert load_model(make_model_folder(plain, tmp_path / "p" / "m", "coop", ("a", "b"))).resize == (
        "shortest",
        "bicubic",
    )
