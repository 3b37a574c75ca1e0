"""A backbone from an untrusted provider brings a closed list of things, and no code runs from it.

The remote-code attack is exercised for real: a stub ``transformers`` package (installed in
``sys.modules`` for one test) behaves like the real ``AutoTokenizer.from_pretrained``: given
``trust_remote_code=True`` it reads ``tokenizer_config.json``'s ``auto_map`` and imports the
provider's ``.py`` file, which writes a marker file. A control in each test drives open_clip's own
``get_tokenizer`` at the same files and sees the marker appear; through gatekeeper it must not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants as hf_constants

from gatekeeper.errors import BackboneError, ExitCode
from gatekeeper.models.loader import load_model

CLASSES = ("red circle", "blue square", "green star")
SHA = hashlib.sha1(b"evil commit").hexdigest()

STUB_TRANSFORMERS = '''
"""Stand-in for transformers: AutoTokenizer.from_pretrained imports auto_map code when trusted."""
import importlib.util
import json
import os

calls = []


class AutoTokenizer:
    @classmethod
    def from_pretrained(cls, name, cache_dir=None, trust_remote_code=False, **kwargs):
        calls.append((str(name), trust_remote_code))
        if os.path.isdir(str(name)):
            def get(filename):
                return os.path.join(str(name), filename)
        else:  # a Hub repo id: the files come from the Hub cache, as transformers fetches them
            from huggingface_hub import hf_hub_download

            def get(filename):
                return hf_hub_download(str(name), filename, cache_dir=cache_dir)
        with open(get("tokenizer_config.json")) as fh:
            config = json.load(fh)
        ref = config.get("auto_map", {}).get("AutoTokenizer", [None])[0]
        if not (ref and trust_remote_code):
            raise ValueError("no tokenizer class without remote code")
        module, class_name = ref.rsplit(".", 1)
        spec = importlib.util.spec_from_file_location(module, get(module + ".py"))
        code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(code)
        return getattr(code, class_name)()
'''

EVIL_MODULE = """
import os
with open({marker!r}, "w") as fh:
    fh.write("code from the model ran as uid %d" % os.getuid())


class EvilTokenizer:
    def __call__(self, texts, **kwargs):
        raise RuntimeError("not a tokenizer")
"""


@pytest.fixture
def transformers_stub(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("transformers")
    exec(compile(STUB_TRANSFORMERS, "<transformers stub>", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "transformers", module)
    return module


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def _refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


@pytest.fixture
def coop_folder(model_factory) -> Path:
    """A CoOp model folder with its backbone in ``backbone/`` (built before any recording starts)."""
    return model_factory("coop", CLASSES)


@pytest.fixture
def open_clip_calls(coop_folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and pass through) every open_clip create_model / get_tokenizer call after the folder is built."""
    import open_clip

    calls: list[str] = []
    create, tokenizer = open_clip.create_model, open_clip.get_tokenizer

    def _create(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return create(name, *args, **kwargs)

    def _tokenizer(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return tokenizer(name, *args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", _create)
    monkeypatch.setattr(open_clip, "get_tokenizer", _tokenizer)
    return calls


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "backbone" / "open_clip_config.json").read_text())


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "backbone" / "open_clip_config.json").write_text(json.dumps(config))


