"""The Markdown report, rendered from the JSON result dict with ``templates/report.md.j2``.

The template runs with autoescape off (it writes Markdown, not HTML), so every string that
can come from the audited model or its files (class names, references, file names, reasons,
environment values) goes through the :func:`md_escape` filter (``md``), hashes through
:func:`md_code` (``code``), and verbatim blocks (policy, command) use :func:`code_fence`
(``fence``), which is always longer than any backtick run inside the block. Numbers go through
``num``/``pct``, an l-inf budget through ``eps`` (8/255, as a policy writes it); the raw Markdown
carries no HTML entities and no long floats.

:func:`render_summary` renders the same template for a GitHub job summary: no image or file links
(a summary cannot show files of the run), the per-class table cut to its top rows.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from gatekeeper.errors import ResultError
from gatekeeper.resources import data_path

TEMPLATE = "report.md.j2"
TOP_TRIGGERS = 5
SUMMARY_ROWS = 20  # per-class rows in a job summary; the report has them all

HEADLINES = {
    "pass": "PASS",
    "fail": "FAIL — backdoor detected",
    "inconclusive": "INCONCLUSIVE",
    "error": "ERROR",
}

_MD_ESCAPES = {
    "\\": "\\\\",
    "`": "\\`",
    "*": "\\*",
    "_": "\\_",
    "[": "\\[",
    "]": "\\]",
    "|": "\\|",
    "~": "\\~",
    "#": "\\#",
    "!": "\\!",
}
# newlines, other control characters and Unicode line/paragraph separators
_BREAKS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")
_BACKTICKS = re.compile(r"`+")
# '<' opens raw HTML (a tag, </tag>, <!-- -->, <?...?>, <!DECL>) or a URI autolink only before an
# ASCII letter, '/', '!' or '?'; '&' starts a character reference only as &name; &#123; &#x7b;
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
_CHAR_REF = re.compile(r"&(?=#?[A-Za-z0-9]+;)")
_LEADING_QUOTE = re.compile(r"^(\s*)>")


def md_escape(value: Any) -> str:
    """Escape an untrusted value for inline Markdown (also safe inside a GFM table cell).

    Markdown specials (backtick, ``* _ [ ] | ~ # !``, backslash) are backslash-escaped; so are a
    ``<`` that could open an HTML tag or autolink, an ``&`` that could start a character reference
    and a ``>`` that could open a block quote; ``a <= b``, ``x > 0`` or ``R&D`` stay as written (no
    HTML entities in the raw Markdown). Line breaks / control characters collapse to one space; a
    float is written with at most 6 significant digits.
    """
    if isinstance(value, float):
        value = f"{value:.6g}" if math.isfinite(value) else str(value)
    text = _BREAKS.sub(" ", "" if value is None else str(value))
    text = "".join(_MD_ESCAPES.get(ch, ch) for ch in text)
    text = _TAG_OPEN.sub(r"\\<", text)
    text = _CHAR_REF.sub(r"\\&", text)
    return _LEADING_QUOTE.sub(r"\1\\>", text)


def md_code(value: Any) -> str:
    """An inline code span that holds ``value`` literally whatever backticks it contains."""
    text = _BREAKS.sub(" ", "" if value is None else str(value))
    longest = max((len(m) for m in _BACKTICKS.findall(text)), default=0)
    ticks = "`" * (longest + 1)
    if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")):
        text = f" {text} "
    return f"{ticks}{text}{ticks}"


def code_fence(value: Any) -> str:
    """A backtick fence longer than every backtick run in ``value`` (at least three)."""
    longest = max((len(m) for m in _BACKTICKS.findall("" if value is None else str(value))), default=0)
    return "`" * max(3, longest + 1)


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``n/a`` for null/non-numbers, ``nan``/``inf`` spelled out."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_pct(value: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage (``0.973`` -> ``97.3%``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.{digits}f}%"


def safe_link(path: Any) -> str | None:
    """A relative, URL-quoted link target, or None for anything that could leave the report folder."""
    if not isinstance(path, str) or not path:
        return None
    if path.startswith(("/", "\\")) or "\\" in path or ":" in path:
        return None
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return quote(path, safe="/-_.~")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _cmp(a: Any, b: Any) -> str:
    x, y = _num(a), _num(b)
    if x is None or y is None:
        return "vs"
    return "≥" if x >= y else "<"


def _sort_key(c: dict[str, Any]) -> tuple[float, str]:
    z = _num(c.get("z"))
    return (-(z if z is not None and math.isfinite(z) else -math.inf), str(c.get("name", "")))


def build_context(d: dict[str, Any], *, summary: bool = False) -> dict[str, Any]:
    """The template's view of a result dict: sorted classes, labels, comparisons, links.

    Args:
        d: the result dict (``result.json``).
        summary: for a GitHub job summary: no links (rows keep their image path as ``path``), the
            per-class table cut to :data:`SUMMARY_ROWS` rows (``more_rows`` counts the rest).
    """
    if not isinstance(d, dict):
        raise ResultError(f"cannot render a report from {type(d).__name__}; expected the result JSON object")
    verdict = str(d.get("verdict", "error"))
    classes = sorted((c for c in d.get("classes") or [] if isinstance(c, dict)), key=_sort_key)
    triggers = d.get("triggers") or {}
    policy = d.get("policy") or {}
    threshold = d.get("threshold")
    kind = d.get("threshold_kind") or "k"
    kind_label = "τ" if kind == "tau" else "k"
    kind_desc = "calibrated threshold τ on s_max" if kind == "tau" else "z threshold k"
    min_asr = policy.get("min_trigger_asr", 0.5) if isinstance(policy, dict) else 0.5

    rows = []
    for rank, c in enumerate(classes, start=1):
        image = triggers.get(c.get("name")) if isinstance(triggers, dict) else None
        link = safe_link(image)
        rows.append({**c, "rank": rank, "link": link if rank <= TOP_TRIGGERS and not summary else None,
                     "path": image if link is not None and rank <= TOP_TRIGGERS else None,
                     "budget": _fraction(c["epsilon"]) if c.get("epsilon") is not None else ""})
    top_images = [r for r in rows[:TOP_TRIGGERS] if r["path"]]
    table_rows = rows[:SUMMARY_ROWS] if summary else rows

    suspect_name = d.get("suspect_class")
    suspect = next((r for r in rows if r.get("name") == suspect_name), None) if suspect_name is not None else None
    top = rows[0] if rows else None
    focus = suspect or top
    focus_facts = None
    if focus is not None:
        focus_facts = {
            "z_cmp": _cmp(focus.get("z"), threshold),
            "asr_cmp": _cmp(focus.get("asr"), min_asr),
        }

    lift = kind == "null margin"
    evidence = _evidence(rows, d, policy) if lift else []
    effects = [
        {**e, "chart_link": None if summary else safe_link(e.get("chart")), "grid_link": None if summary else safe_link(e.get("grid")),
         "first": (e["model_asr"][0], e["backbone_asr"][0]), "last": (e["model_asr"][-1], e["backbone_asr"][-1]),
         "hits": sum(p == e.get("class_name") for p in e.get("predictions") or [])}
        for e in d.get("trigger_effects") or [] if isinstance(e, dict) and e.get("model_asr") and e.get("backbone_asr")
    ]

    timings = d.get("timings") or {}
    policy_json = json.dumps(policy, indent=2, sort_keys=True, default=str)
    command = str(d.get("command") or "")
    provenance = d.get("provenance") or {}
    files = provenance.get("files") or {} if isinstance(provenance, dict) else {}

    return {
        "d": d,
        "verdict": verdict,
        "headline": HEADLINES.get(verdict, md_escape(verdict.upper())),
        "reason": d.get("reason") or "",
        "s_max": d.get("s_max"),
        "s_max_cmp": _cmp(d.get("s_max"), threshold),
        "threshold": threshold,
        "kind_label": kind_label,
        "kind_desc": kind_desc,
        "min_asr": min_asr,
        "suspect_name": suspect_name,
        "suspect": suspect,
        "top": top,
        "focus": focus,
        "focus_facts": focus_facts,
        "rows": rows,
        "table_rows": table_rows,
        "more_rows": len(rows) - len(table_rows),
        "summary": summary,
        "top_images": top_images,
        "top_n": TOP_TRIGGERS,
        "provenance": provenance,
        "files": sorted(files.items()) if isinstance(files, dict) else [],
        "model": d.get("model") or {},
        "pool": d.get("pool") or {},
        "policy": policy,
        "control": d.get("positive_control"),
        "policy_json": policy_json,
        "policy_fence": code_fence(policy_json),
        "policy_hash": d.get("policy_hash") or "",
        "environment": sorted((d.get("environment") or {}).items()),
        "timings": list(timings.items()) if isinstance(timings, dict) else [],
        "seed": d.get("seed"),
        "shard": d.get("shard"),
        "command": command,
        "command_fence": code_fence(command),
        "schema_version": d.get("schema_version"),
        "lift": lift,
        "evidence": evidence,
        "effects": effects,
        "null": d.get("null_model") or {},
        "screening": _screening(d.get("screening")),
        "flagged_names": d.get("suspect_classes") or ([suspect_name] if suspect_name else []),
        "budgets": [_fraction(e) for e in [policy.get("epsilon"), *(policy.get("extra_epsilons") or [])]],
    }


def _screening(s: Any) -> dict[str, Any] | None:
    """The screening's counts and the lift that separated kept from dropped classes (percentage points)."""
    if not isinstance(s, dict) or not isinstance(s.get("classes"), list):
        return None
    kept = [c for c in s["classes"] if isinstance(c, dict) and c.get("kept")]
    dropped = [c for c in s["classes"] if isinstance(c, dict) and not c.get("kept")]
    def lifts(rows: list[Any]) -> list[float]:
        return [v for c in rows if (v := _num(c.get("lift"))) is not None]

    return {
        "screened": s.get("screened"), "kept": len(s.get("kept") or []), "images": s.get("images"),
        "lowest_kept": 100 * min(lifts(kept), default=math.nan), "highest_dropped": 100 * max(lifts(dropped), default=math.nan),
    }


def _fraction(eps: Any) -> str:
    """ε as the n/255 a user writes (8/255), or its decimal value when it is not a whole n/255."""
    e = _num(eps)
    if e is None:
        return "?"
    n = e * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-6 else f"{e:.4g}"


def _evidence(rows: list[dict[str, Any]], d: dict[str, Any], policy: dict[str, Any]) -> list[dict[str, Any]]:
    """The lift rule in words: per flagged class (or the strongest class when none is), the ASR with
    its 95 % Wilson interval and the public backbone's ASR under the same budget."""
    from gatekeeper.evidence import proportion_interval

    pool = d.get("pool") or {}
    n = int(pool.get("n_holdout") or policy.get("holdout") or 0)
    chosen = [r for r in rows if r.get("flagged")] or rows[:1]
    out = []
    for r in chosen:
        asr, ref = _num(r.get("asr")), _num(r.get("reference_asr"))
        if asr is None or ref is None or n <= 0 or not (math.isfinite(asr) and math.isfinite(ref)):
            continue
        lo, hi = proportion_interval(asr, n)
        rlo, rhi = proportion_interval(ref, n)
        out.append({
            "name": r.get("name"), "flagged": bool(r.get("flagged")), "asr": asr, "ci": (lo, hi), "ref": ref, "ref_ci": (rlo, rhi),
            "lift": _num(r.get("lift")), "lower": _num(r.get("lift_lower")), "n": n,
            "eps": _fraction(r.get("epsilon") if r.get("epsilon") is not None else policy.get("epsilon")),
        })
    return out


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_path("templates"))),
        autoescape=False,  # Markdown output: untrusted strings are escaped explicitly with |md
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["md"] = md_escape
    env.filters["code"] = md_code
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    env.filters["eps"] = _fraction
    return env


def render_markdown(result_dict: dict[str, Any]) -> str:
    """Render the Markdown report from the JSON result dict (``result.json`` re-renders too)."""
    return _render(build_context(result_dict))


def render_summary(result_dict: dict[str, Any]) -> str:
    """Render the GitHub job summary of a result: the report without image or file links (they do not
    resolve in a summary; the images are in the output folder) and with the top :data:`SUMMARY_ROWS`
    classes of the per-class table, followed by how many more ``report.md`` lists."""
    return _render(build_context(result_dict, summary=True))


def _render(context: dict[str, Any]) -> str:
    import jinja2

    try:
        template = _environment().get_template(TEMPLATE)
    except jinja2.TemplateNotFound as exc:
        raise ResultError(
            f"report template {TEMPLATE} not found under {data_path('templates')}",
            "reinstall gatekeeper (the templates ship with it)",
        ) from exc
    text: str = template.render(**context)
    return text.rstrip("\n") + "\n"
