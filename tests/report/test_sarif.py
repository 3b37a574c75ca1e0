"""SARIF 2.1.0 output: structure code scanning accepts, levels, fingerprints, and the CLI's --sarif / --format json.

No PyPI package vendors the OASIS SARIF schema (sarif-om and sarif-tools do not), and tests do not
touch a network, so the log is checked against a hand-written subset of the 2.1.0 schema: every
object and property gatekeeper emits, with the spec's names, required keys and enums, and
``additionalProperties: false`` so a misspelt key fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from gatekeeper import __version__
from gatekeeper.cli import main
from gatekeeper.errors import ExitCode, UsageError
from gatekeeper.report.jsonout import result_to_dict, validate_result
from gatekeeper.report.machine import model_category, sarif_location, write_sarif
from gatekeeper.report.sarif import (
    MAX_CATEGORY,
    default_category,
    path_to_uri,
    remote_location,
    to_sarif,
    validate_category,
)
from gatekeeper.result import ClassScore, Decision, ModelInfo, PoolInfo, Provenance, ScanResult, Verdict

_MESSAGE = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
    "properties": {"text": {"type": "string"}, "markdown": {"type": "string"}, "id": {"type": "string"}},
}
_MULTIFORMAT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["text"],
    "properties": {"text": {"type": "string", "minLength": 1}, "markdown": {"type": "string"}},
}
_LEVEL = {"enum": ["none", "note", "warning", "error"]}
_PROPERTY_BAG = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}

# The subset of https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json
# that gatekeeper's logs use (sarifLog, run, tool, toolComponent, reportingDescriptor, result, location, ...).
SARIF_SUBSET_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string", "format": "uri"},
        "version": {"const": "2.1.0"},
        "runs": {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/run"}},
    },
    "definitions": {
        "run": {
            "type": "object",
            "additionalProperties": False,
            "required": ["tool"],
            "properties": {
                "tool": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["driver"],
                    "properties": {"driver": {"$ref": "#/definitions/toolComponent"}},
                },
                "invocations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["executionSuccessful"],
                        "properties": {"executionSuccessful": {"type": "boolean"}},
                    },
                },
                "results": {"type": "array", "items": {"$ref": "#/definitions/result"}},
                "columnKind": {"enum": ["utf16CodeUnits", "unicodeCodePoints"]},
                "automationDetails": {  # runAutomationDetails
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"id": {"type": "string"}, "description": _MESSAGE},
                },
            },
        },
        "toolComponent": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "semanticVersion": {"type": "string"},
                "informationUri": {"type": "string", "format": "uri"},
                "rules": {"type": "array", "uniqueItems": True, "items": {"$ref": "#/definitions/reportingDescriptor"}},
            },
        },
        "reportingDescriptor": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "shortDescription": _MULTIFORMAT,
                "fullDescription": _MULTIFORMAT,
                "help": _MULTIFORMAT,
                "helpUri": {"type": "string", "format": "uri"},
                "defaultConfiguration": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"level": _LEVEL, "enabled": {"type": "boolean"}},
                },
                "properties": _PROPERTY_BAG,
            },
        },
        "result": {
            "type": "object",
            "additionalProperties": False,
            "required": ["message"],
            "properties": {
                "ruleId": {"type": "string"},
                "ruleIndex": {"type": "integer", "minimum": -1},
                "level": _LEVEL,
                "message": _MESSAGE,
                "locations": {"type": "array", "items": {"$ref": "#/definitions/location"}},
                "partialFingerprints": {"type": "object", "additionalProperties": {"type": "string"}},
                "properties": _PROPERTY_BAG,
            },
        },
        "location": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "message": _MESSAGE,
                "physicalLocation": {
                    "type": "object",
                    "additionalProperties": False,
                    "anyOf": [{"required": ["address"]}, {"required": ["artifactLocation"]}],
                    "properties": {
                        "artifactLocation": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"uri": {"type": "string", "format": "uri-reference"}, "uriBaseId": {"type": "string"}},
                        },
                        "region": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"startLine": {"type": "integer", "minimum": 1}},
                        },
                    },
                },
            },
        },
    },
}


def _validate(log: dict) -> None:
    validator = jsonschema.Draft7Validator(SARIF_SUBSET_SCHEMA, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    json.dumps(log, allow_nan=False)  # SARIF is JSON: no NaN anywhere


def _result(
    verdict: Verdict = Verdict.FAIL,
    suspect: str | None = "stop sign",
    content_hash: str = "12" * 32,
    s_max: float = 3.21,
    reference: str = "hf://acme/clip-pt@0123abcd",
) -> dict:
    names = ("cat", "stop sign", "dog")
    classes = tuple(
        ClassScore(i, n, asr=0.9 if n == suspect else 0.1, loss=0.5, z_asr=0.0, z_loss=0.0, score=0.0, z=0.0, valid=True)
        for i, n in enumerate(names)
    )
    result = ScanResult(
        decision=Decision(verdict, s_max, 2.0, "k", suspect if verdict is Verdict.FAIL else None, "because"),
        classes=classes,
        policy={"epsilon": 4 / 255, "k": 2.0},
        policy_hash="ab" * 32,
        provenance=Provenance(
            reference=reference,
            source="hf",
            path="/cache/acme",
            revision="0123abcd",
            files={"gatekeeper.json": "cd" * 32},
            content_hash=content_hash,
        ),
        pool=PoolInfo("procedural:0", 96, 0, 64, 32, 32, "34" * 32),
        model=ModelInfo(kind="coop", n_classes=3, backbone="ViT-B-32", image_size=32),
        timings={"invert": 1.0},
        environment={"device": "cpu"},
        seed=0,
        command="gatekeeper scan hf://acme/clip-pt@0123abcd",
    )
    d = result_to_dict(result)
    validate_result(d)  # the input is a real result.json
    return d


def test_a_backdoor_is_one_error_result_at_line_1_of_the_artifact():
    log = to_sarif([_result()], "models/clip-pt/gatekeeper.json")
    _validate(log)
    assert log["version"] == "2.1.0" and log["$schema"].startswith("https://") and log["$schema"].endswith("sarif-schema-2.1.0.json")
    driver = log["runs"][0]["tool"]["driver"]
    assert driver["name"] == "gatekeeper" and driver["version"] == __version__ and driver["informationUri"].startswith("https://")
    assert all(rule["help"]["text"] and rule["help"]["markdown"] and rule["shortDescription"]["text"] for rule in driver["rules"])
    [res] = log["runs"][0]["results"]
    assert res["ruleId"] == "gatekeeper/backdoor" and res["level"] == "error"
    assert driver["rules"][res["ruleIndex"]]["id"] == res["ruleId"]
    assert driver["rules"][res["ruleIndex"]]["properties"]["security-severity"] == "9.0"
    loc = res["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "models/clip-pt/gatekeeper.json" and loc["region"]["startLine"] == 1
    text = res["message"]["text"]
    assert "stop sign" in text and "3.21" in text and "2.00" in text and "hf://acme/clip-pt@0123abcd" in text
    assert res["properties"]["suspectClass"] == "stop sign" and res["properties"]["contentHash"] == "12" * 32


def test_pass_is_a_run_without_results_so_an_upload_closes_old_alerts():
    log = to_sarif([_result(Verdict.PASS, None, s_max=0.4)], "policy.yaml")
    _validate(log)
    assert log["runs"][0]["results"] == [] and log["runs"][0]["invocations"] == [{"executionSuccessful": True}]


def test_inconclusive_is_a_warning_and_error_is_an_error_never_clean():
    inconclusive = _result(Verdict.INCONCLUSIVE, None, s_max=math.nan)  # null in result.json
    assert inconclusive["s_max"] is None
    raised = {"verdict": "error", "reason": "model folder not found -> check the path", "provenance": {"reference": "models/x"}}
    log = to_sarif([inconclusive, raised], "models/x/gatekeeper.json")
    _validate(log)
    by_rule = {r["ruleId"]: r for r in log["runs"][0]["results"]}
    assert by_rule["gatekeeper/inconclusive"]["level"] == "warning"
    assert "n/a" in by_rule["gatekeeper/inconclusive"]["message"]["text"]
    assert by_rule["gatekeeper/scan-error"]["level"] == "error"
    assert "not checked" in by_rule["gatekeeper/scan-error"]["message"]["text"]
    assert "model folder not found" in by_rule["gatekeeper/scan-error"]["message"]["text"]
    assert log["runs"][0]["invocations"] == [{"executionSuccessful": False}]


def test_fingerprints_are_stable_per_model_bytes_and_class():
    def fp(**kw: object) -> str:
        [res] = to_sarif([_result(**kw)], "a")["runs"][0]["results"]  # type: ignore[arg-type]
        return next(iter(res["partialFingerprints"].values()))

    assert fp() == fp(s_max=5.0)  # a re-scan of the same bytes updates the same alert
    assert fp() != fp(suspect="dog")
    assert fp() != fp(content_hash="99" * 32)


def test_uris_are_relative_posix_and_percent_encoded():
    assert path_to_uri("./models/my model/gatekeeper.json") == "models/my%20model/gatekeeper.json"
    assert path_to_uri("models\\a\\gatekeeper.json") == "models/a/gatekeeper.json"
    _validate(to_sarif([_result()], path_to_uri("models/über #1/gatekeeper.json")))


def test_an_unknown_verdict_is_refused():
    with pytest.raises(ValueError, match="verdict"):
        to_sarif([{"verdict": "maybe"}], "a")


def test_the_input_is_not_mutated_and_rules_are_copies():
    result = _result()
    before = json.dumps(result, sort_keys=True)
    log = to_sarif([result], "a")
    log["runs"][0]["tool"]["driver"]["rules"][0]["properties"]["tags"].append("mutated")
    assert json.dumps(result, sort_keys=True) == before
    assert "mutated" not in to_sarif([result], "a")["runs"][0]["tool"]["driver"]["rules"][0]["properties"]["tags"]


# ---------------------------------------------------------------------------- CLI: --sarif, --format json


def test_cli_writes_sarif_and_a_json_line_when_the_scan_cannot_complete(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = Path("models") / "broken"
    model.mkdir(parents=True)
    (model / "gatekeeper.json").write_text("{}")  # not a valid manifest: exit 2 after resolving
    code = main(["scan", str(model), "--out", "out", "--sarif", "out/results.sarif", "--format", "json", "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    line = json.loads(captured.out.strip())
    assert captured.out.count("\n") == 1 and line["verdict"] == "error" and line["exit_code"] == 2
    assert line["report"] is None and line["json"] is None
    log = json.loads(Path("out/results.sarif").read_text())
    _validate(log)
    [res] = log["runs"][0]["results"]
    assert res["ruleId"] == "gatekeeper/scan-error"
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/broken/gatekeeper.json"
    assert not list(Path("out").glob(".results.sarif.*"))  # atomic write leaves no temp file


def test_cli_sarif_points_at_the_policy_when_the_model_is_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pol.yaml").write_text("version: 1\nood_budget: 64\nholdout: 32\nnull_copies: 0\n")
    code = main(["scan", str(tmp_path / "missing"), "--policy", "pol.yaml", "--out", "o", "--sarif", "s.sarif", "--quiet"])
    assert code == 4  # a mistyped model path: a usage error, still reported in SARIF
    res = json.loads(Path("s.sarif").read_text())["runs"][0]["results"][0]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "pol.yaml"
    code = main(["scan", "missing", "--policy", "pol.yaml", "--out", "o", "--sarif", "s.sarif", "--sarif-uri", "deploy/models.yaml"])
    assert code == 4
    res = json.loads(Path("s.sarif").read_text())["runs"][0]["results"][0]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "deploy/models.yaml"


def test_cli_policy_error_is_exit_4_and_still_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("threshold: 2\n")
    code = main(["scan", "m", "--policy", "bad.yaml", "--out", "o", "--sarif", "s.sarif", "--format", "json"])
    line = json.loads(capsys.readouterr().out)
    assert code == 4 and line["verdict"] == "error" and line["exit_code"] == 4
    assert json.loads(Path("s.sarif").read_text())["runs"][0]["results"][0]["ruleId"] == "gatekeeper/scan-error"


def test_format_is_validated_before_anything_runs(tmp_path, capsys):
    assert main(["scan", "m", "--out", str(tmp_path / "o"), "--format", "yaml"]) == 4
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- where an alert points, which category


def _run(log: dict) -> dict:
    return log["runs"][0]


def _uri(log: dict) -> str:
    return _run(log)["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]


def test_two_models_get_their_own_category_and_revisions_of_one_model_share_it():
    """Code scanning closes the alerts of a category that a later upload of it no longer reports: two
    models uploaded from one repository must not share a category, two scans of one model must."""
    a = to_sarif([_result(reference="hf://acme/clip-pt@0123abcd")], "a")
    b = to_sarif([_result(reference="hf://acme/other-clip@0123abcd")], "a")
    a2 = to_sarif([_result(reference="hf://acme/clip-pt@ffff0000")], "a")
    _validate(a)
    ids = [_run(log)["automationDetails"]["id"] for log in (a, b, a2)]
    assert ids[0] == "gatekeeper/hf/acme/clip-pt/" and ids[1] == "gatekeeper/hf/acme/other-clip/"
    assert ids[0] != ids[1] and ids[0] == ids[2]
    mlflow = to_sarif([_result(reference="models:/fraud clip/3")], "a")
    assert _run(mlflow)["automationDetails"]["id"].startswith("gatekeeper/mlflow/fraud-clip-")  # sanitized + hash
    # the same two models through the CLI's writer: local folders by their path under the repository
    assert model_category("models/a") != model_category("models/b")


def test_local_categories_do_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert model_category("models/m") == model_category("./models/m/") == model_category(str(tmp_path / "models" / "m"))
    assert model_category("models/m") == "gatekeeper/local/models/m"
    # sanitizing never merges two names: a hash is added whenever a character was replaced
    assert default_category("local/a b") != default_category("local/a-b") == "gatekeeper/local/a-b"
    assert len(default_category("local/" + "x" * 5000)) < MAX_CATEGORY


def test_a_remote_model_points_at_a_stand_in_path_never_at_the_policy_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sarif = tmp_path / "r.sarif"
    write_sarif(sarif, _result(), model="hf://acme/clip-pt@0123abcd", policy="default")
    log = json.loads(sarif.read_text())
    _validate(log)
    loc = _run(log)["results"][0]["locations"][0]
    assert _uri(log) == "hf/acme/clip-pt" != "default"
    assert "hf://acme/clip-pt@0123abcd" in loc["message"]["text"] and "not a file" in loc["message"]["text"]
    assert _run(log)["automationDetails"]["id"] == "gatekeeper/hf/acme/clip-pt/"
    # a policy file in the repository does not capture a remote model's alert either
    Path("pol.yaml").write_text("version: 1\n")
    assert sarif_location("hf://acme/clip-pt", "pol.yaml").uri == "hf/acme/clip-pt"
    # MLflow: the registered name, percent-encoded, no version or alias (one location per model)
    assert sarif_location("models:/fraud clip/3", "default").uri == "mlflow/fraud%20clip"
    assert sarif_location("models:/fraud clip@champion", "default").uri == "mlflow/fraud%20clip"
    assert remote_location("models:/../../etc/1") == "mlflow/etc" and remote_location("models/m") is None
    # a local folder outside the repository with a shipped policy: a stand-in, not 'default'
    target = sarif_location(str(tmp_path.parent / "elsewhere"), "default")
    assert target.uri == "local/elsewhere/gatekeeper.json" and target.note
    # a local model in the repository: its manifest (what GitHub can open)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "gatekeeper.json").write_text("{}")
    assert sarif_location("./models/m", "default") == type(target)("models/m/gatekeeper.json")


def test_the_sarif_category_flag_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pol.yaml").write_text("version: 1\nood_budget: 64\nholdout: 32\nnull_copies: 0\n")
    args = ["scan", "missing", "--policy", "pol.yaml", "--out", "o", "--sarif", "s.sarif", "--quiet"]
    assert main(args) == 4  # a mistyped model path: reported in SARIF all the same
    assert _run(json.loads(Path("s.sarif").read_text()))["automationDetails"]["id"] == "gatekeeper/local/missing/"
    assert main([*args, "--sarif-category", "team-a/clip"]) == 4
    log = json.loads(Path("s.sarif").read_text())
    _validate(log)
    assert _run(log)["automationDetails"]["id"] == "team-a/clip/"
    assert _run(to_sarif([_result()], "a", category="ml/gate/"))["automationDetails"]["id"] == "ml/gate/"


@pytest.mark.parametrize("bad", ["", "   ", "/", "a\nb", "a\x07b", "tab\there", "a\u2028b", " lead", "x" * (MAX_CATEGORY + 1)])
def test_a_bad_sarif_category_is_a_usage_error_before_anything_runs(tmp_path, bad, capsys):
    with pytest.raises(UsageError):
        validate_category(bad)
    with pytest.raises(UsageError):
        to_sarif([_result()], "a", category=bad)
    out = tmp_path / "o"
    code = main(["scan", str(tmp_path / "m"), "--out", str(out), "--sarif", str(tmp_path / "s.sarif"), "--sarif-category", bad])
    assert code == ExitCode.USAGE == 4
    assert "--sarif-category" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.sarif").exists()  # nothing was scanned or written


def test_good_categories_are_kept():
    assert validate_category("gatekeeper/hf/acme/clip-pt") == "gatekeeper/hf/acme/clip-pt"
    assert validate_category("modèle CLIP #2") == "modèle CLIP #2"  # printable Unicode and spaces inside are fine
    assert validate_category("x" * MAX_CATEGORY) == "x" * MAX_CATEGORY
