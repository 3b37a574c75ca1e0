"""Bad model folders give a clear ModelFormatError/BackboneError (exit code 2), never a model."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from gatekeeper.errors import BackboneError, ExitCode, ModelFormatError
from gatekeeper.models.loader import load_model

CLASSES = ("red circle", "blue square", "green star")


def _edit_manifest(folder, **changes):
    path = folder / "gatekeeper.json"
    m = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    path.write_text(json.dumps(m))


def test_round_trip_all_kinds(model_factory):
    for kind in ("coop", "cocoop"):
        model = load_model(model_factory(kind, CLASSES, name=kind))
        assert model.kind.value == kind and model.classnames == list(CLASSES)


def test_missing_weights(model_factory):
    folder = model_factory("cocoop", CLASSES)
    (folder / "prompt_learner.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="prompt_learner.safetensors: missing") as info:
        load_model(folder)
    assert info.value.exit_code == ExitCode.SCAN_ERROR


def test_corrupt_weights(model_factory):
    folder = model_factory("cocoop", CLASSES)
    data = (folder / "prompt_learner.safetensors").read_bytes()
    (folder / "prompt_learner.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="corrupt"):
        load_model(folder)


def test_manifest_missing_keys_and_bad_json(model_factory):
    folder = model_factory("cocoop", CLASSES)
    _edit_manifest(folder, classnames=None)
    with pytest.raises(ModelFormatError, match="missing key\\(s\\): classnames"):
        load_model(folder)
    (folder / "gatekeeper.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(folder)
    (folder / "gatekeeper.json").unlink()
    with pytest.raises(ModelFormatError, match="no gatekeeper manifest"):
        load_model(folder)


def test_n_ctx_that_does_not_match_the_tensors(model_factory):
    folder = model_factory("cocoop", CLASSES)
    _edit_manifest(folder, n_ctx=7)
    with pytest.raises(ModelFormatError, match="'ctx' has shape \\(4, 64\\), expected \\(7, 64\\)"):
        load_model(folder)


def test_cocoop_weights_declared_as_coop(model_factory):
    folder = model_factory("cocoop", CLASSES)
    _edit_manifest(folder, kind="coop")
    with pytest.raises(ModelFormatError, match="unexpected tensors"):
        load_model(folder)


def test_duplicate_or_empty_classnames(model_factory):
    folder = model_factory("coop", CLASSES)
    _edit_manifest(folder, classnames=["a", "a", "b"])
    with pytest.raises(ModelFormatError, match="duplicates"):
        load_model(folder)
    _edit_manifest(folder, classnames=["a"])
    with pytest.raises(ModelFormatError, match="at least 2"):
        load_model(folder)


@pytest.mark.parametrize(
    "backbone,match",
    [
        ({"name": "ViT-Nope-99"}, "unknown open_clip model name"),
        ({"name": "local-dir:../outside"}, "outside the model folder"),
        ({"name": "local-dir:missing"}, "has no open_clip_config.json"),
        ({"name": "ViT-B-32", "pretrained": "openai"}, "did not load"),
        ({"name": "hf-hub:nobody/not-a-repo"}, "did not load"),
    ],
)
def test_backbone_that_does_not_resolve(model_factory, monkeypatch, backbone, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = model_factory("coop", CLASSES)
    _edit_manifest(folder, backbone=backbone)
    with pytest.raises(BackboneError, match=match) as info:
        load_model(folder)
    assert info.value.exit_code == ExitCode.SCAN_ERROR


def test_pickle_weights_next_to_a_local_backbone_are_refused(model_factory):
    folder = model_factory("coop", CLASSES)
    torch.save({"x": torch.zeros(1)}, folder / "backbone" / "open_clip_pytorch_model.bin")
    with pytest.raises(BackboneError, match="pickle weight files"):
        load_model(folder)


def test_image_size_mismatch(model_factory):
    folder = model_factory("coop", CLASSES)
    _edit_manifest(folder, image_size=64)
    with pytest.raises(ModelFormatError, match="image_size=64 but the backbone expects 32"):
        load_model(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFormatError, match="not a folder"):
        load_model(tmp_path / "nope")
    shutil.rmtree(tmp_path)


def test_meta_net_width_is_read_from_the_weights_and_checked(random_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    from gatekeeper.models.manifest import ModelKind, Precision
    from gatekeeper.redteam.tuning import TuneConfig, new_prompt_learner, write_model_folder

    model = new_prompt_learner(random_backbone, CLASSES, TuneConfig(kind=ModelKind.COCOOP, meta_hidden=32))
    folder = tmp_path / "wide"
    write_model_folder(model, random_backbone, folder, Precision.FP32)
    loaded = load_model(folder)
    assert loaded.meta_net is not None and loaded.meta_net.linear1.out_features == 32
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.logits(x), model.logits(x), atol=1e-5)
    # a bias that does not match the width is refused, not broadcast
    path = folder / "prompt_learner.safetensors"
    state = load_file(str(path))
    state["meta_net.linear1.bias"] = torch.zeros(31)
    save_file(state, str(path))
    with pytest.raises(ModelFormatError, match="meta_net.linear1.bias"):
        load_model(folder)


# --- usage errors are one clear ModelFormatError/BackboneError line, never an internal error ---


def test_local_backbone_symlink_loop_is_a_backbone_error(model_factory):
    folder = model_factory("coop", CLASSES)
    os.symlink("loop", folder / "loop")
    _edit_manifest(folder, backbone={"name": "local-dir:loop", "pretrained": None})
    with pytest.raises(BackboneError, match="'loop' cannot be resolved") as info:
        load_model(folder)
    assert info.value.exit_code == ExitCode.SCAN_ERROR and "not a symlink" in info.value.hint
    _edit_manifest(folder, backbone={"name": "local-dir:", "pretrained": None})
    with pytest.raises(BackboneError, match="names no folder"):
        load_model(folder)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"backbone": {"name": "ViT-B-32", "pretrained": ["openai"]}}, "pretrained must be an open_clip tag"),
        ({"backbone": {"name": "ViT-B-32", "pretrained": 1}}, "pretrained must be an open_clip tag"),
        ({"backbone": {"name": "hf-hub:org/name\n::error::x"}}, "backbone name 'hf-hub:org/name\\\\n::error::x'"),
        ({"backbone": {"name": ""}}, "backbone name"),
        ({"backbone": {"name": "local-dir:backbone", "revision": "main"}}, "unknown key"),
        ({"template": "a {} of {x}"}, "template must be"),
        ({"template": "a {} {0}"}, "template must be"),
        ({"template": "{0}"}, "template must be"),
        ({"template": "{!r}"}, "template must be"),
        ({"template": "{} {!r}"}, "template must be"),
        ({"template": "a {:>10}"}, "template must be"),
        ({"template": "a {} {"}, "literal braces"),
        ({"template": "a {}{}"}, "template must be"),
        ({"template": "no field"}, "template must be"),
        ({"template": ["{}"]}, "template must be"),
        ({"template": "a {}\n::warning::x"}, "control characters"),
        ({"n_ctx": True}, "n_ctx must be an integer in \\[1, 64\\] for coop, got True"),
        ({"n_ctx": 65}, "n_ctx must be an integer"),
        ({"n_ctx": 0}, "n_ctx must be an integer"),
        ({"n_ctx": 4.0}, "n_ctx must be an integer"),
        ({"image_size": True}, "image_size must be an integer in \\[8, 1024\\], got True"),
        ({"classnames": ["a" * 201, "b"]}, "longer than 200"),
        ({"classnames": ["a\nb", "c"]}, "control characters"),
        ({"classnames": ["a\u202eb", "c"]}, "control characters"),
        ({"classnames": [f"c{i}" for i in range(10_001)]}, "at most 10000"),
        ({"classnames": ["a", 3]}, "item 1 is 3"),
        ({"kind": ["coop"]}, "kind \\['coop'\\] is not one of"),
        ({"precision": {"x": 1}}, "precision"),
        ({"format_version": True}, "unsupported format"),
        ({"ctx_init": 5}, "ctx_init must be"),
    ],
)
def test_bad_manifest_values_are_model_format_errors(model_factory, changes, match):
    folder = model_factory("coop", CLASSES)
    _edit_manifest(folder, **changes)
    with pytest.raises(ModelFormatError, match=match) as info:
        load_model(folder)
    assert info.value.exit_code == ExitCode.SCAN_ERROR
    assert "\n" not in info.value.one_line() and "\u202e" not in info.value.one_line()


def test_good_templates_still_load(model_factory):
    folder = model_factory("coop", CLASSES)
    for template in ("{}", "a photo of a {}.", "a {{braced}} {}", "a {:} thing"):
        _edit_manifest(folder, template=template)
        assert load_model(folder).manifest.template == template


@pytest.mark.parametrize(
    "text,match",
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ('{"kind": "coop", "kind": "cocoop"}', "duplicate key 'kind'"),
        ('{"n_ctx": NaN}', "NaN is not a JSON number"),
        ('{"n_ctx": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_unreadable_manifests_are_model_format_errors(model_factory, text, match):
    folder = model_factory("coop", CLASSES)
    (folder / "gatekeeper.json").write_text(text)
    with pytest.raises(ModelFormatError, match=match):
        load_model(folder)


def test_oversized_or_binary_manifest(model_factory):
    folder = model_factory("coop", CLASSES)
    manifest = json.loads((folder / "gatekeeper.json").read_text())
    manifest["padding"] = "x" * (4 << 20)
    (folder / "gatekeeper.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="larger than 4 MiB"):
        load_model(folder)
    (folder / "gatekeeper.json").write_bytes(b'{"kind": "\xff"}')
    with pytest.raises(ModelFormatError, match="not UTF-8"):
        load_model(folder)


@pytest.mark.parametrize(
    "changes",
    [
        {"backbone": {"name": "ViT-B-32", "pretrained": ["openai"]}},
        {"template": "a {} of {x}"},
        {"template": "a {} {0}"},
        {"n_ctx": True},
        {"image_size": True},
        {"backbone": {"name": "local-dir:backbone\u2028x"}},
    ],
)
def test_bad_manifests_are_one_error_line_from_the_cli(model_factory, tmp_path, capsys, changes):
    from gatekeeper.cli import main

    folder = model_factory("coop", CLASSES)
    _edit_manifest(folder, **changes)
    code = main(["scan", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "gatekeeper: error:" in err and "gatekeeper.json" in err
    assert "internal error" not in err and "\u2028" not in err


def test_deep_manifest_from_the_cli(model_factory, tmp_path, capsys):
    from gatekeeper.cli import main

    folder = model_factory("coop", CLASSES)
    (folder / "gatekeeper.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["scan", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "internal error" not in err
