"""The YAML policy, parsed once at the edge into a validated, frozen :class:`Policy`.

Unknown keys, wrong types and out-of-range values are refused with a :class:`PolicyError`
that names the file, the key and what is allowed. Defaults ship as data in ``policies/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from datetime import date
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import Any

from gatekeeper.errors import PolicyError
from gatekeeper.resources import data_path
from gatekeeper.untrusted import CONTROL, DocumentError, inert, load_yaml, short

POLICY_VERSION = 1
PROJECT_POLICY = ".gatekeeper.yaml"  # a project's policy, used when a command is given no --policy


class Detector(str, Enum):
    """Which trigger inversion runs: the paper's, or one of the two baselines it compares against."""

    CLIP_INSPECTOR = "clip-inspector"
    NEURAL_CLEANSE = "neural-cleanse"  # mask + pattern, l1 with NC's dynamic cost, MAD over mask norms
    PIXEL_BACKDOOR = "pixel-backdoor"  # +/- pixel patterns, differentiable pixel count, MAD over counts


class Scoring(str, Enum):
    """How CLIP-Inspector's per-class metrics become anomaly scores.

    ``paper``: Eq. 6-7 on the delivered model. ``differential``: the same inversion also runs on
    the public, un-tuned backbone used zero-shot with the same class names, and each class is
    scored by how much easier it became (ASR up, loss down) in the delivered model. Both
    z-standardise over the model's own classes, and compare the largest z with k or tau.

    ``lift``: absolute evidence per class, independent of the other classes: the inverted
    trigger's ASR minus the public backbone's under the same budget, with a binomial lower
    bound (``gatekeeper.evidence``), compared with a null margin for clean prompt tuning of this
    backbone (``gatekeeper.null``). Every class that clears it is flagged; any K >= 2 works.
    """

    PAPER = "paper"
    DIFFERENTIAL = "differential"
    LIFT = "lift"

    @property
    def uses_reference(self) -> bool:
        """Whether this scoring needs the same inversion on the public backbone."""
        return self is not Scoring.PAPER

    @property
    def standardised(self) -> bool:
        """Whether this scoring z-standardises over the candidates (needs >= 3; k/tau apply)."""
        return self is not Scoring.LIFT


class PositiveControl(str, Enum):
    """Before a PASS: plant a known backdoor in a copy of the candidate and require the scan to see it."""

    OFF = "off"
    BADCLIP = "badclip"


class Implementation(str, Enum):
    """Same numbers either way (tests/inversion/test_fast.py); ``reference`` is the plain Algorithm 1 loop."""

    FAST = "fast"
    REFERENCE = "reference"


class OnInconclusive(str, Enum):
    FAIL = "fail"  # exit 3: the gate fails closed (default)
    PASS = "pass"  # exit 0, the report still says inconclusive


@dataclass(frozen=True)
class Calibration:
    """A threshold tau on s_max from `gatekeeper calibrate`; valid only for the same |C| and budget."""

    tau: float
    n_candidates: int
    ood_budget: int
    epsilon: float
    pool: str | None = None  # the OOD pool it was made on (procedural:SEED, dir:PATH), as scans record it
    pool_hash: str | None = None  # sha256 of that pool's pixels


_CALIBRATION_OPTIONAL = ("pool", "pool_hash")

@dataclass(frozen=True)
class AcceptedFinding:
    """A flagged class a reviewer accepted for one exact model, until a date (pip-audit's
    ``--ignore-vuln``, trivy's ``.trivyignore``): it no longer fails the gate, and the report says so."""

    class_name: str
    model_sha256: str  # the scanned model's content hash (result.json provenance.content_hash)
    reason: str
    expires: str  # ISO date, inclusive; after it the finding fails the gate again


