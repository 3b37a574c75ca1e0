"""schemas/policy.schema.json (for editors and check-jsonschema) agrees with the policy loader."""

from __future__ import annotations

import json
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from gatekeeper import policy as loader
from gatekeeper.errors import PolicyError
from gatekeeper.policy import POLICY_KEYS, load_policy, policy_from_mapping
from gatekeeper.resources import data_path
from gatekeeper.untrusted import load_yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "schemas" / "policy.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
PROPS = SCHEMA["properties"]
SHA = "ab" * 32


def as_json(value: Any) -> Any:
    """What an editor or check-jsonschema sees: a YAML date is its ISO string."""
    return json.loads(json.dumps(value, default=lambda v: v.isoformat() if isinstance(v, date) else str(v)))


def schema_errors(raw: Any) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(as_json(raw))]


def test_the_schema_is_valid_draft_2020_12():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["additionalProperties"] is False


def test_the_schema_names_exactly_the_keys_the_loader_accepts():
    assert set(PROPS) == set(POLICY_KEYS)
    assert all(PROPS[key].get("description") for key in PROPS)


def test_ranges_and_choices_match_the_loader():
    for key, (lo, hi) in {**loader._INT_RANGES, **loader._FLOAT_RANGES}.items():
        assert (PROPS[key]["minimum"], PROPS[key]["maximum"]) == (lo, hi), key
        assert PROPS[key]["type"] == ("integer" if key in loader._INT_RANGES else "number"), key
    enums: dict[str, type[Enum]] = {
        "detector": loader.Detector, "scoring": loader.Scoring, "implementation": loader.Implementation,
        "on_inconclusive": loader.OnInconclusive, "positive_control": loader.PositiveControl,
    }
    for key, cls in enums.items():
        assert {v for v in PROPS[key]["enum"] if v is not False} == {m.value for m in cls}, key
    number = PROPS["epsilon"]["oneOf"][0]
    assert number["maximum"] == loader.MAX_EPSILON and number["exclusiveMinimum"] == 0
    assert PROPS["extra_epsilons"]["anyOf"][1]["maxItems"] == loader.MAX_EXTRA_EPSILONS
    assert PROPS["accepted_findings"]["anyOf"][1]["maxItems"] == loader.MAX_ACCEPTED
    cal = PROPS["calibration"]["anyOf"][1]["properties"]
    assert (cal["tau"]["minimum"], cal["tau"]["maximum"]) == loader.TAU_RANGE
    assert set(cal) == set(loader.Calibration.__dataclass_fields__)
    assert set(PROPS["accepted_findings"]["anyOf"][1]["items"]["properties"]) == set(loader.AcceptedFinding.__dataclass_fields__)


def test_every_shipped_policy_validates():
    files = sorted(data_path("policies").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        assert schema_errors(load_yaml(f, str(f))) == [], f


def test_defaults_in_the_schema_are_the_policy_defaults():
    default = load_policy("default").to_dict()
    for key, spec in PROPS.items():
        if key in ("version", "epsilon", "candidates"):
            continue
        assert spec["default"] == default[key], key
    assert load_policy("default").epsilon == pytest.approx(4 / 255) and PROPS["epsilon"]["default"] == "4/255"


VALID = [
    {},
    {"epsilon": 0.03, "candidates": 5, "positive_control": False},
    {"epsilon": "8 / 255", "extra_epsilons": ["16/255", 0.125], "candidates": "all"},
    {"scoring": "paper", "calibration": {"tau": 1.5, "n_candidates": 10, "ood_budget": 1000, "epsilon": "4/255"}},
    {"accepted_findings": [{"class_name": "cat", "model_sha256": SHA, "reason": "reviewed", "expires": date(2030, 1, 1)}]},
    {"detector": "neural-cleanse", "scoring": "differential", "calibration": None, "extra_epsilons": []},
]


@pytest.mark.parametrize("raw", VALID)
def test_valid_policies_pass_both(raw):
    policy_from_mapping(raw)
    assert schema_errors(raw) == []


INVALID = [
    {"threshold": 2},  # unknown key
    {"Epsilon": "4/255"},  # keys are case-sensitive
    {"epsilon": 1},  # out of range
    {"epsilon": 0},
    {"epsilon": True},
    {"epsilon": "four"},
    {"detector": "magic"},  # bad enum
    {"scoring": "z-score"},
    {"on_inconclusive": "maybe"},
    {"positive_control": True},
    {"version": 2},
    {"batch_size": 0},
    {"batch_size": "32"},
    {"lr": 20},
    {"seed": -1},
    {"candidates": 1},
    {"extra_epsilons": ["16/255", "16/255"]},
    {"extra_epsilons": ["8/255", "16/255", "24/255", "32/255"]},
    {"extra_epsilons": ["16/255"], "scoring": "paper"},
    {"calibration": {"tau": 1.5, "n_candidates": 10, "ood_budget": 1000, "epsilon": "4/255"}},  # lift: no tau
    {"scoring": "paper", "calibration": {"tau": 1.5}},
    {"accepted_findings": [{"class_name": "cat", "model_sha256": "xyz", "reason": "r", "expires": "2030-01-01"}]},
    {"accepted_findings": [{"class_name": "cat", "model_sha256": SHA, "reason": "r", "expires": "soon"}]},
]


@pytest.mark.parametrize("raw", INVALID, ids=lambda raw: json.dumps(raw)[:60])
def test_invalid_policies_are_refused_by_both(raw):
    with pytest.raises(PolicyError):
        policy_from_mapping(raw)
    assert schema_errors(raw), raw
