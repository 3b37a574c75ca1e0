"""Class names checked against, or recovered from, a Dassl checkpoint's frozen prompt tokens.

CoOp and CoCoOp store ``token_prefix`` [K, 1, d] and ``token_suffix`` [K, L-1-n_ctx, d]: the
backbone's token embeddings of ``"X X ... X {classname}."`` for each class in logit order (the
start-of-text token, then the class name's tokens, ".", end-of-text and padding). gatekeeper
rebuilds them from the manifest's class names, so the names must be the ones the provider
trained with, in the same order: :func:`verify_classnames` rebuilds them with the backbone's
tokenizer and token embedding and compares, :func:`recover_classnames` maps each stored row to
its vocabulary entry and decodes the tokens. Both compare at the checkpoint's storage precision.
"""

from __future__ import annotations

from typing import Any

import torch

from gatekeeper.errors import ModelFormatError
from gatekeeper.models.manifest import MAX_CLASSNAME_CHARS
from gatekeeper.untrusted import inert, short

_CHUNK = 256  # classes compared at once (ImageNet's suffix is 1000 x 72 x 512)
_ROWS = 512  # rows matched against the vocabulary at once (a 512 x 49408 distance matrix)
_ATOL = 1e-6
_WRONG_BACKBONE = "the prompt tokens come from another backbone: give the one the provider trained with (--backbone)"


class _Undecodable(ModelFormatError):
    """Stored rows that do not spell a name on this backbone; ``reason`` without the file name."""

    def __init__(self, where: str, reason: str, hint: str) -> None:
        super().__init__(f"{where}: {reason}", hint)
        self.reason = reason


def _rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of a stored embedding: half a unit in the last place of its dtype, doubled."""
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-5)


def _close(stored: torch.Tensor, expected: torch.Tensor, rtol: float) -> torch.Tensor:
    """Per row (last dim reduced): every element within ``rtol`` of the expected embedding."""
    return ((stored.float() - expected).abs() <= rtol * expected.abs() + _ATOL).all(dim=-1)


def prompt_tokens(
    clip: Any, tokenizer: Any, names: list[str], n_ctx: int, lead: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix [K,1,d], suffix [K,L-1-n_ctx,d]) in float32, as CoOp builds them from ``names``.

    ``lead`` is the text before the class name (default CoOp's "X X ... X", n_ctx words); MaPLe
    writes its CTX_INIT there whatever n_ctx is, so its suffix can start with words of it.
    """
    placeholder = " ".join(["X"] * n_ctx) if lead is None else lead
    with torch.no_grad():
        tokens = tokenizer([f"{placeholder} {c}." for c in names])
        emb = clip.token_embedding(tokens.to(clip.token_embedding.weight.device)).float().cpu()
    return emb[:, :1], emb[:, 1 + n_ctx :]


def coop_names(names: list[str]) -> list[str]:
    """The names as CoOp's prompt learner reads them (``_`` as a space)."""
    return [n.replace("_", " ") for n in names]


def check_layout(where: str, prefix: torch.Tensor, suffix: torch.Tensor, n_ctx: int, clip: Any, tokenizer: Any) -> None:
    """The suffix must have this backbone's context length less the SOS token and the context.

    Raises:
        ModelFormatError: another context length, or the prefix is not the backbone's SOS embedding.
    """
    length = int(getattr(clip, "context_length", 0) or clip.positional_embedding.shape[0])
    if suffix.shape[1] != length - 1 - n_ctx:
        raise ModelFormatError(
            f"{where}: token_suffix holds {suffix.shape[1]} positions, but this backbone's context length {length} "
            f"less the start token and n_ctx {n_ctx} leaves {length - 1 - n_ctx}",
            _WRONG_BACKBONE,
        )
    sos = clip.token_embedding.weight[int(tokenizer(["."])[0][0])].detach().float().cpu()
    ok = _close(prefix[:, 0], sos.expand(prefix.shape[0], -1), _rtol(prefix.dtype))
    if not bool(ok.all()):
        first = int((~ok).nonzero()[0])
        raise ModelFormatError(
            f"{where}: token_prefix of class {first} is not this backbone's start-of-text embedding", _WRONG_BACKBONE
        )