@dataclass(frozen=True)
class Policy:
    """Validated scan policy. See ``policies/default.yaml`` for the meaning of each field."""

    detector: Detector = Detector.CLIP_INSPECTOR
    epsilon: float = 4 / 255
    batch_size: int = 32
    epochs: int = 1
    lr: float = 0.1
    ood_budget: int = 1000
    holdout: int = 500
    candidates: int | None = None  # None: all classes; N: a seeded sample of N
    k: float = 2.0
    min_trigger_asr: float = 0.5
    scoring: Scoring = Scoring.LIFT  # absolute evidence per class (docs/policy.md, "The verdict")
    positive_control: PositiveControl = PositiveControl.OFF
    restarts: int = 2  # CLIP-Inspector: inversions per class from different seeds; the best (highest ASR) counts
    implementation: Implementation = Implementation.FAST
    calibration: Calibration | None = None
    on_inconclusive: OnInconclusive = OnInconclusive.FAIL
    seed: int = 0
    alpha: float = 0.01  # lift: family-wise chance that sampling noise alone flags a class of a clean model
    lift_margin: float = 0.10  # lift: the null margin's floor (ASR points clean tuning may add to a class)
    null_copies: int = 2  # lift: clean prompt learners tuned on the user's backbone to measure the null margin
    extra_epsilons: tuple[float, ...] = ()  # lift: further l-inf budgets every class is also inverted at
    accepted_findings: tuple[AcceptedFinding, ...] = ()  # reviewed findings that no longer fail the gate
    screen_keep: int = 64  # more candidates than this: a short screening inversion keeps this many per budget (0: off)
    screen_images: int = 128  # OOD images the screening trains on (and as many more it judges on)
    source_file: str = ""

    @property
    def budgets(self) -> tuple[float, ...]:
        """Every l-inf budget the scan inverts at: ``epsilon`` first, then ``extra_epsilons``."""
        return (self.epsilon, *self.extra_epsilons)

    def at_budget(self, epsilon: float) -> Policy:
        """This policy scanning at one budget only (what each budget's inversion runs under)."""
        return replace(self, epsilon=epsilon, extra_epsilons=())

    def n_tests(self, n_candidates: int) -> int:
        """How many lift tests a scan of ``n_candidates`` classes makes (Bonferroni's divisor)."""
        return n_candidates * len(self.budgets)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready view (enums as strings, no source_file)."""
        out = asdict(self)
        out.pop("source_file")
        out["extra_epsilons"] = list(self.extra_epsilons)
        out["accepted_findings"] = [asdict(f) for f in self.accepted_findings]
        if out["calibration"] is not None:  # a calibration without a recorded pool keeps its old digest
            out["calibration"] = {k: v for k, v in out["calibration"].items() if v is not None or k not in _CALIBRATION_OPTIONAL}
        for key, value in list(out.items()):
            if isinstance(value, Enum):
                out[key] = value.value
        return out

    def digest(self) -> str:
        """sha256 of the canonical JSON of the effective policy."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def threshold(self, n_candidates: int, pool_hash: str | None = None) -> tuple[float, str]:
        """The operating point on s_max: tau if calibrated (and valid), else k.

        ``pool_hash``: the scan's OOD pool (its pixels' sha256), checked against the pool tau was
        calibrated on where the calibration records one.

        Raises:
            PolicyError: tau was calibrated for a different |C|, OOD budget or OOD pool.
        """
        cal = self.calibration
        if cal is None:
            return self.k, "k"
        if cal.pool_hash and pool_hash and cal.pool_hash != pool_hash:
            raise PolicyError(
                f"calibrated tau={cal.tau:.3f} was measured on the OOD pool {cal.pool or 'recorded'} "
                f"(pixels sha256 {cal.pool_hash[:12]}), but this scan's pool has sha256 {pool_hash[:12]}",
                f"scan with --ood {cal.pool}" if cal.pool else "re-run `gatekeeper calibrate` on this pool",
                file=self.source_file,
                key="calibration",
            )
        if cal.n_candidates != n_candidates or cal.ood_budget != self.ood_budget:
            raise PolicyError(
                f"calibrated tau={cal.tau:.3f} is valid for |C|={cal.n_candidates} and "
                f"ood_budget={cal.ood_budget}, but this scan has |C|={n_candidates} and "
                f"ood_budget={self.ood_budget}",
                "re-run `gatekeeper calibrate` for this setting or remove `calibration`",
                file=self.source_file,
                key="calibration",
            )
        return cal.tau, "tau"


# ---------------------------------------------------------------------------- parsing

# Every top-level key a policy file may hold (schemas/policy.schema.json lists the same, tested).
POLICY_KEYS = frozenset({f.name for f in fields(Policy)} - {"source_file"} | {"version"})

_INT_RANGES: dict[str, tuple[int, int]] = {
    "batch_size": (1, 4096),
    "epochs": (1, 100),
    "ood_budget": (8, 1_000_000),
    "holdout": (8, 1_000_000),
    "seed": (0, 2**31 - 1),
    "restarts": (1, 16),
    "null_copies": (0, 32),
    "screen_keep": (0, 1_000_000),
    "screen_images": (8, 100_000),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "lr": (1e-6, 10.0),
    "k": (0.0, 100.0),
    "min_trigger_asr": (0.0, 1.0),
    "alpha": (1e-6, 0.5),
    "lift_margin": (0.0, 0.95),
}
TAU_RANGE = (0.0, 100.0)  # a tau on the z-score s_max; K classes cap s_max at sqrt(K - 1)
MAX_EPSILON = 64 / 255