def _remote_code_config(config: dict[str, Any], tokenizer: str) -> dict[str, Any]:
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = tokenizer
    config["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"trust_remote_code": True}
    return config


def _tokenizer_files(marker: Path) -> dict[str, bytes]:
    return {
        "tokenizer_config.json": json.dumps(
            {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
        ).encode(),
        "tokenization_evil.py": EVIL_MODULE.format(marker=str(marker)).encode(),
    }


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / "gatekeeper.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def _scan_cli(folder: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from gatekeeper.cli import main

    code = main(["scan", str(folder), "--out", str(out)])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- local-dir: remote code


def test_remote_code_tokenizer_in_a_local_backbone_never_runs(coop_folder, transformers_stub, tmp_path, capsys):
    folder = coop_folder
    marker = tmp_path / "marker"
    _write_config(folder, _remote_code_config(_config(folder), "evil/tokenizer"))
    for name, data in _tokenizer_files(marker).items():
        (folder / "backbone" / name).write_bytes(data)

    with pytest.raises(BackboneError) as info:
        load_model(folder)
    message = info.value.one_line()
    assert "tokenization_evil.py" in message and "tokenizer_config.json" in message and "remove" in message
    assert info.value.exit_code == ExitCode.SCAN_ERROR
    code, err = _scan_cli(folder, tmp_path / "out", capsys)
    assert code == 2 and "gatekeeper: error:" in err and "internal error" not in err
    assert not marker.exists() and transformers_stub.calls == []

    # control: handed to open_clip as is, the same folder runs the provider's code
    import open_clip

    open_clip.get_tokenizer("local-dir:" + str(folder / "backbone"))
    assert marker.exists() and transformers_stub.calls == [(str(folder / "backbone"), True)]


def test_remote_code_config_alone_is_refused_before_open_clip(
    coop_folder, transformers_stub, open_clip_calls, tmp_path
):
    folder = coop_folder
    _write_config(folder, _remote_code_config(_config(folder), "evil/tokenizer"))
    with pytest.raises(BackboneError, match="trust_remote_code"):
        load_model(folder)
    assert open_clip_calls == [] and transformers_stub.calls == []


def _set(path: str, value: Any):
    def edit(config: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit,match",
    [
        (_set("model_cfg.text_cfg.hf_tokenizer_name", "bert-base-uncased"), "hf_tokenizer_name"),
        (_set("model_cfg.text_cfg.tokenizer_kwargs", {"bpe_path": "/etc/passwd"}), "tokenizer_kwargs"),
        (_set("model_cfg.text_cfg.tokenizer_mode", "clips"), "tokenizer_mode"),
        (_set("model_cfg.text_cfg.hf_model_name", "org/text"), "hf_model_name"),
        (_set("model_cfg.text_cfg.hf_model_pretrained", True), "hf_model_pretrained"),
        (_set("model_cfg.vision_cfg.timm_model_name", "hf-hub:org/evil"), "timm_model_name"),
        (_set("model_cfg.vision_cfg.timm_model_name", "org/evil"), "timm_model_name"),
        (_set("model_cfg.vision_cfg.timm_model_pretrained", True), "timm_model_pretrained"),
        (_set("model_cfg.vision_cfg.act_kwargs", {"trust_remote_code": True}), "trust_remote_code"),
        (_set("preprocess_cfg.Trust_Remote_Code", 1), "(?i)trust_remote_code"),
        (_set("model_cfg.multimodal_cfg", {"width": 64}), "unknown key 'multimodal_cfg'"),
        (_set("model_cfg.text_cfg.surprise", 1), "unknown key 'surprise'"),
        (_set("tokenizer", "evil"), "unknown top-level"),
        (_set("model_cfg.text_cfg.width", "64"), "text_cfg.width must be an integer"),
        (_set("model_cfg.vision_cfg.image_size", True), "vision_cfg.image_size must be"),
        (_set("model_cfg.embed_dim", 64.0), "embed_dim must be an integer"),
        (_set("model_cfg.quick_gelu", "yes"), "quick_gelu must be true or false"),
        (_set("model_cfg.vision_cfg.output_tokens", True), "output_tokens must be false"),
        (_set("model_cfg.text_cfg.layers", 129), "text_cfg.layers must be an integer in"),
        (_set("model_cfg.vision_cfg.pool_type", "tok\n::error::x"), "pool_type must be a short name"),
        (_set("preprocess_cfg.mean", [0.5, 0.5]), "mean must be a list of 3 finite numbers"),
        (_set("preprocess_cfg.std", [0.3, 0.3, 0.0]), "std must be a list of 3 finite numbers > 0"),
        (_set("preprocess_cfg.std", [0.3, "0.3", 0.3]), "std must be a list of 3"),
        (_set("preprocess_cfg.mode", "L"), "preprocess_cfg.mode must be 'RGB'"),
        (_set("model_cfg", []), "model_cfg must be an object"),
    ],
)
def test_config_outside_the_allow_list_is_refused_before_open_clip(
    coop_folder, open_clip_calls, no_network, edit, match
):
    folder = coop_folder
    config = _config(folder)
    edit(config)
    _write_config(folder, config)
    with pytest.raises(BackboneError, match=match) as info:
        load_model(folder)
    assert info.value.exit_code == ExitCode.SCAN_ERROR
    assert open_clip_calls == []
    assert "\n" not in info.value.one_line()


def test_timm_hub_name_never_reaches_open_clip_or_the_hub(coop_folder, open_clip_calls, no_network, monkeypatch):
    import huggingface_hub

    hub_calls: list[Any] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: hub_calls.append((a, k)))
    folder = coop_folder
    config = _config(folder)
    config["model_cfg"]["vision_cfg"] = {"timm_model_name": "hf-hub:evil/timm-model", "image_size": 32}
    _write_config(folder, config)
    with pytest.raises(BackboneError, match="timm_model_name 'hf-hub:evil/timm-model' names a Hub repo"):
        load_model(folder)
    assert open_clip_calls == [] and hub_calls == []


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"model_cfg": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
        ('{"model_cfg": {}, "pad": "' + "x" * (1 << 20) + '"}', "larger than 1 MiB"),
        ('{"model_cfg": {}, "model_cfg": {}}', "duplicate key 'model_cfg'"),
        ('{"model_cfg": {"embed_dim": NaN}}', "NaN is not a JSON number"),
        ("{not json", "not valid JSON"),
    ],
)
def test_unreadable_config_is_a_backbone_error(coop_folder, open_clip_calls, text, match):
    folder = coop_folder
    (folder / "backbone" / "open_clip_config.json").write_text(text)
    with pytest.raises(BackboneError, match=match):
        load_model(folder)
    assert open_clip_calls == []
    (folder / "backbone" / "open_clip_config.json").write_bytes(b'{"model_cfg": "\xff"}')
    with pytest.raises(BackboneError, match="not UTF-8"):
        load_model(folder)


