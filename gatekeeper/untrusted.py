"""Make text from a model, sidecar, policy or registry safe to print, and parse YAML with bounds.

Strings a provider controls (class names, pickle global names, backbone names, file contents)
end up in terminal lines, CI logs and error messages. :func:`inert` renders any of them on one
line: control characters (newlines included) are escaped, so nothing can start a new log line,
and a leading ``::`` is defused, so no GitHub workflow command (``::error``, ``::add-mask::``,
``::stop-commands::``) can be issued by a model. :func:`short` quotes at most a short prefix of a
value in an error message.

:func:`load_yaml` is the one YAML reader for policies, sidecars and inventories: safe tags only,
a bounded document, a bounded expansion of anchors and aliases (no "billion laughs"), and
duplicate keys refused instead of silently taking the last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MAX_YAML_BYTES = 1 << 20  # 1 MiB: a policy or sidecar is a few hundred bytes
MAX_YAML_NODES = 100_000  # nodes after alias expansion (a class list of 10k names is ~10k nodes)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def inert(value: object, limit: int = 400) -> str:
    """``value`` as one printable line: control characters escaped, a leading ``::`` defused.

    Args:
        value: any object; ``str(value)`` is rendered.
        limit: longest result in characters (longer text is cut and marked with ``…``).
    """
    text = CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", str(value)
    )
    if len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    body = text.lstrip()
    if body.startswith("::"):  # a workflow command needs "::" at the start of a line
        text = "\\" + body
    return text


def short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, inert: for quoting a bad value in an error."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not turn an error into a crash
        text = f"<{type(value).__name__}>"
    return inert(text, limit)


class DocumentError(ValueError):
    """A YAML or JSON document is unreadable, too large, malformed, expands too far or repeats a key."""


def is_int(value: object) -> bool:
    """A real integer: ``true``/``false`` are ints in Python, and are refused here."""
    return isinstance(value, int) and not isinstance(value, bool)


def _read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise DocumentError(f"cannot read {what} ({inert(exc.strerror or type(exc).__name__, 80)})") from None
    if len(data) > max_bytes:
        raise DocumentError(f"{what} is larger than {_size(max_bytes)}")
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n // 1024} KiB"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(path: Path, what: str, max_bytes: int) -> Any:
    """Parse a JSON file a provider wrote: at most ``max_bytes``, UTF-8, strict (no NaN/Infinity),
    each key once, nesting bounded by the parser's recursion limit.

    Raises:
        DocumentError: one line saying which of these failed.
    """
    data = _read_bounded(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise DocumentError(f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise DocumentError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a duplicate key, NaN, a 5000-digit integer
        raise DocumentError(f"{what} is not valid JSON ({inert(exc, 160)})") from None


def _loader() -> type:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys and counts nodes as the document expands."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable key: SafeLoader refuses it below
                    duplicate = False
                if duplicate:
                    raise DocumentError(f"duplicate key {short(key)} (line {key_node.start_mark.line + 1})")
                if not isinstance(key, (list, dict)):
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    return BoundedLoader


def _expanded_size(root: Any) -> int:
    """Number of nodes the composed graph expands to (aliases counted at every use), capped."""
    import yaml

    sizes: dict[int, int] = {}
    order: list[Any] = []
    stack, seen = [root], set()
    while stack:  # iterative post-order over the DAG of composed nodes
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))
    for node in reversed(order):
        if isinstance(node, yaml.SequenceNode):
            children: list[Any] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), MAX_YAML_NODES + 1)
    return sizes[id(root)]


def load_yaml(source: str | Path, what: str = "YAML") -> Any:
    """Parse a YAML (or JSON) document from a path or a string, within bounds.

    Args:
        source: a file path, or the document text.
        what: how to name the document in errors (e.g. the file path).
    Returns:
        The plain Python value (dicts, lists, str, int, float, bool, None, dates).
    Raises:
        DocumentError: unreadable, larger than :data:`MAX_YAML_BYTES`, malformed, more than
            :data:`MAX_YAML_NODES` nodes once aliases are expanded, or a repeated mapping key.
    """
    import yaml

    if isinstance(source, Path):
        data = _read_bounded(source, what, MAX_YAML_BYTES)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DocumentError(f"{what} is not UTF-8 text") from None
    else:
        text, data = source, source.encode("utf-8", "surrogatepass")
    if len(data) > MAX_YAML_BYTES:
        raise DocumentError(f"{what} is larger than {_size(MAX_YAML_BYTES)}")
    loader = None
    try:
        loader = _loader()(text)
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise DocumentError(f"{what} expands to more than {MAX_YAML_NODES} nodes (anchors and aliases)")
        return loader.construct_document(node)
    except DocumentError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DocumentError(f"{what} is not valid YAML{where}: {inert(problem, 120)}") from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. a 5000-digit integer
        raise DocumentError(f"{what} holds a value that cannot be read ({inert(exc, 120)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def say(text: str, *, err: bool = True) -> None:
    """Print one line that may hold untrusted text (to stderr by default), rendered by :func:`inert`."""
    import sys

    print(inert(text, 4000), file=sys.stderr if err else sys.stdout, flush=True)