def parse_epsilon(value: Any, file: str = "", key: str = "epsilon") -> float:
    """Accept a number or a fraction string such as ``"4/255"``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            eps = float(Fraction(value.replace(" ", "")))
        elif isinstance(value, (int, float)):
            eps = float(value)
        else:
            raise ValueError
    except (ValueError, ZeroDivisionError):
        raise PolicyError(
            f"{file or 'policy'}: key '{key}' must be a number or a fraction like \"4/255\", got {short(value)}",
            f"write e.g. {key}: 4/255" if key == "epsilon" else f"write e.g. {key}: [16/255]",
            file=file,
            key=key,
        ) from None
    if not 0 < eps <= MAX_EPSILON:  # NaN fails too
        raise PolicyError(
            f"{file or 'policy'}: key '{key}' = {short(value)} is outside (0, 64/255]",
            "the l-inf trigger budget must be positive and at most 64/255",
            file=file,
            key=key,
        )
    return eps


MAX_EXTRA_EPSILONS = 3
MAX_ACCEPTED = 100
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _accepted_findings(value: Any, file: str) -> tuple[AcceptedFinding, ...]:
    """Each entry: class_name, model_sha256 (64 hex), reason (one printable line), expires (a date)."""
    names = [f.name for f in fields(AcceptedFinding)]

    def bad(what: str) -> PolicyError:
        return PolicyError(
            f"{file or 'policy'}: key 'accepted_findings': {what}",
            "each entry needs class_name, model_sha256 (provenance.content_hash of the reviewed result.json), "
            "reason and expires (YYYY-MM-DD)",
            file=file,
            key="accepted_findings",
        )

    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ACCEPTED:
        raise bad(f"must be a list of at most {MAX_ACCEPTED} entries, got {short(value)}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != set(names):
            raise bad(f"entry {i + 1} must be a mapping with exactly {names}, got {short(entry)}")
        name, sha, reason, expires = (entry[n] for n in names)
        if not isinstance(name, str) or not name.strip() or len(name) > 200 or CONTROL.search(name):
            raise bad(f"entry {i + 1}: class_name {short(name)} is not a class name")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise bad(f"entry {i + 1}: model_sha256 {short(sha)} is not 64 lowercase hex digits")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 300 or CONTROL.search(reason):
            raise bad(f"entry {i + 1}: reason must be one printable line of at most 300 characters")
        try:
            day = expires if isinstance(expires, date) else date.fromisoformat(str(expires))
        except ValueError:
            raise bad(f"entry {i + 1}: expires {short(expires)} is not a date (YYYY-MM-DD)") from None
        out.append(AcceptedFinding(name, sha, reason, day.isoformat()))
    return tuple(out)


def _extra_epsilons(value: Any, file: str) -> tuple[float, ...]:
    """A list of distinct budgets (each as ``epsilon`` accepts), at most MAX_EXTRA_EPSILONS; sorted."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_EXTRA_EPSILONS:
        raise PolicyError(
            f"{file or 'policy'}: key 'extra_epsilons' must be a list of at most {MAX_EXTRA_EPSILONS} budgets, got {short(value)}",
            "write e.g. extra_epsilons: [16/255]",
            file=file,
            key="extra_epsilons",
        )
    eps = [parse_epsilon(v, file, key="extra_epsilons") for v in value]
    if len({round(e, 12) for e in eps}) != len(eps):
        raise PolicyError(
            f"{file or 'policy'}: key 'extra_epsilons' lists a budget twice: {short(value)}",
            "list each budget once",
            file=file,
            key="extra_epsilons",
        )
    return tuple(sorted(eps))


def _enum(cls: type[Enum], key: str, value: Any, file: str) -> Any:
    allowed = [m.value for m in cls]  # type: ignore[attr-defined]
    if value not in allowed:
        raise PolicyError(
            f"{file or 'policy'}: key '{key}' = {short(value)} is not allowed; allowed: {', '.join(map(str, allowed))}",
            f"set '{key}' to one of {allowed}",
            file=file,
            key=key,
        )
    return cls(value)