# --------------------------------------------------------------------------- local-dir: what the folder holds


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer_config.json",
        "evil.py",
        "evil.cpython-311.pyc",
        "_ops.so",
        "open_clip_pytorch_model.bin",
        "vocab.txt",
        "model.safetensors",
    ],
)
def test_backbone_folder_holding_other_files_is_refused(coop_folder, open_clip_calls, name):
    folder = coop_folder
    (folder / "backbone" / name).write_bytes(b"print('hi')\n")
    with pytest.raises(BackboneError) as info:
        load_model(folder)
    message = info.value.one_line()
    assert f"'{name}'" in message and "remove" in message and "open_clip_model.safetensors" in message
    assert open_clip_calls == []


def test_backbone_folder_names_are_rendered_inert(coop_folder):
    folder = coop_folder
    (folder / "backbone" / "x\n::error::pwned.py").write_text("")
    (folder / "backbone" / "sub").mkdir()
    with pytest.raises(BackboneError) as info:
        load_model(folder)
    message = info.value.one_line()
    assert "\n" not in message and "x\\n::error::pwned.py" in message and "'sub'" in message


def test_docs_next_to_the_backbone_are_fine(coop_folder, transformers_stub, open_clip_calls):
    folder = coop_folder
    for name in ("README.md", "LICENSE", ".gitattributes"):
        (folder / "backbone" / name).write_text("text\n")
    model = load_model(folder)
    assert model.classnames == list(CLASSES)
    # open_clip only ever saw the private staging folder, and never loaded a HF tokenizer
    assert open_clip_calls and all(n.startswith("local-dir:") and "gatekeeper-backbone-" in n for n in open_clip_calls)
    assert transformers_stub.calls == []


