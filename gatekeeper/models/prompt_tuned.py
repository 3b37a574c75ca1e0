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

from gatekeeper.models.manifest import ClassTokenPosition, Manifest, ModelKind, option_problem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's text_global_pool choices that give one feature per prompt: at the highest token id
# (CLIP's EOT), at the first eos_id token, at the first or at the last position
TEXT_POOL_TYPES = ("argmax", "eos", "first", "last")


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


def image_resize(clip: Any) -> tuple[str, str]:
    """How the backbone's own preprocessing fits an image to its input size: (``resize_mode``,
    ``interpolation``) from ``clip.visual.preprocess_cfg``; open_clip's defaults (``shortest``,
    ``bicubic``) where it does not say. ``random`` interpolation is a training augmentation: bicubic."""
    cfg = getattr(getattr(clip, "visual", None), "preprocess_cfg", None) or {}
    mode = str(cfg.get("resize_mode", "shortest"))
    interpolation = str(cfg.get("interpolation", "bicubic"))
    return mode, "bicubic" if interpolation == "random" else interpolation


def class_name_lengths(tokenizer: Any, classnames: list[str]) -> list[int]:
    """Tokens of each class name on its own, as CoOp counts them to place the class in its prompt.

    The tokenizer writes [SOS, name tokens, EOT, pad...] and EOT has the highest id, so a name's
    length is the EOT position minus one.
    """
    return [int(row.argmax()) - 1 for row in tokenizer(classnames)]


def prompt_order(position: ClassTokenPosition, n_ctx: int, name_lens: list[int], length: int) -> torch.Tensor | None:
    """Per class, the positions of the end layout [SOS, ctx_1..ctx_n, class, '.', EOT, ...] that make
    up its prompt at ``position`` (K, length); None for ``end`` (the end layout itself).

    CoOp's PromptLearner cuts the class tokens off the front of each class's suffix (their count is
    the class name's own token length) and puts them before the context (``front``) or between its
    first n_ctx // 2 vectors and the rest (``middle``); the '.', EOT and padding follow unchanged.
    """
    if position == ClassTokenPosition.END:
        return None
    rows = []
    for m in name_lens:
        m = max(0, min(m, length - 1 - n_ctx))  # a name cut by the context length keeps what is there
        ctx = list(range(1, 1 + n_ctx))
        cls = list(range(1 + n_ctx, 1 + n_ctx + m))
        rest = list(range(1 + n_ctx + m, length))
        if position == ClassTokenPosition.FRONT:
            rows.append([0, *cls, *ctx, *rest])
        else:
            half = n_ctx // 2
            rows.append([0, *ctx[:half], *cls, *ctx[half:], *rest])
    return torch.tensor(rows, dtype=torch.long)