def _number(key: str, value: Any, file: str, kind: type, bounds: tuple[float, float] | None = None) -> Any:
    """A strict integer (``kind=int``: no bool, float or string) or a finite number, within its range."""
    lo, hi = bounds or (_INT_RANGES if kind is int else _FLOAT_RANGES)[key]
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise PolicyError(
            f"{file or 'policy'}: key '{key}' must be {'an integer' if kind is int else 'a number'}, got {short(value)}",
            f"set '{key}' to a value in [{lo}, {hi}]",
            file=file,
            key=key,
        )
    if not lo <= value <= hi:  # NaN and +-inf fail here
        raise PolicyError(
            f"{file or 'policy'}: key '{key}' = {short(value)} is out of range [{lo}, {hi}]",
            f"set '{key}' to a value in [{lo}, {hi}]",
            file=file,
            key=key,
        )
    return kind(value)


def _calibration(value: Any, file: str) -> Calibration | None:
    if value is None:
        return None
    names = [f.name for f in fields(Calibration) if f.name not in _CALIBRATION_OPTIONAL]
    if not isinstance(value, dict) or not set(names) <= set(value) <= {*names, *_CALIBRATION_OPTIONAL}:
        raise PolicyError(
            f"{file or 'policy'}: key 'calibration' must be a mapping with exactly {names} (and optionally "
            f"{list(_CALIBRATION_OPTIONAL)})",
            "write it with `gatekeeper calibrate` rather than by hand",
            file=file,
            key="calibration",
        )
    return Calibration(
        tau=_number("calibration.tau", value["tau"], file, float, TAU_RANGE),
        n_candidates=_number("calibration.n_candidates", value["n_candidates"], file, int, (3, 1_000_000)),
        ood_budget=_number("calibration.ood_budget", value["ood_budget"], file, int, _INT_RANGES["ood_budget"]),
        epsilon=parse_epsilon(value["epsilon"], file),
        pool=_pool_text("calibration.pool", value.get("pool"), file),
        pool_hash=_pool_text("calibration.pool_hash", value.get("pool_hash"), file),
    )


def _pool_text(key: str, value: Any, file: str) -> str | None:
    """A recorded pool source or hash: informational, a short printable string."""
    if value is None or (isinstance(value, str) and 0 < len(value) <= 4096 and not CONTROL.search(value)):
        return value
    raise PolicyError(
        f"{file or 'policy'}: {key} must be a short string, got {short(value)}",
        "write it with `gatekeeper calibrate` rather than by hand",
        file=file,
        key=key,
    )