def test_weights_symlinked_out_of_the_model_folder_are_refused(coop_folder, tmp_path):
    folder = coop_folder
    weights = folder / "backbone" / "open_clip_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    os.symlink(outside, weights)
    with pytest.raises(BackboneError, match="not a regular file inside the model folder"):
        load_model(folder)


def test_open_clip_errors_are_rendered_inert(coop_folder, monkeypatch):
    import open_clip

    def _boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bad tensor \x1b[31m\u202e::error::pwned\u2066 in the weights")

    monkeypatch.setattr(open_clip, "create_model", _boom)
    folder = coop_folder
    with pytest.raises(BackboneError, match="did not load") as info:
        load_model(folder)
    message = info.value.one_line()
    assert "\x1b" not in message and "\u202e" not in message and "\u2066" not in message
    assert "\\x1b[31m\\u202e::error::pwned\\u2066" in message


# --------------------------------------------------------------------------- hf-hub: backbones


def _hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hub cache holding ``repo`` at main, laid out as huggingface_hub writes it."""
    storage = root / f"models--{repo.replace('/', '--')}"
    for rel, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / SHA / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(SHA)
    return root


@pytest.fixture
def hub_backbone(random_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None):
    """Build an offline Hub cache holding ``repo`` (config edited by ``edit``, plus ``extra`` files)."""

    def build(repo: str, config: dict[str, Any] | None = None, extra: dict[str, bytes] | None = None) -> Path:
        files = {
            "open_clip_config.json": json.dumps(
                config or json.loads((random_backbone / "open_clip_config.json").read_text())
            ).encode(),
            "open_clip_model.safetensors": (random_backbone / "open_clip_model.safetensors").read_bytes(),
            **(extra or {}),
        }
        cache = _hub_cache(tmp_path / "hub", repo, files)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        return cache

    return build


def test_hub_backbone_loads_exactly_two_files_through_a_validated_folder(
    coop_folder, hub_backbone, open_clip_calls, transformers_stub, monkeypatch
):
    import huggingface_hub

    hub_backbone("good/clip", extra={"open_clip_pytorch_model.bin": b"pickle", "tokenizer_config.json": b"{}"})
    fetched: list[str] = []
    real = huggingface_hub.hf_hub_download

    def _download(*args: Any, **kwargs: Any) -> str:
        fetched.append(kwargs.get("filename") or args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _download)
    folder = coop_folder
    shutil.rmtree(folder / "backbone")
    _edit_manifest(folder, backbone={"name": "hf-hub:good/clip", "pretrained": None})
    model = load_model(folder)
    assert model.classnames == list(CLASSES)
    assert sorted(fetched) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert open_clip_calls and all(n.startswith("local-dir:") for n in open_clip_calls)
    assert transformers_stub.calls == []


def test_remote_code_tokenizer_in_a_hub_backbone_never_runs(
    coop_folder, random_backbone, hub_backbone, transformers_stub, open_clip_calls, tmp_path, capsys
):
    marker = tmp_path / "marker"
    config = _remote_code_config(json.loads((random_backbone / "open_clip_config.json").read_text()), "evil/clip")
    hub_backbone("evil/clip", config, _tokenizer_files(marker))
    folder = coop_folder
    shutil.rmtree(folder / "backbone")
    _edit_manifest(folder, backbone={"name": "hf-hub:evil/clip", "pretrained": None})

    with pytest.raises(BackboneError, match="trust_remote_code") as info:
        load_model(folder)
    assert info.value.exit_code == ExitCode.SCAN_ERROR
    code, err = _scan_cli(folder, tmp_path / "out", capsys)
    assert code == 2 and "gatekeeper: error:" in err and "trust_remote_code" in err and "internal error" not in err
    assert not marker.exists() and transformers_stub.calls == [] and open_clip_calls == []

    # control: open_clip resolving the hub name itself runs the provider's code, offline, from the cache
    import open_clip

    open_clip.get_tokenizer("hf-hub:evil/clip")
    assert marker.exists() and transformers_stub.calls == [("evil/clip", True)]


@pytest.mark.parametrize(
    "name,match",
    [
        ("hf-hub:nobody/not-a-repo", "did not load: open_clip_config.json"),
        ("hf-hub:org/../etc", "not a valid hf-hub:org/repo"),
        ("hf-hub:org", "not a valid hf-hub:org/repo"),
    ],
)
def test_bad_hub_backbones(coop_folder, hub_backbone, open_clip_calls, name, match):
    hub_backbone("good/clip")
    folder = coop_folder
    _edit_manifest(folder, backbone={"name": name, "pretrained": None})
    with pytest.raises(BackboneError, match=match) as info:
        load_model(folder)
    assert "\n" not in info.value.one_line() and open_clip_calls == []


def test_hub_backbone_without_safetensors_is_refused(coop_folder, random_backbone, tmp_path, monkeypatch, no_network):
    cache = _hub_cache(
        tmp_path / "hub",
        "pickled/clip",
        {
            "open_clip_config.json": (random_backbone / "open_clip_config.json").read_bytes(),
            "open_clip_pytorch_model.bin": b"not loaded",
        },
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    folder = coop_folder
    _edit_manifest(folder, backbone={"name": "hf-hub:pickled/clip", "pretrained": None})
    with pytest.raises(BackboneError, match="open_clip_model.safetensors"):
        load_model(folder)


# --------------------------------------------------------------------------- built-in names


@pytest.mark.parametrize(
    "backbone,match",
    [
        ({"name": "ViT-B-32", "pretrained": "/tmp/weights.safetensors"}, "not an open_clip pretrained tag"),
        ({"name": "ViT-B-32", "pretrained": "https://example.com/w.pt"}, "not an open_clip pretrained tag"),
        ({"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k/../x"}, "not an open_clip pretrained tag"),
        ({"name": "ViT-B-16-SigLIP", "pretrained": "webli"}, "hf_tokenizer_name"),
        ({"name": "RN50-quickgelu", "pretrained": "nope"}, "use one of openai"),
    ],
)
def test_builtin_backbones_take_listed_tags_and_open_clip_tokenizers_only(
    coop_folder, open_clip_calls, no_network, backbone, match
):
    folder = coop_folder
    _edit_manifest(folder, backbone=backbone)
    with pytest.raises(BackboneError) as info:
        load_model(folder)
    assert match in info.value.one_line() and open_clip_calls == []


def test_builtin_tokenizers_need_no_transformers_and_no_network(transformers_stub, no_network, monkeypatch):
    """The check behind the allow-list: every built-in gatekeeper accepts gets open_clip's own BPE."""
    import open_clip
    import open_clip.factory

    from gatekeeper.models.backbone import open_clip_name
    from gatekeeper.models.manifest import BackboneRef

    class _Simple:
        def __init__(self, context_length: int | None = None, **kwargs: Any) -> None:
            assert kwargs == {}, kwargs

    def _hf(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a Hugging Face tokenizer was built")

    monkeypatch.setattr(open_clip.factory, "SimpleTokenizer", _Simple)
    monkeypatch.setattr(open_clip.factory, "HFTokenizer", _hf)
    monkeypatch.setattr(open_clip.factory, "SigLipTokenizer", _hf)
    accepted = refused = 0
    for name in open_clip.list_models():
        try:
            assert open_clip_name(Path("."), BackboneRef(name)) == name
        except BackboneError:
            refused += 1
            continue
        accepted += 1
        assert isinstance(open_clip.get_tokenizer(name), _Simple), name
    assert accepted > 50 and refused > 0 and transformers_stub.calls == []
    assert "transformers" not in sys.modules or sys.modules["transformers"] is transformers_stub