def _first_mismatch(
    clip: Any, tokenizer: Any, names: list[str], suffix: torch.Tensor, n_ctx: int, lead: str | None = None
) -> int | None:
    rtol = _rtol(suffix.dtype)
    for start in range(0, len(names), _CHUNK):
        _, expected = prompt_tokens(clip, tokenizer, names[start : start + _CHUNK], n_ctx, lead)
        ok = _close(suffix[start : start + _CHUNK], expected, rtol).all(dim=1)
        if not bool(ok.all()):
            return start + int((~ok).nonzero()[0])
    return None


def verify_classnames(
    where: str, names: list[str], prefix: torch.Tensor, suffix: torch.Tensor, n_ctx: int, clip: Any, tokenizer: Any,
    lead: str | None = None,
) -> tuple[list[str], str]:
    """Check ``names`` against the stored prompt tokens (``lead``: see :func:`prompt_tokens`).

    Returns:
        (the names to write, a note): CoOp reads ``_`` as a space, so a list with underscores
        that matches only that way is written with spaces (the note says so).
    Raises:
        ModelFormatError: a count mismatch (both counts named), or the first class whose tokens
            differ (its index, the name the checkpoint spells where it can be decoded, the given
            name), or prompt tokens that are not this backbone's.
    """
    k = int(prefix.shape[0])
    if len(names) != k:
        raise ModelFormatError(
            f"{where}: the checkpoint holds {k} classes (token_prefix/token_suffix), the sidecar lists {len(names)} "
            "class names",
            "give the class list the model was trained with, in logit order, or leave it out to recover it",
        )
    check_layout(where, prefix, suffix, n_ctx, clip, tokenizer)
    candidates = [(coop_names(names), "underscores read as spaces, as CoOp does")] if "_" in "".join(names) else []
    candidates.append((list(names), ""))
    first = None
    for candidate, note in candidates:
        bad = _first_mismatch(clip, tokenizer, candidate, suffix, n_ctx, lead)
        if bad is None:
            return candidate, note
        first = bad if first is None else first
    assert first is not None
    given = names[first]
    try:
        (spelled,) = _decode(where, suffix[first : first + 1, _lead_rest(tokenizer, lead, n_ctx) :], clip, tokenizer, offset=first)
    except _Undecodable as exc:
        raise ModelFormatError(
            f"{where}: class {first}: token_suffix is not the token embeddings of {short(given)} on this backbone "
            f"({exc.reason.split(': ', 1)[-1]})",
            _WRONG_BACKBONE,
        ) from None
    at = [i for i, n in enumerate(coop_names(names)) if n.lower() == spelled]
    where_else = f" ({short(spelled)} is listed at {at[0]}: is the list out of order?)" if at else ""
    raise ModelFormatError(
        f"{where}: class {first}: the checkpoint's prompt spells {short(spelled)}, the sidecar says {short(given)}"
        + where_else,
        "give the class list the model was trained with, in logit order, or leave it out to recover it",
    )


def _nearest(rows: torch.Tensor, vocab: torch.Tensor, vnorm: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest vocabulary id, within tolerance of it) for each row."""
    ids = []
    for start in range(0, rows.shape[0], _ROWS):
        r = rows[start : start + _ROWS].float()
        ids.append((vnorm[None, :] - 2 * r @ vocab.T).argmin(dim=1))
    found = torch.cat(ids)
    return found, _close(rows, vocab[found], rtol)


def _decode(where: str, suffix: torch.Tensor, clip: Any, tokenizer: Any, offset: int = 0) -> list[str]:
    """The class names spelled by stored suffix rows: nearest vocabulary tokens up to end-of-text, less the '.'."""
    if not hasattr(tokenizer, "decode"):
        raise _Undecodable(where, "this backbone's tokenizer cannot decode tokens", "give the class names")
    vocab = clip.token_embedding.weight.detach().float().cpu()
    vnorm = (vocab * vocab).sum(dim=1)
    # tokens whose embeddings coincide (at the checkpoint's precision) cannot be told apart
    _, inverse, counts = torch.unique(vocab.to(suffix.dtype), dim=0, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1
    eot = int(getattr(tokenizer, "eot_token_id", 49407))
    dot = int(tokenizer(["."])[0][1])
    rtol = _rtol(suffix.dtype)
    names = []
    for start in range(0, suffix.shape[0], _CHUNK):
        chunk = suffix[start : start + _CHUNK]
        tokens = torch.full(chunk.shape[:2], -1, dtype=torch.long)
        active = torch.arange(chunk.shape[0])
        for j in range(chunk.shape[1]):
            if len(active) == 0:
                break
            ids, ok = _nearest(chunk[active, j], vocab, vnorm, rtol)
            if not bool(ok.all()):
                cls = start + offset + int(active[int((~ok).nonzero()[0])])
                raise _Undecodable(
                    where,
                    f"class {cls}: token_suffix position {j} is not a token embedding of this backbone",
                    _WRONG_BACKBONE,
                )
            if bool(shared[ids].any()):
                cls = start + offset + int(active[int(shared[ids].nonzero()[0])])
                raise _Undecodable(
                    where,
                    f"class {cls}: token_suffix position {j} is the embedding of several vocabulary tokens of this "
                    "backbone, so the name cannot be decoded",
                    "give the class names (classnames: or classnames_file:)",
                )
            tokens[active, j] = ids
            active = active[ids != eot]
        if len(active):
            raise _Undecodable(
                where,
                f"class {start + offset + int(active[0])}: token_suffix has no end-of-text token",
                "is this a CoOp / CoCoOp prompt learner?",
            )
        for i, row in enumerate(tokens.tolist()):
            seq = row[: row.index(eot)]
            if not seq or seq[-1] != dot:
                raise _Undecodable(
                    where,
                    f"class {start + offset + i}: the prompt does not end in '.' as CoOp's 'X ... X name.' does",
                    "give the class names (classnames: or classnames_file:)",
                )
            names.append(" ".join(tokenizer.decode(seq[:-1]).split()))
    return names


def _lead_rest(tokenizer: Any, lead: str | None, n_ctx: int) -> int:
    """Tokens of ``lead`` past the n_ctx context slots: they open every stored suffix (MaPLe's CTX_INIT)."""
    if lead is None:
        return 0
    rest = int(tokenizer([lead])[0].argmax()) - 1 - n_ctx  # [SOS, lead..., EOT]: EOT has the highest id
    if rest < 0:
        raise ModelFormatError(
            f"the prompt's leading text {short(lead)} has fewer tokens than n_ctx {n_ctx}, so the class names "
            "cannot be read off the stored tokens",
            "give the class names (classnames: or classnames_file:)",
        )
    return rest


def recover_classnames(
    where: str, prefix: torch.Tensor, suffix: torch.Tensor, n_ctx: int, clip: Any, tokenizer: Any, lead: str | None = None
) -> list[str]:
    """The class names the stored prompt tokens spell, checked by rebuilding every token.

    Names come back as the tokenizer sees them: lower case, punctuation spaced out ("st . bernard"),
    which gives the same tokens, so the same model.

    Raises:
        ModelFormatError: rows that are not this backbone's token embeddings, a prompt not in
            CoOp's form, an empty or too long name, or two classes with the same tokens.
    """
    check_layout(where, prefix, suffix, n_ctx, clip, tokenizer)
    names = _decode(where, suffix[:, _lead_rest(tokenizer, lead, n_ctx) :], clip, tokenizer)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or len(name) > MAX_CLASSNAME_CHARS:
            raise ModelFormatError(
                f"{where}: class {i}: the recovered name {short(name)} is empty or longer than {MAX_CLASSNAME_CHARS} "
                "characters",
                "give the class names (classnames: or classnames_file:)",
            )
        if name in seen:
            raise ModelFormatError(
                f"{where}: classes {seen[name]} and {i} have the same prompt tokens ({inert(name, 80)})",
                "the model cannot tell them apart; give the class names if this is expected",
            )
        seen[name] = i
    if _first_mismatch(clip, tokenizer, names, suffix, n_ctx, lead) is not None:  # padding, truncation: all of it
        raise ModelFormatError(f"{where}: the recovered class names do not rebuild token_suffix", "give the class names")
    return names