def policy_from_mapping(raw: Any, file: str = "") -> Policy:
    """Validate a mapping (already parsed YAML) into a Policy.

    Raises:
        PolicyError: unknown key, wrong type or out-of-range value (names file and key).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(
            f"{file or 'policy'}: the top level must be a mapping of keys to values, got {type(raw).__name__}",
            "see policies/default.yaml for the format",
            file=file,
        )
    for key in raw:
        if key not in POLICY_KEYS:
            raise PolicyError(
                f"{file or 'policy'}: unknown key {short(key)}; allowed keys: {', '.join(sorted(POLICY_KEYS))}",
                "remove or fix the key (keys are case-sensitive)",
                file=file,
                key=inert(str(key), 80),
            )
    version = raw.get("version", POLICY_VERSION)
    if version != POLICY_VERSION:
        raise PolicyError(
            f"{file or 'policy'}: key 'version' = {short(version)} is not supported; allowed: {POLICY_VERSION}",
            "upgrade gatekeeper or rewrite the policy for version 1",
            file=file,
            key="version",
        )
    kw: dict[str, Any] = {"source_file": file}
    for key, value in raw.items():
        if key == "version":
            continue
        if key == "epsilon":
            kw[key] = parse_epsilon(value, file)
        elif key in _INT_RANGES:
            kw[key] = _number(key, value, file, int)
        elif key in _FLOAT_RANGES:
            kw[key] = _number(key, value, file, float)
        elif key == "detector":
            kw[key] = _enum(Detector, key, value, file)
        elif key == "scoring":
            kw[key] = _enum(Scoring, key, value, file)
        elif key == "positive_control":
            # YAML 1.1 reads a bare `off` as false
            kw[key] = _enum(PositiveControl, key, "off" if value is False else value, file)
        elif key == "on_inconclusive":
            kw[key] = _enum(OnInconclusive, key, value, file)
        elif key == "implementation":
            kw[key] = _enum(Implementation, key, value, file)
        elif key == "candidates":
            if value in (None, "all"):
                kw[key] = None
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                kw[key] = value
            else:
                raise PolicyError(
                    f"{file or 'policy'}: key 'candidates' = {short(value)}; allowed: \"all\" or an integer >= 2",
                    "scan all classes, or a sample of at least 2 (3 for the z-score scorings)",
                    file=file,
                    key=key,
                )
        elif key == "calibration":
            kw[key] = _calibration(value, file)
        elif key == "extra_epsilons":
            kw[key] = _extra_epsilons(value, file)
        elif key == "accepted_findings":
            kw[key] = _accepted_findings(value, file)
    policy = Policy(**kw)
    if policy.calibration is not None and not policy.scoring.standardised:
        raise PolicyError(
            f"{file or 'policy'}: 'calibration' sets a tau on the z-score s_max, but scoring '{policy.scoring.value}' "
            "compares each class with a null margin",
            "remove 'calibration' (the lift rule takes lift_margin and null_copies), or use scoring: differential",
            file=file,
            key="calibration",
        )
    if policy.extra_epsilons and policy.scoring.standardised:
        raise PolicyError(
            f"{file or 'policy'}: 'extra_epsilons' needs scoring: lift (each budget is its own test against the null margin); "
            f"scoring '{policy.scoring.value}' z-standardises one budget's scores",
            "remove 'extra_epsilons', or use scoring: lift",
            file=file,
            key="extra_epsilons",
        )
    if any(abs(e - policy.epsilon) < 1e-12 for e in policy.extra_epsilons):
        raise PolicyError(
            f"{file or 'policy'}: 'extra_epsilons' repeats 'epsilon' ({policy.epsilon * 255:.3g}/255)",
            "list only budgets other than epsilon",
            file=file,
            key="extra_epsilons",
        )
    if policy.calibration is not None and abs(policy.calibration.epsilon - policy.epsilon) > 1e-9:
        raise PolicyError(
            f"{file or 'policy'}: calibration was made at epsilon={policy.calibration.epsilon:.5f} "
            f"but the policy scans at epsilon={policy.epsilon:.5f}",
            "re-calibrate at this epsilon or restore the calibrated one",
            file=file,
            key="calibration",
        )
    return policy


def load_policy(path: str | Path | None) -> Policy:
    """Read and validate a policy file; ``None`` or a bare name loads a shipped policy.

    Args:
        path: a YAML file, or the name of a shipped policy (``default``, ``tiny-world``).

    Raises:
        PolicyError: the file is missing, not YAML, or fails validation.
    """
    if path is None:
        path = "default"
    p = Path(path)
    if not p.exists() and p.suffix == "" and "/" not in str(path):
        shipped = data_path("policies") / f"{path}.yaml"
        if shipped.exists():
            p = shipped
    if not p.is_file():
        shipped_names = sorted(x.stem for x in data_path("policies").glob("*.yaml"))
        raise PolicyError(
            f"policy file not found: {path}",
            f"give a YAML file path or one of the shipped policies: {', '.join(shipped_names)}",
            file=str(path),
        )
    try:
        raw = load_yaml(p, str(p))
    except DocumentError as exc:
        raise PolicyError(str(exc), "fix the policy file (plain YAML, each key once)", file=str(p)) from None
    return policy_from_mapping(raw, str(p))


def find_project_policy(cwd: Path) -> Path | None:
    """The project's policy file, ``cwd/.gatekeeper.yaml``, when there is one.

    Anything at that name counts, a folder or a dangling link included, so that it fails to load
    (exit 4) rather than being passed over for the shipped default.

    Args:
        cwd: the folder a command runs in (``Path()`` from the CLI, so the path stays relative).

    Returns:
        The path, or ``None`` when the folder has no ``.gatekeeper.yaml``.
    """
    path = cwd / PROJECT_POLICY
    return path if os.path.lexists(path) else None


def load_project_policy(path: str | Path) -> Policy:
    """:func:`load_policy` for a discovered project policy: an error also says where the file came from.

    Raises:
        PolicyError: as :func:`load_policy`, the hint naming the file as the discovered project policy.
    """
    try:
        return load_policy(path)
    except PolicyError as exc:
        note = f"{path} was used because no --policy was given (the project policy in the working directory)"
        raise PolicyError(
            exc.message, f"{exc.hint}; {note}" if exc.hint else note, file=exc.file or str(path), key=exc.key
        ) from None


def resolve_policy(given: str | None, cwd: Path, fallback: str = "default") -> tuple[str, bool]:
    """Which policy a command uses: ``--policy`` if given, else the project's ``.gatekeeper.yaml``
    in ``cwd`` (validated now), else ``fallback`` (the shipped default).

    Returns:
        The policy argument for :func:`load_policy`, and whether it was discovered in ``cwd``.

    Raises:
        PolicyError: the discovered file is invalid (the message names it).
    """
    if given is not None:
        return given, False
    found = find_project_policy(cwd)
    if found is None:
        return fallback, False
    load_project_policy(found)
    return str(found), True
