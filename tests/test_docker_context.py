"""The Docker build context, assembled exactly as .dockerignore says, builds a complete wheel.

No docker daemon is needed: the test applies .dockerignore's rules itself (patterns, ``**``,
negation with ``!``, the last matching line wins, excluding a folder excludes what it holds),
copies what survives into a temporary folder, and runs the build half of the Dockerfiles' install
step (``pip install /tmp/gatekeeper-src``) on it: ``pip wheel --no-deps --no-build-isolation``.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
SOURCE_IN_IMAGE = "/tmp/gatekeeper-src"


# ---------------------------------------------------------------------------- .dockerignore rules


def _component_regex(pattern: str) -> str:
    """One pattern (no ``**``) as a regex over a path: ``*`` and ``?`` never cross a ``/``."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":  # a character class, as in Go's filepath.Match ([^...] negates)
            end = pattern.find("]", i + 2)
            if end < 0:
                raise ValueError(f"unterminated character class in {pattern!r}")
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body).replace("\\", "\\\\") + "]")
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """``**`` matches any number of folders, zero included (``**/x`` matches ``x``); a trailing ``**`` anything."""
    parts, rest = [], pattern
    while "**" in rest:
        head, rest = rest.split("**", 1)
        parts.append(_component_regex(head))
        if rest.startswith("/"):
            rest = rest[1:]
            parts.append("(?:.*/)?")
        else:
            parts.append(".*")
    parts.append(_component_regex(rest))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Rule:
    pattern: str  # cleaned, relative to the context root, without the leading "!"
    negated: bool
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        """The path itself or any folder above it (excluding a folder excludes everything in it)."""
        parts = path.split("/")
        return any(self.regex.fullmatch("/".join(parts[:n])) for n in range(len(parts), 0, -1))


def read_rules(text: str) -> list[Rule]:
    """.dockerignore lines: ``#`` in column 1 is a comment, whitespace is trimmed, then Go's
    filepath.Clean; a leading ``/`` is the context root; blank lines are skipped."""
    rules = []
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        line = raw.strip()
        negated = line.startswith("!")
        line = line[1:].strip() if negated else line
        if not line:
            continue
        pattern = posixpath.normpath(line).lstrip("/")
        if pattern in ("", "."):
            continue
        rules.append(Rule(pattern, negated, _pattern_regex(pattern)))
    return rules


def excluded(rules: list[Rule], path: str) -> bool:
    """The last rule that matches decides; no match keeps the path."""
    out = False
    for rule in rules:
        if rule.matches(path):
            out = not rule.negated
    return out


def _may_reinclude_below(rules: list[Rule], folder: str) -> bool:
    """Could a ``!`` rule bring back something inside this excluded folder (so it must be walked)?"""
    dirs = folder.split("/")
    for rule in (r for r in rules if r.negated):
        comps = rule.pattern.split("/")
        if len(comps) <= len(dirs) and "**" not in rule.pattern:
            continue  # it matches the folder or one above it: already part of the folder's own verdict
        for i, name in enumerate(dirs):
            if i >= len(comps) or "**" in comps[i]:
                return True
            if not re.fullmatch(_component_regex(comps[i]), name):
                break
        else:
            return True
    return False


def build_context(root: Path, rules: list[Rule], dest: Path) -> list[str]:
    """Copy what the rules keep of ``root`` to ``dest``; returns the kept files, relative, sorted."""
    kept = []
    for here, dirnames, filenames in os.walk(root):
        rel_here = Path(here).relative_to(root).as_posix()
        prefix = "" if rel_here == "." else rel_here + "/"
        dirnames[:] = [
            d for d in dirnames if not excluded(rules, prefix + d) or _may_reinclude_below(rules, prefix + d)
        ]
        for name in filenames:
            rel = prefix + name
            if excluded(rules, rel):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(here) / name, target, follow_symlinks=False)
            kept.append(rel)
    return sorted(kept)


# ---------------------------------------------------------------------------- the matcher itself


RULES_UNDER_TEST = """\
# comment
   # not a comment in column 1: the pattern "# not a comment ..." (matches nothing here)
tests
/docs/internal
**/*.pyc
**/__pycache__
build/**
zoo/*
!zoo/demo
!zoo/backbone
zoo/demo/scratch
Dockerfile*
!keep.pyc
a/b/**/c
"""


