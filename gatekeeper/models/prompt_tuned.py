"""PromptTunedCLIP: one differentiable ``logits(images)`` for CoOp, CoCoOp and zero-shot CLIP.

Images are pixel-space tensors in [0, 1] of shape (B, 3, H, W); CLIP normalization happens
inside so that triggers live in pixel space (docs/method.md, "The model under audit").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gatekeeper.models.manifest import Manifest, ModelKind

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def meta_net_hidden(vis_dim: int) -> int:
    """Width of CoCoOp's meta-net hidden layer: vis_dim // 16 (at least 1)."""
    return max(vis_dim // 16, 1)


def build_meta_net(vis_dim: int, ctx_dim: int, hidden: int | None = None) -> nn.Sequential:
    """CoCoOp's meta-net h_theta: Linear(vis, hidden) -> ReLU -> Linear(hidden, ctx_dim).

    ``hidden`` defaults to CoCoOp's vis_dim // 16; a model folder may carry another width (the
    loader reads it from the weights' shapes).
    """
    hidden = hidden or meta_net_hidden(vis_dim)
    return nn.Sequential(
        OrderedDict(
            [
                ("linear1", nn.Linear(vis_dim, hidden)),
                ("relu", nn.ReLU(inplace=True)),
                ("linear2", nn.Linear(hidden, ctx_dim)),
            ]
        )
    )


def pixel_normalisation(clip: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's own pixel mean and std, as open_clip set them from its config
    (``clip.visual.preprocess_cfg``); OpenAI CLIP's when the backbone does not say."""
    cfg = getattr(getattr(clip, "visual", None), "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class PromptTunedCLIP(nn.Module):
    """A frozen open_clip CLIP plus a (CoOp/CoCoOp) prompt learner or zero-shot prompts.

    Args:
        clip: an open_clip ``CLIP`` (standard text transformer), frozen.
        tokenizer: its tokenizer.
        manifest: kind, class names, n_ctx, template.
        ctx: learned context (n_ctx, ctx_dim) for CoOp/CoCoOp; None for zero-shot.
        meta_net: CoCoOp's meta-net; None otherwise.
    """

    tokenized: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    ctx: nn.Parameter | None
    meta_net: nn.Module | None

    def __init__(
        self,
        clip: Any,
        tokenizer: Any,
        manifest: Manifest,
        ctx: torch.Tensor | None = None,
        meta_net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.kind = manifest.kind
        self.classnames = list(manifest.classnames)
        self.image_size = manifest.image_size
        mean, std = pixel_normalisation(clip)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._cached_text: torch.Tensor | None = None
        if self.kind == ModelKind.ZEROSHOT:
            prompts = [manifest.template.format(c) for c in self.classnames]
            self.register_buffer("tokenized", tokenizer(prompts), persistent=False)
            self.ctx = None
            self.meta_net = None
            return
        n_ctx = manifest.n_ctx
        # CoOp convention: "X X ... X {class}." so the ctx slots sit at positions 1..n_ctx.
        placeholder = " ".join(["X"] * n_ctx)
        tokenized = tokenizer([f"{placeholder} {c}." for c in self.classnames])
        with torch.no_grad():
            emb = clip.token_embedding(tokenized).to(clip.positional_embedding.dtype)
        self.register_buffer("tokenized", tokenized, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)  # class, ., EOT
        if ctx is None:
            raise ValueError("ctx is required for coop/cocoop")
        self.ctx = nn.Parameter(ctx.float().clone())
        self.meta_net = meta_net

    # ------------------------------------------------------------------ pieces

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (its registered buffers live with the parameters)."""
        return next(iter(self.buffers())).device

    @property
    def eot_index(self) -> torch.Tensor:
        """Position of the end-of-text token per class (open_clip pools at argmax token id)."""
        return self.tokenized.argmax(dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized image features of pixel-space images in [0, 1]."""
        x = (images - self.pixel_mean) / self.pixel_std
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def encode_prompt_embeddings(self, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text transformer on token embeddings (N, L, d), pooled at ``eot`` (N,); normalized."""
        clip = self.clip
        x = prompts + clip.positional_embedding[: prompts.shape[1]].to(prompts.dtype)
        attn_mask = clip.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[: prompts.shape[1], : prompts.shape[1]]
        x = clip.transformer(x, attn_mask=attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def class_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """[SOS, ctx_1..ctx_n, class tokens, '.', EOT] for every class: (K, L, d)."""
        k = self.token_prefix.shape[0]
        return torch.cat([self.token_prefix, ctx.unsqueeze(0).expand(k, -1, -1), self.token_suffix], dim=1)

    def text_features(self) -> torch.Tensor:
        """Class text features (K, e) for CoOp and zero-shot (image-independent)."""
        if self.kind == ModelKind.ZEROSHOT:
            return F.normalize(self.clip.encode_text(self.tokenized), dim=-1)
        assert self.ctx is not None
        return self.encode_prompt_embeddings(self.class_prompts(self.ctx), self.eot_index)

    def thaw_text(self) -> None:
        """Drop cached text features, so the prompt learner gets gradients again (before training)."""
        self._cached_text = None

    def freeze_text(self) -> None:
        """Cache image-independent text features (CoOp, zero-shot); a no-op for CoCoOp."""
        self._cached_text = None
        if self.kind != ModelKind.COCOOP:
            with torch.no_grad():
                self._cached_text = self.text_features()

    # ------------------------------------------------------------------ forward

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) = scale * cos(f_I(x), f_T(prompt_k(x))); differentiable in images."""
        imf = self.image_features(images)
        if self.kind != ModelKind.COCOOP:
            tf = self._cached_text if self._cached_text is not None else self.text_features()
            return self.logit_scale * imf @ tf.t()
        assert self.ctx is not None and self.meta_net is not None
        bias = self.meta_net(imf)  # (B, d)
        ctx_shifted = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, n_ctx, d)
        b, k = imf.shape[0], len(self.classnames)
        prefix = self.token_prefix.unsqueeze(0).expand(b, -1, -1, -1)
        suffix = self.token_suffix.unsqueeze(0).expand(b, -1, -1, -1)
        ctx_all = ctx_shifted.unsqueeze(1).expand(-1, k, -1, -1)
        prompts = torch.cat([prefix, ctx_all, suffix], dim=2).reshape(b * k, -1, ctx_shifted.shape[-1])
        tf = self.encode_prompt_embeddings(prompts, self.eot_index.repeat(b)).view(b, k, -1)
        return self.logit_scale * torch.einsum("be,bke->bk", imf, tf)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)

    def prompt_learner_state(self) -> dict[str, torch.Tensor]:
        """The tensors stored in prompt_learner.safetensors."""
        out: dict[str, torch.Tensor] = {}
        if self.ctx is not None:
            out["ctx"] = self.ctx.detach().contiguous()
        if self.meta_net is not None:
            for name, t in self.meta_net.state_dict().items():
                out[f"meta_net.{name}"] = t.detach().contiguous()
        return out


@torch.no_grad()
def predict(model: PromptTunedCLIP, x: torch.Tensor, transform: Any = None, batch: int = 256) -> torch.Tensor:
    """Predicted class indices (on the CPU) for images ``x``, in batches moved to the model's device;
    ``transform`` (e.g. stamping a trigger) is applied to each batch on that device."""
    device = model.device
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device)
        out.append(model.logits(transform(xb) if transform is not None else xb).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: PromptTunedCLIP, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Share of ``x`` predicted as its label ``y``."""
    return float((predict(model, x, batch=batch) == y).float().mean()) if len(x) else 0.0
