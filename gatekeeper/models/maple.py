"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompt learning on a frozen open_clip ViT.

The prompt learner holds, for prompt depth J:

- ``ctx`` [n_ctx, d_text]: the text context at layer 0, as CoOp's ([SOS, ctx, class, '.', EOT]);
- ``proj`` Linear(d_text -> d_vision): ``proj(ctx)`` are the n_ctx visual prompt tokens at layer 0,
  appended after the class and patch tokens (after the positional embedding, before ``ln_pre``);
- for layers i = 1..J-1, ``compound_prompts_text[i-1]`` [n_ctx, d_text] and
  ``compound_prompt_projections[i-1]`` Linear(d_text -> d_vision): before block i runs, the text
  tokens 1..n_ctx are replaced by the text prompt and the last n_ctx vision tokens by its projection.

Both encoders stay the backbone's own modules; only the token sequences they run on change. The
text side does not depend on the image, so its features can be cached (``freeze_text``) exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gatekeeper.errors import ModelFormatError
from gatekeeper.models.manifest import Manifest, ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.untrusted import short

DEEP_TEXT = "compound_prompts_text"
DEEP_PROJ = "compound_prompt_projections"


def maple_keys(depth: int) -> list[str]:
    """The tensor names of a MaPLe prompt learner of prompt depth ``depth`` (Dassl's, without ``prompt_learner.``)."""
    keys = ["ctx", "proj.weight", "proj.bias"]
    for i in range(depth - 1):
        keys += [f"{DEEP_TEXT}.{i}", f"{DEEP_PROJ}.{i}.weight", f"{DEEP_PROJ}.{i}.bias"]
    return keys


def maple_lead(ctx_init: str | None, n_ctx: int) -> str | None:
    """The text MaPLe writes before each class name, or None for CoOp's "X X ... X".

    MaPLe keeps N_CTX when CTX_INIT is given (at most 4 context words) and tokenizes
    "{CTX_INIT} {name}." as it is: with its shipped config (N_CTX 2, "a photo of a") the stored
    suffix, and so the prompt, is [SOS, ctx_1, ctx_2, "of", "a", name, ".", EOT].
    """
    if ctx_init and n_ctx <= 4:
        return ctx_init.replace("_", " ")
    return None


