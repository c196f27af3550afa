"""Independent reference computations of the official DINOv2 forward pass (tests only).

1. The official code as published on PyPI (``dinov2==0.0.1.dev2``, installed with
   ``--no-deps``). That 2023 snapshot predates register tokens; its hub-equivalent models are
   ``vit_*(patch_size=14, img_size=518, init_values=1.0, ffn_layer=..., block_chunks=0)`` and its
   position-embedding resampling is the plain models' one (bicubic, scale factor
   ``(grid + 0.1) / 37``, no antialias). Attention there is the naive softmax(q k^T) v.
2. For the register models, :class:`SnapshotWithRegisters` extends that snapshot the way the
   newer official code does: 4 ``register_tokens`` inserted after the position embeddings between
   the class token and the patches, and the ``interpolate_offset`` / ``interpolate_antialias``
   settings of the hub's ``*_reg`` models (offset 0 -> bicubic to the exact size, antialias on).
   Blocks, norms and attention stay the snapshot's own.
3. timm's DINOv2 models (``vit_*_patch14[_reg4]_dinov2``, ``dynamic_img_size=True``) loaded through
   timm's own converter of Meta's files: a third-party implementation. Its resampling is
   bicubic-to-size with antialias, which equals the official register models' setting but not
   the plain models' one.
"""
from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Mapping

import torch
import torch.nn.functional as F

from protosam.models.dinov2 import DinoV2Architecture

logger = logging.getLogger(__name__)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "xFormers not available": the naive path is what we want
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models import vision_transformer as snapshot

_SNAPSHOT_BUILDERS = {384: snapshot.vit_small, 768: snapshot.vit_base, 1024: snapshot.vit_large, 1536: snapshot.vit_giant2}
_TIMM_NAMES = {384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant"}
# dinov2/hub/backbones.py (newer official code), dinov2_vit*14_reg: 4 registers, these settings.
HUB_REGISTER_MODEL_SETTINGS = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)


class SnapshotWithRegisters(snapshot.DinoVisionTransformer):
    """The snapshot's ViT plus register tokens and configurable resampling (newer official behaviour)."""

    def __init__(self, *, num_register_tokens: int, interpolate_offset: float, interpolate_antialias: bool, **kwargs):
        super().__init__(**kwargs)
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.register_tokens = (
            torch.nn.Parameter(torch.zeros(1, num_register_tokens, self.embed_dim)) if num_register_tokens else None
        )

    def interpolate_pos_encoding(self, x, w, h):  # x: B x (1 + N) x C; (w, h) = image (rows, cols)
        npatch = x.shape[1] - 1
        n_trained = self.pos_embed.shape[1] - 1
        if npatch == n_trained and w == h:
            return self.pos_embed
        side = int(round(n_trained ** 0.5))
        rows, cols = w // self.patch_size, h // self.patch_size
        grid = self.pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((rows + self.interpolate_offset) / side, (cols + self.interpolate_offset) / side)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=self.interpolate_antialias)
        assert grid.shape[-2:] == (rows, cols)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat((self.pos_embed[:, :1].float(), patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        x = super().prepare_tokens_with_masks(x, masks)
        if self.register_tokens is None:
            return x
        return torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)

    def forward_features(self, x, masks=None):
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1 + self.num_register_tokens:]}


def build_snapshot_model(arch: DinoV2Architecture, *, meta: bool = False) -> torch.nn.Module:
    """The official (snapshot) model for ``arch`` with the hub's constructor arguments.

    Architectures without registers use the snapshot's own classes (``vit_small/base/large/giant2``,
    or ``DinoVisionTransformer`` with the tiny sizes); register models use
    :class:`SnapshotWithRegisters`. ``meta=True`` builds it on the meta device (shapes only;
    ``drop_path_uniform`` avoids a ``.item()`` there; the drop-path rate is 0 either way).
    """
    hub_kwargs = dict(
        patch_size=arch.patch_size, img_size=arch.patch_size * arch.pos_embed_grid,
        init_values=1.0, ffn_layer=arch.ffn_layer, block_chunks=0, drop_path_uniform=True,
    )
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        if not arch.num_register_tokens:
            # Plain models: exactly the snapshot's code, resampling included (offset 0.1, no antialias).
            if arch.test_only:
                model = snapshot.DinoVisionTransformer(
                    embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio,
                    block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), **hub_kwargs,
                )
            else:
                model = _SNAPSHOT_BUILDERS[arch.embed_dim](**hub_kwargs)
        else:
            assert arch.num_register_tokens == 4
            model = SnapshotWithRegisters(
                **HUB_REGISTER_MODEL_SETTINGS,  # the hub's values, not the architecture's (under test)
                embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio,
                block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
                **hub_kwargs,
            )
    return model.eval()


def snapshot_patch_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``x_norm_patchtokens`` of the official forward pass, reshaped to ``B x C x H/14 x W/14``."""
    with torch.no_grad():
        tokens = model.forward_features(images)["x_norm_patchtokens"]
    rows, cols = images.shape[-2] // 14, images.shape[-1] // 14
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, rows, cols)


def timm_patch_features(arch: DinoV2Architecture, state_dict: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Patch features from timm's DINOv2 model, weights converted by timm from the official file."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    suffix = "_reg4" if arch.num_register_tokens else ""
    model = timm.create_model(
        f"{_TIMM_NAMES[arch.embed_dim]}_patch14{suffix}_dinov2", pretrained=False, dynamic_img_size=True, num_classes=0
    )
    model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=True)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(images)[:, model.num_prefix_tokens:]
    rows, cols = images.shape[-2] // 14, images.shape[-1] // 14
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, rows, cols)
