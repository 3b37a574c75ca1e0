"""The README's ```bash blocks run as written, offline, from a checkout.

Every block runs unless the line right before its fence is ``<!-- snippet: skip (REASON) -->``
with a reason. A block runs in a scratch folder that links to the checkout's top-level entries
(and ``.venv`` to this interpreter's environment), with that environment's bin first on PATH and
this checkout first on PYTHONPATH; whatever it writes lands in the scratch folder. A block fails
the test when it exits non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!--\s*snippet:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*$")
ENV_BIN = Path(sys.executable).parent  # the environment whose gatekeeper, check-jsonschema ... the blocks call


@dataclass(frozen=True)
class Snippet:
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the stated reason, or None: the block runs


def snippets(text: str) -> list[Snippet]:
    """Every fenced block tagged bash, with the skip marker (if any) on the line before its fence.

    Raises:
        ValueError: a skip marker without a reason, or one that is not followed by a bash block.
    """
    lines = text.splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        marker = SKIP.match(lines[i].strip())
        if lines[i].lstrip().startswith("<!--") and "snippet" in lines[i] and not marker:
            raise ValueError(f"README.md:{i + 1}: malformed snippet marker, write <!-- snippet: skip (reason) -->")
        if marker and (not marker["reason"].strip() or i + 1 >= len(lines) or lines[i + 1].strip() != "```bash"):
            raise ValueError(f"README.md:{i + 1}: a skip marker needs a reason and a ```bash block on the next line")
        fence = FENCE.match(lines[i])
        if fence and fence[1]:
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if fence[1] == "bash":
                previous = SKIP.match(lines[start - 1].strip()) if start else None
                out.append(Snippet(start + 1, "\n".join(body), previous["reason"].strip() if previous else None))
        i += 1
    return out


def test_the_snippet_parser():
    text = "a\n```bash\necho 1\n```\n<!-- snippet: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n```yaml\nk: 1\n```\n"
    assert snippets(text) == [Snippet(2, "echo 1", None), Snippet(6, "nvidia-smi", "needs a GPU")]
    for bad in ("<!-- snippet: skip () -->\n```bash\nx\n```\n", "<!-- snippet: skip (why) -->\n\n```bash\nx\n```\n",
                "<!-- snippet: skipped -->\n```bash\nx\n```\n"):
        with pytest.raises(ValueError):
            snippets(bad)


def test_readme_shell_blocks_are_tagged_bash():
    """A block tagged sh/shell/console would escape this test; the README tags shell as bash."""
    tags = {m[1] for line in README.read_text().splitlines() if (m := FENCE.match(line)) and m[1]}
    assert not tags & {"sh", "shell", "console", "zsh", "bash-session"}, tags


SNIPPETS = snippets(README.read_text())


def test_the_readme_has_blocks_that_run():
    assert any(s.skip is None for s in SNIPPETS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder that looks like a checkout with its .venv, and into which blocks write."""
    if not (ENV_BIN / "gatekeeper").exists():
        pytest.skip(f"no gatekeeper console script next to {sys.executable} (install the checkout: ./scripts/setup)")
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(ENV_BIN.parent)
    return root


def _status() -> str:
    proc = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: f"README.md:{s.line}")
def test_readme_snippet(snippet: Snippet, workspace: Path):
    if snippet.skip is not None:
        pytest.skip(f"README.md:{snippet.line}: {snippet.skip}")
    env = {
        **os.environ,
        "PATH": f"{ENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ written into the checkout
    }
    before = _status()
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", snippet.code],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"README.md:{snippet.line} exited {proc.returncode}\n{snippet.code}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert _status() == before, "the block wrote into the checkout"


def test_readme_stays_a_five_minute_read():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) < 250