def backbone_problem(clip: Any) -> str | None:
    """Why MaPLe cannot run on ``clip``, or None: it needs open_clip's ViT image tower pooling the
    class token and open_clip's own text transformer."""
    visual = getattr(clip, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    if visual is None or not all(hasattr(visual, a) for a in needed) or not hasattr(visual.transformer, "resblocks"):
        return (
            f"MaPLe prompts a ViT image encoder, but this backbone's image tower is {type(visual).__name__} "
            "(a ResNet or another non-ViT tower)"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        return "MaPLe pools the ViT's class token; this backbone's image tower pools otherwise (attention or average pooling)"
    text = getattr(clip, "transformer", None)
    if text is None or not hasattr(text, "resblocks") or not hasattr(clip, "token_embedding"):
        return "MaPLe prompts CLIP's own text transformer; this backbone's text tower is another model"
    return None


def _run_blocks(
    transformer: Any, x: torch.Tensor, attn_mask: torch.Tensor | None, inject: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Run ``transformer``'s blocks on batch-first ``x``, with ``inject(i, x)`` before block i."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        x = inject(i, x)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:  # pragma: no cover - open_clip >= 2.2x runs batch first
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


class MaPLeCLIP(PromptTunedCLIP):
    """A frozen open_clip ViT CLIP with a MaPLe prompt learner (see the module docstring).

    Args:
        clip, tokenizer, manifest: as :class:`PromptTunedCLIP` (``manifest.kind`` is maple,
            ``manifest.prompt_depth`` is J).
        ctx: the text context (n_ctx, d_text).
        proj: Linear(d_text, d_vision) giving the layer-0 visual prompts.
        deep_text: J - 1 tensors (n_ctx, d_text), the text prompts of layers 1..J-1.
        deep_proj: J - 1 Linear(d_text, d_vision), their projections to the vision side.

    Raises:
        ValueError: a non-ViT backbone, a depth deeper than either encoder, or shapes that do not fit.
    """

    def __init__(
        self,
        clip: Any,
        tokenizer: Any,
        manifest: Manifest,
        ctx: torch.Tensor,
        proj: nn.Linear,
        deep_text: Sequence[torch.Tensor],
        deep_proj: Sequence[nn.Linear],
    ) -> None:
        if manifest.kind != ModelKind.MAPLE:
            raise ValueError(f"MaPLeCLIP needs a maple manifest, got {manifest.kind.value}")
        problem = backbone_problem(clip)
        if problem:
            raise ValueError(problem)
        super().__init__(clip, tokenizer, manifest, ctx=ctx)
        lead = maple_lead(manifest.ctx_init, manifest.n_ctx)
        if lead is not None:  # MaPLe's prompt text: rebuild what PromptTunedCLIP built from "X ... X"
            tokenized = tokenizer([f"{lead} {c}." for c in self.classnames])
            with torch.no_grad():
                emb = clip.token_embedding(tokenized).to(clip.positional_embedding.dtype)
            self.tokenized, self.token_prefix = tokenized, emb[:, :1].clone()
            self.token_suffix = emb[:, 1 + manifest.n_ctx :].clone()
        depth, n_ctx = manifest.prompt_depth, manifest.n_ctx
        layers = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        if not 1 <= depth <= layers:
            raise ValueError(f"prompt depth {depth} is not in [1, {layers}] (the layers of the shallower encoder)")
        if len(deep_text) != depth - 1 or len(deep_proj) != depth - 1:
            raise ValueError(f"prompt depth {depth} needs {depth - 1} deep text prompts and projections")
        d_text = int(clip.ln_final.weight.shape[0])
        d_vision = int(clip.visual.transformer.width)
        for i, (t, p) in enumerate(zip(deep_text, deep_proj, strict=True)):
            if tuple(t.shape) != (n_ctx, d_text):
                raise ValueError(f"deep text prompt {i} has shape {tuple(t.shape)}, expected {(n_ctx, d_text)}")
            if (p.in_features, p.out_features) != (d_text, d_vision):
                raise ValueError(f"deep projection {i} maps {p.in_features} -> {p.out_features}, expected {d_text} -> {d_vision}")
        if (proj.in_features, proj.out_features) != (d_text, d_vision):
            raise ValueError(f"proj maps {proj.in_features} -> {proj.out_features}, expected {d_text} -> {d_vision}")
        self.proj = proj
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(t.detach().float().clone()) for t in deep_text])
        self.compound_prompt_projections = nn.ModuleList(deep_proj)

    # ------------------------------------------------------------------ prompts

    def prompt_parameters(self) -> list[nn.Parameter]:
        """Every learned tensor of the prompt learner (what tuning trains)."""
        assert self.ctx is not None
        return [self.ctx, *self.proj.parameters(), *self.compound_prompts_text, *self.compound_prompt_projections.parameters()]

    def visual_prompts(self) -> list[torch.Tensor]:
        """The vision prompts (n_ctx, d_vision) of layers 0..J-1."""
        assert self.ctx is not None
        deep = [p(t) for p, t in zip(self.compound_prompt_projections, self.compound_prompts_text, strict=True)]
        return [self.proj(self.ctx), *deep]

    @torch.no_grad()
    def reset_prompts(self, seed: int) -> None:
        """Re-initialise proj and the deep prompts as MaPLe does (normal(0.02) prompts, default Linear
        init), from ``seed`` on the CPU; ``ctx`` is left to the caller."""
        g = torch.Generator().manual_seed(seed)
        for t in self.compound_prompts_text:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        for lin in [self.proj, *self.compound_prompt_projections]:
            assert isinstance(lin, nn.Linear)
            bound = lin.in_features**-0.5  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=g) * 2 - 1) * bound)

    # ------------------------------------------------------------------ encoders

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized image features of pixel-space images in [0, 1], the visual prompts injected."""
        visual: Any = self.clip.visual
        x = (images - self.pixel_mean) / self.pixel_std
        x = visual.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, patches, width)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x) if hasattr(visual, "patch_dropout") else x
        prompts = [p.to(x.dtype) for p in self.visual_prompts()]
        b, n = x.shape[0], self.manifest.n_ctx
        x = visual.ln_pre(torch.cat([x, prompts[0].unsqueeze(0).expand(b, -1, -1)], dim=1))

        def inject(i: int, h: torch.Tensor) -> torch.Tensor:
            if 1 <= i < len(prompts):  # replace the previous layer's prompt outputs
                return torch.cat([h[:, :-n], prompts[i].unsqueeze(0).expand(b, -1, -1)], dim=1)
            return h

        x = _run_blocks(visual.transformer, x, None, inject)
        pooled = visual.ln_post(x[:, 0])  # LayerNorm acts per token: the same before or after pooling
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1)

    def text_features(self) -> torch.Tensor:
        """Class text features (K, e), the deep text prompts injected (image-independent)."""
        clip: Any = self.clip
        assert self.ctx is not None
        prompts = self.class_prompts(self.ctx)
        length = prompts.shape[1]
        x = prompts + clip.positional_embedding[:length].to(prompts.dtype)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        deep = list(self.compound_prompts_text)
        k, n = x.shape[0], self.manifest.n_ctx

        def inject(i: int, h: torch.Tensor) -> torch.Tensor:
            if 1 <= i <= len(deep):  # tokens 1..n_ctx, after SOS, take this layer's prompt
                return torch.cat([h[:, :1], deep[i - 1].to(h.dtype).unsqueeze(0).expand(k, -1, -1), h[:, 1 + n :]], dim=1)
            return h

        x = clip.ln_final(_run_blocks(clip.transformer, x, mask, inject))
        x = x[torch.arange(k, device=x.device), self.eot_index]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def prompt_learner_state(self) -> dict[str, torch.Tensor]:
        """ctx, proj.*, compound_prompts_text.i, compound_prompt_projections.i.* (MaPLe's names)."""
        out = super().prompt_learner_state()
        for prefix, module in (("proj", self.proj), (DEEP_TEXT, self.compound_prompts_text), (DEEP_PROJ, self.compound_prompt_projections)):
            for name, t in module.state_dict().items():
                out[f"{prefix}.{name}"] = t.detach().contiguous()
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(int(weight.shape[1]), int(weight.shape[0]))
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin


def maple_from_state(clip: Any, tokenizer: Any, manifest: Manifest, state: dict[str, torch.Tensor], where: Path) -> MaPLeCLIP:
    """A :class:`MaPLeCLIP` from prompt_learner.safetensors' tensors, every name and shape checked.

    Raises:
        ModelFormatError: a non-ViT backbone, missing or unknown tensors, or shapes that do not fit
            the manifest (n_ctx, prompt_depth) and the backbone's widths.
    """
    problem = backbone_problem(clip)
    if problem:
        raise ModelFormatError(f"{where}: {problem}", "MaPLe runs on CLIP ViT backbones only (e.g. ViT-B-16)")
    depth, n_ctx = manifest.prompt_depth, manifest.n_ctx
    layers = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
    if depth > layers:
        raise ModelFormatError(
            f"{where}: prompt_depth {depth} is deeper than the backbone's encoders ({layers} layers in the shallower one)",
            "fix prompt_depth in gatekeeper.json, or give the backbone the model was trained on",
        )
    keys = maple_keys(depth)
    missing = [k for k in keys if k not in state]
    extra = sorted(set(state) - set(keys))
    if missing or extra:
        raise ModelFormatError(
            f"{where}: a MaPLe prompt learner of depth {depth} holds {short(keys[:6])}...; "
            f"missing {short(missing[:5])}, unexpected {short(extra[:5])}",
            "check prompt_depth and kind in gatekeeper.json",
        )
    d_text, d_vision = int(clip.ln_final.weight.shape[0]), int(clip.visual.transformer.width)
    want = {"ctx": (n_ctx, d_text), "proj.weight": (d_vision, d_text), "proj.bias": (d_vision,)}
    for i in range(depth - 1):
        want |= {f"{DEEP_TEXT}.{i}": (n_ctx, d_text), f"{DEEP_PROJ}.{i}.weight": (d_vision, d_text), f"{DEEP_PROJ}.{i}.bias": (d_vision,)}
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise ModelFormatError(
                f"{where}: tensor '{key}' has shape {tuple(state[key].shape)}, expected {shape} from the manifest and backbone",
                "check n_ctx and the backbone named in gatekeeper.json",
            )
    proj = _linear(state["proj.weight"], state["proj.bias"])
    deep_text = [state[f"{DEEP_TEXT}.{i}"] for i in range(depth - 1)]
    deep_proj = [_linear(state[f"{DEEP_PROJ}.{i}.weight"], state[f"{DEEP_PROJ}.{i}.bias"]) for i in range(depth - 1)]
    return MaPLeCLIP(clip, tokenizer, manifest, state["ctx"], proj, deep_text, deep_proj)