class PromptTunedCLIP(nn.Module):
    """A frozen open_clip CLIP plus a (CoOp/CoCoOp) prompt learner or zero-shot prompts.

    Args:
        clip: an open_clip ``CLIP`` (standard text transformer), frozen.
        tokenizer: its tokenizer.
        manifest: kind, class names, n_ctx, template, and CoOp's options (``csc``,
            ``class_token_position``).
        ctx: learned context for CoOp/CoCoOp, (n_ctx, ctx_dim), or (K, n_ctx, ctx_dim) for CoOp
            with class-specific contexts; None for zero-shot.
        meta_net: CoCoOp's meta-net; None otherwise.

    Raises:
        ValueError: no ``ctx`` for CoOp/CoCoOp, a ``ctx`` whose shape does not match ``csc``,
            ``n_ctx`` and the classes, or a CoOp option on a CoCoOp model.
    """

    tokenized: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    prompt_order: torch.Tensor | None
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
        self.normalisation = (mean, std)  # recorded in the scan result (ModelInfo)
        self.resize = image_resize(clip)  # how a folder of OOD images is fitted to image_size
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("prompt_order", None, persistent=False)
        self._cached_text: torch.Tensor | None = None
        if self.kind == ModelKind.ZEROSHOT:
            prompts = [manifest.template.format(c) for c in self.classnames]
            self.register_buffer("tokenized", tokenizer(prompts), persistent=False)
            self.ctx = None
            self.meta_net = None
            return
        problem = option_problem(self.kind, manifest.csc, manifest.class_token_position)
        if problem:
            raise ValueError(problem)
        n_ctx, k = manifest.n_ctx, len(self.classnames)
        if ctx is None:
            raise ValueError("ctx is required for coop/cocoop")
        want = (k, n_ctx) if manifest.csc else (n_ctx,)
        if tuple(ctx.shape[:-1]) != want:
            raise ValueError(f"ctx has shape {tuple(ctx.shape)}; expected {(*want, 'ctx_dim')}")
        # CoOp convention: "X X ... X {class}." so the ctx slots sit at positions 1..n_ctx; the
        # other class token positions permute this layout (prompt_order), the EOT stays in place.
        placeholder = " ".join(["X"] * n_ctx)
        tokenized = tokenizer([f"{placeholder} {c}." for c in self.classnames])
        with torch.no_grad():
            emb = clip.token_embedding(tokenized).to(clip.positional_embedding.dtype)
        self.register_buffer("tokenized", tokenized, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)  # class, ., EOT
        position = manifest.class_token_position
        if position != ClassTokenPosition.END:
            lens = class_name_lengths(tokenizer, self.classnames)
            self.prompt_order = prompt_order(position, n_ctx, lens, int(tokenized.shape[1]))
        self.ctx = nn.Parameter(ctx.float().clone())
        self.meta_net = meta_net

    @property
    def shared_end_context(self) -> bool:
        """True when every class's prompt is [SOS, the one ctx, class tokens, ...] (CoCoOp, and CoOp
        without CSC and with the class token at the end): the layout the fast path's prefix sharing
        relies on."""
        return self.prompt_order is None and (self.ctx is None or self.ctx.dim() == 2)

    # ------------------------------------------------------------------ pieces

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (its registered buffers live with the parameters)."""
        return next(iter(self.buffers())).device

    @property
    def eot_index(self) -> torch.Tensor:
        """Position of the end-of-text token per class: the highest token id, or for a text tower
        pooled at ``eos`` the first ``text_eos_id`` token, as open_clip's ``text_global_pool`` finds it."""
        if getattr(self.clip, "text_pool_type", "argmax") == "eos":
            return (self.tokenized == int(self.clip.text_eos_id)).int().argmax(dim=-1)
        return self.tokenized.argmax(dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized image features of pixel-space images in [0, 1]."""
        x = (images - self.pixel_mean) / self.pixel_std
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def encode_prompt_embeddings(self, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text transformer on token embeddings (N, L, d), pooled as the text tower pools (at ``eot``
        (N,) for ``argmax`` / ``eos``, else the first or last position); normalized."""
        clip = self.clip
        x = prompts + clip.positional_embedding[: prompts.shape[1]].to(prompts.dtype)
        attn_mask = clip.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[: prompts.shape[1], : prompts.shape[1]]
        x = clip.transformer(x, attn_mask=attn_mask)
        x = clip.ln_final(x)
        pool = getattr(clip, "text_pool_type", "argmax")
        if pool == "first":
            x = x[:, 0]
        elif pool == "last":
            x = x[:, -1]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def class_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """Every class's prompt embeddings (K, L, d) from ``ctx`` (n_ctx, d) or, CSC, (K, n_ctx, d).

        At the end: [SOS, ctx_1..ctx_n, class tokens, '.', EOT, ...]; other class token positions
        rearrange those tokens per class (:func:`prompt_order`).
        """
        k = self.token_prefix.shape[0]
        per_class = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(k, -1, -1)
        prompts = torch.cat([self.token_prefix, per_class, self.token_suffix], dim=1)
        if self.prompt_order is None:
            return prompts
        return prompts.gather(1, self.prompt_order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))

    def text_features(self) -> torch.Tensor:
        """Class text features (K, e) for CoOp and zero-shot (image-independent)."""
        if self.kind == ModelKind.ZEROSHOT:
            return F.normalize(self.clip.encode_text(self.tokenized), dim=-1)
        assert self.ctx is not None
        return self.encode_prompt_embeddings(self.class_prompts(self.ctx), self.eot_index)

    def train(self, mode: bool = True) -> PromptTunedCLIP:
        """Only the prompt learner trains: the frozen encoders stay in eval mode. They are shared
        with every copy the gate trains (the control's plant, the null copies), so a train-mode
        tower would use batch statistics in a ResNet's BatchNorm and overwrite its running
        statistics, changing the candidate under its own scan."""
        self.training = mode
        for child in self.children():  # the towers never pass through train mode (another part may be reading them)
            child.train(mode and child is not self.clip)
        return self

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
        return self.logits_from_features(self.image_features(images))

    def logits_from_features(self, imf: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) from normalized image features ``imf`` (B, e)."""
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