@pytest.mark.parametrize(
    "path,is_excluded",
    [
        ("tests", True),
        ("tests/inversion/test_fast.py", True),  # a folder's contents go with it
        ("testsuite.py", False),
        ("docs/internal/x.md", True),  # leading / is the context root
        ("docs/usage.md", False),
        ("x.pyc", True),  # **/ matches zero folders
        ("gatekeeper/a/b/x.pyc", True),
        ("keep.pyc", False),  # a later ! wins
        ("gatekeeper/__pycache__/cli.cpython-311.pyc", True),
        ("build/lib/x.py", True),
        ("zoo/demo/clean/gatekeeper.json", False),  # zoo/* then !zoo/demo
        ("zoo/backbone/open_clip_model.safetensors", False),
        ("zoo/bench/m/gatekeeper.json", True),
        ("zoo/demo/scratch/tmp.bin", True),  # the last matching line wins
        ("Dockerfile", True),
        ("Dockerfile.cpu", True),
        ("a/b/c", True),
        ("a/b/x/y/c", True),
        ("a/bc", False),
        ("README.md", False),
    ],
)
def test_dockerignore_matcher(path, is_excluded):
    assert excluded(read_rules(RULES_UNDER_TEST), path) is is_excluded


def test_the_walk_enters_an_excluded_folder_only_when_a_negation_can_reach_inside():
    rules = read_rules(RULES_UNDER_TEST)
    assert _may_reinclude_below(rules, "zoo")
    assert not _may_reinclude_below(rules, "tests")
    assert not _may_reinclude_below(rules, "zoo/bench")
    assert _may_reinclude_below(read_rules("x\n!**/keep\n"), "x")


# ---------------------------------------------------------------------------- the real context


def _force_included() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The build context `docker build .` sends, as .dockerignore describes it."""
    if any((REPO / f"{name}.dockerignore").exists() for name in DOCKERFILES):
        pytest.fail("a Dockerfile-specific .dockerignore exists; this test reads .dockerignore only")
    dest = tmp_path_factory.mktemp("docker-context")
    kept = build_context(REPO, read_rules((REPO / ".dockerignore").read_text()), dest)
    return dest, kept


def test_every_force_included_path_is_in_the_build_context(context):
    _, kept = context
    missing = [src for src in _force_included() if not any(f == src or f.startswith(src + "/") for f in kept)]
    assert not missing, f"pyproject force-includes {missing}, but .dockerignore leaves them out of the build context"
    assert "pyproject.toml" in kept and "README.md" in kept  # the build backend's own inputs
    assert not any(f.startswith((".venv/", ".git/", "tests/")) for f in kept)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_each_dockerfile_installs_the_whole_context(dockerfile):
    """The wheel test below stands for the Dockerfile only while the Dockerfile copies the whole
    context and pip-installs that copy."""
    text = (REPO / dockerfile).read_text()
    assert re.search(rf"^COPY\s+\.\s+{re.escape(SOURCE_IN_IMAGE)}\s*$", text, re.M), dockerfile
    assert re.search(rf"pip install\b[^\n]*\s{re.escape(SOURCE_IN_IMAGE)}(\s|$)", text), dockerfile


def test_the_build_context_builds_a_wheel_with_all_its_data(context, tmp_path):
    src, _ = context
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [wheel] = dist.glob("gatekeeper_clip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for target in _force_included().values():
        assert any(n.startswith(target + "/") for n in names), target
    for needed in (
        "gatekeeper/_data/zoo/backbone/open_clip_model.safetensors",
        "gatekeeper/_data/zoo/backbone/open_clip_config.json",
        "gatekeeper/_data/zoo/demo/backdoored/gatekeeper.json",
        "gatekeeper/_data/policies/default.yaml",
        "gatekeeper/_data/policies/tiny-world.yaml",
        "gatekeeper/_data/templates/report.md.j2",
        "gatekeeper/_data/schemas/result.schema.json",
        "gatekeeper/cli.py",
    ):
        assert needed in names, needed


def test_the_wheel_built_from_the_context_installs_and_runs_from_its_own_data(context, tmp_path):
    """The install half of the Dockerfiles' step: the wheel built from the context is installed
    (into its own folder, ahead of the checkout on the path) and that copy, not the checkout,
    loads its shipped policy and the demo model from its own packaged data."""
    src, _ = context
    dist, target = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = dist.glob("gatekeeper_clip-*.whl")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = (
        "import gatekeeper, sys\n"
        "from pathlib import Path\n"
        f"assert Path(gatekeeper.__file__).is_relative_to({str(target)!r}), gatekeeper.__file__\n"
        "from gatekeeper.resources import data_path\n"
        "from gatekeeper.policy import load_policy\n"
        "from gatekeeper.models.loader import load_model\n"
        "assert load_policy('tiny-world').positive_control.value == 'badclip'\n"
        "m = load_model(data_path('zoo') / 'demo' / 'backdoored')\n"
        f"assert Path(data_path('zoo')).is_relative_to({str(target)!r})\n"
        "print(len(m.classnames), gatekeeper.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.split()[0] == "12"
    cli = subprocess.run([sys.executable, "-m", "gatekeeper", "--version"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr
