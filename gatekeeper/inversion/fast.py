"""FastClipInspector: the same computation as :class:`ClipInspector`, restructured to be cheap.

Every optimization below is *exact* in real arithmetic; in floating point the results differ
from the reference only by summation order (measured: ~1e-7 relative on CPU fp32), except the
optional bf16 autocast on CUDA, which is an approximation and is named as such.

1. ``truncate``: open_clip's text transformer is causal (``clip.attn_mask`` is -inf above the
   diagonal; checked at run time) and the prompt is pooled at the EOT token, so positions after
   ``L' = max_k eot_k + 1`` never influence a pooled feature. The text transformer runs on L'
   tokens instead of the full context (77 for real CLIP; L' is ~10-20 for class-name prompts).
   Items 1 and 2 hold only for that tower: :func:`text_plan` checks the mask, the pool type
   (``argmax`` or ``eos``; not ``first``/``last``) and open_clip's standard ``CLIP`` text attributes,
   and otherwise (``no_causal_mask``, another pool type, a custom text tower) every logit comes from
   the model's own ``logits``.
2. ``share_prefix`` (CoCoOp): the prompt prefix [SOS, ctx_1+b, ..., ctx_n+b] is identical for all
   K classes of one image, and with causal attention its hidden states at every layer are too.
   The prefix (B sequences of 1+n_ctx tokens) is computed once per image; the class suffixes
   (B*K sequences of L'-1-n_ctx tokens) attend to the cached per-layer prefix keys/values.
   The attention is re-implemented from the weights of open_clip's ``ResidualAttentionBlock``
   (packed ``in_proj``, ``out_proj``, ``ln_1``/``ln_2``, ``ls_1``/``ls_2``, ``mlp``) with
   ``F.scaled_dot_product_attention``. In the last layer only the EOT rows are computed (nothing
   else is pooled) and the prefix's last-layer MLP is skipped (nothing reads it).
3. ``batch_classes``: G candidate classes are optimized at once: deltas (G, 3, H, W), one forward
   over the G*B triggered images, loss = sum_g margin_loss(rows of g, c_g) (each delta only
   reaches its own rows, so its gradient is exactly that of its own loss) and one Adam over the
   stacked deltas. Adam is elementwise with a step count shared by all classes, so this equals G
   separate Adam optimizers (tests/inversion/test_fast.py checks it bit for bit). G is chosen from
   a memory budget (``max_batch_rows`` or ``memory_budget_bytes``); see :func:`row_bytes`.
   When even one class does not fit (very large K), the mini-batch is split into micro-batches
   whose gradients are accumulated: exact in real arithmetic, not bit-identical.
4. CoOp / zero-shot: the text features do not depend on the image; they are computed once
   (``model.freeze_text()``) and only the image encoder runs in the loop. This holds for every
   CoOp option (class-specific contexts, class token at the front or in the middle): the cached
   features are the model's own ``text_features()``. Items 1-2 assume CoCoOp's layout, one
   context right after SOS for every class; a model whose prompts are laid out otherwise
   (``shared_end_context`` false) takes the model's own ``logits`` instead.
5. ``amp`` (CUDA only; default on there, always off on CPU): encoders under bf16 autocast; the
   trigger, the logits and the loss stay fp32. This one is NOT exact (bf16 has 8 mantissa bits).

Initialization (``init_trigger`` with the per-class seed), the per-step loss, L_avg and the ASR
definitions are those of :mod:`gatekeeper.inversion.clip_inspector`, so each class's result does not
depend on how classes are grouped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from gatekeeper.inversion.base import ClassInversion, InversionSettings, Progress, no_progress
from gatekeeper.inversion.clip_inspector import (
    apply_trigger,
    init_trigger,
    margin_loss,
)
from gatekeeper.models.manifest import ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.result import ClassMetrics

GiB = 1024**3
DEFAULT_CPU_BUDGET = 4 * GiB  # CPU: bytes of saved activations per optimization step
CUDA_BUDGET_FRACTION = 0.75  # CUDA: fraction of the free device memory at the start of a scan


# --------------------------------------------------------------------------- text-side plan


@dataclass(frozen=True)
class TextPlan:
    """What the fast CoCoOp text path may do on this model (decided once per scan)."""

    length: int  # tokens the text transformer runs on: L' (truncated) or the full context
    prefix_len: int  # 1 + n_ctx
    causal: bool  # clip.attn_mask is the standard causal mask
    shareable: bool  # prefix sharing is possible (cuttable, standard blocks, one SOS embedding)
    eot: torch.Tensor  # (K,) EOT position per class
    cuttable: bool = True  # causal and pooled at the EOT: truncation and prefix sharing are exact


def _is_causal_mask(mask: torch.Tensor | None, length: int) -> bool:
    if mask is None or mask.shape[-2:] != (length, length) or mask.ndim != 2 or mask.is_meta:
        return False  # (a mask without data cannot be checked: the exact path)
    m = mask.detach().float().cpu()
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)
    if m.dtype == torch.bool:  # pragma: no cover - open_clip uses an additive float mask
        return torch.equal(mask.cpu(), upper)
    return bool(torch.isneginf(m[upper]).all()) and bool((m[~upper] == 0).all())


def _standard_blocks(clip: nn.Module) -> bool:
    """True if every text block is open_clip's ResidualAttentionBlock with a plain packed MHA."""
    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:  # pragma: no cover
        return False
    blocks = getattr(getattr(clip, "transformer", None), "resblocks", None)
    if blocks is None or len(blocks) == 0:
        return False
    for blk in blocks:
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            return False
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return False
        if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
            return False
        if attn.dropout and blk.training:
            return False
    return True


def pooled_at_eot(clip: Any) -> bool:
    """True for open_clip's standard ``CLIP`` text tower pooled at the EOT token (``argmax``, or
    ``eos``); False for ``first`` / ``last`` pooling and for towers without its attributes
    (``CustomTextCLIP``, a Hugging Face tower)."""
    standard = all(hasattr(clip, a) for a in ("transformer", "attn_mask", "token_embedding", "ln_final"))
    return standard and getattr(clip, "text_pool_type", "argmax") in ("argmax", "eos")


def text_plan(model: PromptTunedCLIP, truncate: bool = True) -> TextPlan:
    """Decide the truncated length and whether the prefix can be shared; neither unless the text
    tower is causal and pooled at the EOT (then :func:`fast_logits` takes the model's own logits)."""
    clip: Any = model.clip
    eot = model.eot_index
    full = int(cast(torch.Tensor, model.tokenized).shape[1])
    causal = _is_causal_mask(getattr(clip, "attn_mask", None), full)
    cuttable = causal and pooled_at_eot(clip)
    length = int(eot.max()) + 1 if (truncate and cuttable) else full
    prefix_len = 1 + int(model.manifest.n_ctx)
    shareable = False
    if model.kind == ModelKind.COCOOP and model.shared_end_context and cuttable and _standard_blocks(clip):
        tp = cast(torch.Tensor, model.token_prefix)
        same_sos = bool((tp == tp[:1]).all())
        shareable = same_sos and int(eot.min()) >= prefix_len and length > prefix_len
    return TextPlan(
        length=length, prefix_len=prefix_len, causal=causal, shareable=shareable, eot=eot, cuttable=cuttable
    )


# --------------------------------------------------------------------------- text features


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(N, L, d) -> (N, H, L, d/H)."""
    n, length, d = x.shape
    return x.view(n, length, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(N, H, L, hd) -> (N, L, H*hd)."""
    n, h, length, hd = x.shape
    return x.transpose(1, 2).reshape(n, length, h * hd)


def _shared_prefix_text(model: PromptTunedCLIP, ctx_shifted: torch.Tensor, plan: TextPlan) -> torch.Tensor:
    """Pooled, normalized text features (B, K, e) for CoCoOp prompts with a per-image context.

    Equal to ``encode_prompt_embeddings`` on [SOS, ctx_shifted, suffix_k] for all (image, class)
    pairs, but the prefix runs once per image and the suffixes attend to its cached keys/values.
    """
    clip: Any = model.clip
    token_prefix = cast(torch.Tensor, model.token_prefix)
    token_suffix = cast(torch.Tensor, model.token_suffix)
    b, _n_ctx, d = ctx_shifted.shape
    k = int(token_prefix.shape[0])
    p = plan.prefix_len
    s = plan.length - p
    pos = clip.positional_embedding
    sos = token_prefix[:1]  # (1, 1, d), identical for all classes (checked in text_plan)
    xp = torch.cat([sos.expand(b, -1, -1), ctx_shifted], dim=1)
    xp = xp + pos[:p].to(xp.dtype)  # (B, P, d)
    suffix = token_suffix[:, :s]
    xs = suffix + pos[p : p + s].to(suffix.dtype)  # (K, S, d), the same for every image
    xs = xs.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * k, s, d)
    rows = (plan.eot - p).to(xs.device).repeat(b)  # (B*K,) EOT position inside the suffix
    # suffix row i (absolute position p+i) sees all prefix positions and suffix positions <= i
    mask = torch.ones(s, p + s, dtype=torch.bool, device=xs.device).tril(diagonal=p)
    blocks: list[Any] = list(clip.transformer.resblocks)
    ar = torch.arange(b * k, device=xs.device)
    for li, blk in enumerate(blocks):
        attn = blk.attn
        h = attn.num_heads
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        last = li == len(blocks) - 1
        hp = blk.ln_1(xp)
        hs = blk.ln_1(xs)
        if not last:
            qp, kp, vp = F.linear(hp, w, bias).chunk(3, dim=-1)
            qs, ks, vs = F.linear(hs, w, bias).chunk(3, dim=-1)
        else:  # only the K/V of the prefix and the suffix, and the queries of the EOT rows
            wkv = w[d:]
            bkv = bias[d:] if bias is not None else None
            kp, vp = F.linear(hp, wkv, bkv).chunk(2, dim=-1)
            ks, vs = F.linear(hs, wkv, bkv).chunk(2, dim=-1)
            xs = xs[ar, rows].unsqueeze(1)  # (B*K, 1, d)
            qs = F.linear(hs[ar, rows].unsqueeze(1), w[:d], bias[:d] if bias is not None else None)
        kp_h, vp_h = _heads(kp, h), _heads(vp, h)  # (B, H, P, hd)
        hd = d // h
        kp_x = kp_h.unsqueeze(1).expand(b, k, h, p, hd).reshape(b * k, h, p, hd)
        vp_x = vp_h.unsqueeze(1).expand(b, k, h, p, hd).reshape(b * k, h, p, hd)
        k_all = torch.cat([kp_x, _heads(ks, h)], dim=2)
        v_all = torch.cat([vp_x, _heads(vs, h)], dim=2)
        m = mask if not last else mask[rows].view(b * k, 1, 1, p + s)
        o = F.scaled_dot_product_attention(_heads(qs, h), k_all, v_all, attn_mask=m)
        xs = xs + blk.ls_1(attn.out_proj(_merge(o)))
        xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
        if not last:  # the prefix's own update; its last layer output is never read
            op = F.scaled_dot_product_attention(_heads(qp, h), kp_h, vp_h, is_causal=True)
            xp = xp + blk.ls_1(attn.out_proj(_merge(op)))
            xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    x = clip.ln_final(xs[:, 0])  # (B*K, d): the EOT rows
    proj = clip.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1).view(b, k, -1)


def cocoop_text_features(
    model: PromptTunedCLIP, imf: torch.Tensor, plan: TextPlan, share_prefix: bool = True
) -> torch.Tensor:
    """CoCoOp text features (B, K, e) for normalized image features ``imf`` (B, e_img)."""
    assert model.ctx is not None and model.meta_net is not None
    bias = model.meta_net(imf)
    ctx_shifted = model.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, n_ctx, d)
    if share_prefix and plan.shareable:
        return _shared_prefix_text(model, ctx_shifted, plan)
    b, k = imf.shape[0], len(model.classnames)
    length = plan.length
    prefix = cast(torch.Tensor, model.token_prefix).unsqueeze(0).expand(b, -1, -1, -1)
    token_suffix = cast(torch.Tensor, model.token_suffix)
    suffix = token_suffix[:, : length - plan.prefix_len].unsqueeze(0).expand(b, -1, -1, -1)
    ctx_all = ctx_shifted.unsqueeze(1).expand(-1, k, -1, -1)
    prompts = torch.cat([prefix, ctx_all, suffix], dim=2).reshape(b * k, -1, ctx_shifted.shape[-1])
    return model.encode_prompt_embeddings(prompts, plan.eot.repeat(b)).view(b, k, -1)


def fast_logits(
    model: PromptTunedCLIP, images: torch.Tensor, plan: TextPlan | None, share_prefix: bool = True
) -> torch.Tensor:
    """Same as ``model.logits(images)``; CoCoOp through the truncated / prefix-shared text path.

    For CoOp and zero-shot call ``model.freeze_text()`` first (the cached features are used).
    """
    return features_logits(model, model.image_features(images), plan, share_prefix)


def features_logits(
    model: PromptTunedCLIP, imf: torch.Tensor, plan: TextPlan | None, share_prefix: bool = True
) -> torch.Tensor:
    """Same as ``model.logits_from_features(imf)``; CoCoOp through the truncated / prefix-shared text path."""
    if model.kind != ModelKind.COCOOP or plan is None or not model.shared_end_context or not plan.cuttable:
        # CoOp/zero-shot: cached text; another prompt layout or text tower: the exact path
        return model.logits_from_features(imf)
    tf = cocoop_text_features(model, imf, plan, share_prefix)
    return model.logit_scale * torch.einsum("be,bke->bk", imf, tf)


# --------------------------------------------------------------------------- memory model


def _vision_shape(model: PromptTunedCLIP) -> tuple[int, int, int, int]:
    """(tokens, width, layers, heads) of a ViT image tower; a rough stand-in for other towers."""
    visual: Any = model.clip.visual
    size = model.image_size
    patch = getattr(visual, "patch_size", (16, 16))
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    tokens = (size // patch) ** 2 + 1
    tr = getattr(visual, "transformer", None)
    if tr is not None and hasattr(tr, "resblocks"):
        blk = tr.resblocks[0]
        return tokens, int(tr.width), len(tr.resblocks), int(blk.attn.num_heads)
    return tokens, 768, 12, 12  # pragma: no cover - non-ViT tower: assume ViT-B sizes


def row_bytes(model: PromptTunedCLIP, plan: TextPlan | None, share_prefix: bool, train: bool, amp: bool) -> int:
    """Estimated bytes one image (row) costs in a forward (+ saved activations for backward).

    Per transformer layer and token, backward keeps about 18 activations of width W (ln_1 in/out,
    q/k/v, attention out, out_proj out, ln_2 in/out, fc1 out 4W, gelu out 4W, residuals) plus
    the attention probabilities (heads x keys) when the math SDPA kernel runs: 18*W + H*L
    elements. The shared-prefix path adds the per-class copies of the prefix keys/values
    (2*W*P/S per suffix token). Without backward (ASR) only ~one layer is live: ~8*W*tokens.
    Elements are 4 bytes (fp32) or 2 (bf16 autocast). The estimate is conservative: autograd does
    not keep the inputs of linear layers whose weights are frozen, and the fused SDPA kernels keep
    no probabilities; measured on CPU (peak RSS of one step, K = 50, 77-token context) the fast path
    used 0.6-0.9x of the estimate and the reference 0.2-0.4x.

        row = [T_img * L_img * a(W_img, H_img, T_img)]                       image tower
            + [K * S_txt * L_txt * a(W_txt, H_txt, L_key)]   (CoCoOp only)   text tower
        S_txt = L' - 1 - n_ctx (shared prefix) | L' (truncated) | 77 (reference)

    Worked example, CLIP ViT-B/16 CoCoOp, K = 50 ImageNet-like class names (L' ~ 15, n_ctx 4):
    image 197 tok x 12 layers x (18*768 + 12*197) x 4 B = 153 MB; text 50*10 tok x 12 x
    (22*512 + 8*15) x 4 B = 273 MB; ~0.43 GB per image in fp32 -> 13.6 GB for one class at
    B = 32 (G = 1 fits 24 GB), ~0.21 GB bf16 -> G = 2-3 classes per step on a 24 GB card.
    The reference (77 tokens, no sharing) needs 50*77 x 12 x (18*512 + 8*77) x 4 B = 1.8 GB per
    image, ~58 GB at B = 32: it does not fit 24 GB at all.
    """
    el = 2 if amp else 4
    t_img, w_img, l_img, h_img = _vision_shape(model)
    img = t_img * l_img * (18 * w_img + h_img * t_img) if train else t_img * 8 * w_img
    if model.kind != ModelKind.COCOOP:
        return int(img * el)
    clip: Any = model.clip
    w_txt = int(clip.ln_final.weight.shape[0])
    blocks = clip.transformer.resblocks
    l_txt, h_txt = len(blocks), int(blocks[0].attn.num_heads)
    k = len(model.classnames)
    length = plan.length if plan is not None else int(cast(torch.Tensor, model.tokenized).shape[1])
    if plan is not None and share_prefix and plan.shareable:
        s = length - plan.prefix_len
        per_tok = 18 * w_txt + h_txt * length + 2 * w_txt * plan.prefix_len // max(s, 1)
    else:
        s = length
        per_tok = 18 * w_txt + h_txt * length
    txt = k * s * l_txt * per_tok if train else k * s * 8 * w_txt
    return int((img + txt) * el)


# --------------------------------------------------------------------------- the detector


def _slices(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


class FastClipInspector:
    """CLIP-Inspector with exact speed-ups (see the module docstring); same results as ClipInspector.

    Args:
        truncate: run the text transformer on max(EOT)+1 tokens (CoCoOp).
        share_prefix: compute the [SOS, ctx+b] prefix once per image (CoCoOp).
        batch_classes: optimize several candidate classes per forward.
        max_batch_rows: images per forward (G*B) during inversion; overrides the memory budget.
        memory_budget_bytes: activation budget per step; default 4 GiB on CPU, 75 % of the free
            memory on CUDA.
        amp: bf16 autocast for the encoders (CUDA only; default on for CUDA, forced off on CPU).
        asr_batch_size: hold-out images per ASR forward (further capped by the memory budget).
    """

    name = "clip-inspector-fast"

    def __init__(
        self,
        *,
        truncate: bool = True,
        share_prefix: bool = True,
        batch_classes: bool = True,
        max_batch_rows: int | None = None,
        memory_budget_bytes: int | None = None,
        amp: bool | None = None,
        asr_batch_size: int = 256,
    ) -> None:
        self.truncate = truncate
        self.share_prefix = share_prefix
        self.batch_classes = batch_classes
        self.max_batch_rows = max_batch_rows
        self.memory_budget_bytes = memory_budget_bytes
        self.amp = amp
        self.asr_batch_size = asr_batch_size
        self.last_plan: dict[str, int | bool] = {}  # what the last invert() chose (for reports/benchmarks)

    # ------------------------------------------------------------------ helpers

    def _use_amp(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return True if self.amp is None else bool(self.amp)

    def _budget(self, device: torch.device) -> int:
        if self.memory_budget_bytes is not None:
            return int(self.memory_budget_bytes)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free * CUDA_BUDGET_FRACTION)
        return DEFAULT_CPU_BUDGET

    def _autocast(self, amp: bool) -> contextlib.AbstractContextManager[None]:
        if amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, model: PromptTunedCLIP, images: torch.Tensor, plan: TextPlan | None, amp: bool) -> torch.Tensor:
        with self._autocast(amp):
            out = fast_logits(model, images, plan, self.share_prefix)
        return out.float()

    # ------------------------------------------------------------------ the scan

    def invert(
        self,
        model: PromptTunedCLIP,
        inversion_pool: torch.Tensor,
        holdout: torch.Tensor,
        candidates: list[int],
        settings: InversionSettings,
        progress: Progress = no_progress,
    ) -> list[ClassInversion]:
        device = model.device
        model.eval()
        if model.kind != ModelKind.COCOOP and model._cached_text is None:
            model.freeze_text()
        plan = text_plan(model, self.truncate) if model.kind == ModelKind.COCOOP else None
        amp = self._use_amp(device)
        budget = self._budget(device)
        per_row = max(row_bytes(model, plan, self.share_prefix, train=True, amp=amp), 1)
        rows = self.max_batch_rows if self.max_batch_rows is not None else max(1, budget // per_row)
        bs = settings.batch_size
        group = max(1, rows // bs) if self.batch_classes else 1
        micro = min(bs, max(1, rows))  # < bs only when one class does not fit: gradient accumulation
        per_row_eval = max(row_bytes(model, plan, self.share_prefix, train=False, amp=amp), 1)
        asr_rows = max(1, min(self.asr_batch_size, budget // per_row_eval))
        self.last_plan = {
            "classes_per_step": group,
            "micro_batch": micro,
            "asr_rows": asr_rows,
            "text_length": plan.length if plan is not None else 0,
            "shared_prefix": bool(plan is not None and plan.shareable and self.share_prefix),
            "exact_text": bool(plan is not None and not (plan.cuttable and model.shared_end_context)),
            "amp": amp,
            "row_bytes": per_row,
        }
        out: list[ClassInversion] = []
        total = len(candidates)
        for start in range(0, total, group):
            chunk = candidates[start : start + group]
            progress(start, total, model.classnames[chunk[0]])
            deltas, l_avg = self._invert_group(model, inversion_pool, chunk, settings, device, plan, amp, micro)
            asr = self._asr_group(model, holdout, deltas, chunk, plan, amp, asr_rows)
            for g, c in enumerate(chunk):
                metrics = ClassMetrics(index=c, name=model.classnames[c], asr=asr[g], loss=l_avg[g])
                out.append(ClassInversion(metrics, deltas[g].cpu().clone()))  # own storage, not a view
        progress(total, total, "")
        return out

    def _invert_group(
        self,
        model: PromptTunedCLIP,
        pool: torch.Tensor,
        classes: list[int],
        settings: InversionSettings,
        device: torch.device,
        plan: TextPlan | None,
        amp: bool,
        micro: int,
    ) -> tuple[torch.Tensor, list[float]]:
        """Optimize the triggers of ``classes`` together; returns (deltas (G,3,H,W), L_avg per class)."""
        eps = settings.epsilon
        shape = tuple(pool.shape[1:])
        n = len(classes)
        deltas = torch.stack([init_trigger(shape, eps, settings.seed, c) for c in classes])
        deltas = deltas.to(device).requires_grad_(True)
        opt = torch.optim.Adam([deltas], lr=settings.lr)  # == one Adam per class (elementwise)
        losses: list[list[torch.Tensor]] = [[] for _ in classes]
        for _ in range(settings.epochs):
            for i in range(0, len(pool), settings.batch_size):
                x = pool[i : i + settings.batch_size].to(device)
                b = len(x)
                opt.zero_grad(set_to_none=True)
                step: list[torch.Tensor] = []
                for sl in _slices(b, micro):
                    xm = x[sl]
                    m = len(xm)
                    triggered = apply_trigger(xm.unsqueeze(0), deltas.unsqueeze(1)).reshape(n * m, *shape)
                    logits = self._logits(model, triggered, plan, amp)
                    # per class: the reference's loss on its own rows; summed, so gradients don't mix
                    parts = [margin_loss(logits[g * m : (g + 1) * m], c) for g, c in enumerate(classes)]
                    if m != b:  # micro-batches: the batch mean is the size-weighted sum of micro means
                        parts = [p * (m / b) for p in parts]
                    torch.stack(parts).sum().backward()
                    done = [p.detach() for p in parts]
                    step = done if not step else [s + d for s, d in zip(step, done, strict=True)]
                opt.step()
                with torch.no_grad():
                    deltas.clamp_(-eps, eps)
                for g in range(n):
                    losses[g].append(step[g])
        l_avg = [float(torch.stack(ls).mean()) for ls in losses]
        return deltas.detach(), l_avg

    @torch.no_grad()
    def _asr_group(
        self,
        model: PromptTunedCLIP,
        holdout: torch.Tensor,
        deltas: torch.Tensor,
        classes: list[int],
        plan: TextPlan | None,
        amp: bool,
        rows: int,
    ) -> list[float]:
        """Eq. 5 for each class of the group (same definition as ``attack_success_rate``)."""
        device = deltas.device
        n = len(classes)
        hits = [0] * n
        targets = torch.tensor(classes, device=device)
        per = max(1, rows // n)  # hold-out images per forward, all classes of the group at once
        for sl in _slices(len(holdout), per):
            x = holdout[sl].to(device)
            m = len(x)
            triggered = apply_trigger(x.unsqueeze(0), deltas.unsqueeze(1)).reshape(n * m, *x.shape[1:])
            pred = self._logits(model, triggered, plan, amp).argmax(dim=1).view(n, m)
            counts = (pred == targets.view(n, 1)).sum(dim=1).tolist()
            hits = [h + int(c) for h, c in zip(hits, counts, strict=True)]
        return [h / len(holdout) for h in hits]
