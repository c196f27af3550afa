"""DINOv2 ViT encoder: our own implementation that loads Meta's official checkpoint files.

The model reproduces the official hub models (``torch.hub.load("facebookresearch/dinov2", ...)``):
patch 14, position embeddings trained on a 37 x 37 grid (518 px), layer scale, qkv bias,
LayerNorm eps 1e-6, exact-GELU MLP (SwiGLU for ViT-g/14), and the official position-embedding
resampling for other input sizes. The resampling differs between the two hub families and is
part of each architecture below:

* plain models (``dinov2_vit{s,b,l,g}14``): bicubic, ``scale_factor = (grid + 0.1) / 37``,
  no antialias;
* register models (``*_reg4``): bicubic to the exact grid size (offset 0), with antialias.

Either way the trained embeddings are used as they are when the grid is 37 x 37.

Parameter names equal those of the official files, ``mask_token`` included (it is unused by
the forward pass but present in every official checkpoint), so files load with a strict check.
"""
from __future__ import annotations

import logging
import os
import re
import types
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .. import catalogue
from ..weights.checkpoints import check_state_dict_matches, load_state_dict
from ..errors import CheckpointError, InputError
from .vit_blocks import LAYER_NORM_EPS, Attention, Block, PatchEmbed, interpolate_patch_pos_embed, swiglu_hidden_dim

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class DinoV2Architecture:
    """Fixed hyper-parameters of one DINOv2 model (all official values unless ``test_only``).

    Attributes:
        name: registry name; for official models also the stem of Meta's checkpoint file.
        embed_dim, depth, num_heads: transformer width, number of blocks, attention heads.
        ffn_layer: ``"mlp"`` (GELU MLP, width ``4 * embed_dim``) or ``"swiglufused"`` (ViT-g/14).
        num_register_tokens: 0, or 4 for the ``_reg4`` models.
        interpolate_offset, interpolate_antialias: the hub's position-embedding resampling
            settings (see :func:`protosam.models.vit_blocks.interpolate_patch_pos_embed`).
        test_only: a tiny model for tests and wiring checks; no pretrained weights exist.
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    patch_size: int = 14
    pos_embed_grid: int = 37  # trained at 518 x 518 px
    mlp_ratio: float = 4.0
    test_only: bool = False

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden width of a plain MLP block (``embed_dim * mlp_ratio``)."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def ffn_hidden_dim(self) -> int:
        """Hidden width actually used by the FFN (SwiGLU rounds 2/3 of the MLP width up to x8)."""
        if self.ffn_layer == "swiglufused":
            return swiglu_hidden_dim(self.mlp_hidden_dim)
        return self.mlp_hidden_dim

    @property
    def checkpoint_filename(self) -> Optional[str]:
        """Meta's file name, e.g. ``dinov2_vitb14_reg4_pretrain.pth``; None for test-only models."""
        return None if self.test_only else f"{self.name}_pretrain.pth"


def _official(name: str, embed_dim: int, depth: int, num_heads: int, ffn_layer: str = "mlp") -> Tuple[DinoV2Architecture, ...]:
    """The plain model and its 4-register twin, with the hub's settings for each."""
    plain = DinoV2Architecture(name, embed_dim, depth, num_heads, ffn_layer=ffn_layer)
    registers = DinoV2Architecture(
        name + catalogue.REGISTERS_SUFFIX, embed_dim, depth, num_heads, ffn_layer=ffn_layer,
        num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True,
    )
    return plain, registers


_ALL = (
    *_official(catalogue.DINOV2_VITS14, 384, 12, 6),
    *_official(catalogue.DINOV2_VITB14, 768, 12, 12),
    *_official(catalogue.DINOV2_VITL14, 1024, 24, 16),
    *_official(catalogue.DINOV2_VITG14, 1536, 40, 24, ffn_layer="swiglufused"),
    # Test-only (no download, random weights): width 48, 2 blocks, 2 heads, the real 37 x 37
    # position grid. "dinov2_tiny14" has no registers and the plain models' resampling (the
    # paper's ViT-L/14 path); "dinov2_tiny14_reg4" exercises the register path.
    DinoV2Architecture(catalogue.TINY_DINOV2, 48, 2, 2, test_only=True),
    DinoV2Architecture(
        catalogue.TINY_DINOV2_REG4, 48, 2, 2, num_register_tokens=4,
        interpolate_offset=0.0, interpolate_antialias=True, test_only=True,
    ),
)

#: name -> architecture, read-only.
DINOV2_ARCHITECTURES: Mapping[str, DinoV2Architecture] = types.MappingProxyType({a.name: a for a in _ALL})


def get_dinov2_architecture(name: str) -> DinoV2Architecture:
    """Look an architecture up by name; ValueError listing the valid names if unknown."""
    try:
        return DINOV2_ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown DINOv2 architecture {name!r}; choose one of: {', '.join(DINOV2_ARCHITECTURES)}"
        ) from None


class DinoV2Encoder(nn.Module):
    """DINOv2 vision transformer returning the final layer-normed patch tokens as a feature map.

    Attributes:
        architecture: the :class:`DinoV2Architecture` it was built for.
        patch_size: 14. embed_dim: channel count C of the features.
    """

    def __init__(self, architecture: DinoV2Architecture) -> None:
        super().__init__()
        arch = architecture
        self.architecture = arch
        self.patch_size = arch.patch_size
        self.embed_dim = arch.embed_dim
        self.patch_embed = PatchEmbed(patch_size=arch.patch_size, in_chans=3, embed_dim=arch.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + arch.pos_embed_grid ** 2, arch.embed_dim))
        if arch.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_register_tokens, arch.embed_dim))
        else:
            self.register_parameter("register_tokens", None)
        self.blocks = nn.ModuleList(
            Block(dim=arch.embed_dim, num_heads=arch.num_heads, ffn_layer=arch.ffn_layer,
                  mlp_hidden_dim=arch.mlp_hidden_dim)
            for _ in range(arch.depth)
        )
        self.norm = nn.LayerNorm(arch.embed_dim, eps=LAYER_NORM_EPS)
        # Used only for masked-image training; kept so official files load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, arch.embed_dim))

    def _position_embeddings(self, grid_hw: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """``1 x (1 + rows*cols) x C``: class-token embedding then the (resampled) patch grid."""
        grid = self.architecture.pos_embed_grid
        if tuple(grid_hw) == (grid, grid):
            return self.pos_embed
        patch_pos = interpolate_patch_pos_embed(
            self.pos_embed[:, 1:], grid_hw,
            offset=self.architecture.interpolate_offset, antialias=self.architecture.interpolate_antialias,
        )
        return torch.cat((self.pos_embed[:, :1].float(), patch_pos), dim=1).to(dtype)

    def set_fused_attention(self, fused: bool, *, heads_per_chunk: Optional[int] = 1) -> None:
        """Fused attention kernel (fast) or the official explicit attention (exact reference).

        ``heads_per_chunk``: heads per step of the explicit form (``None``: all at once, the
        official code's memory layout; results are bit-identical either way).
        """
        if heads_per_chunk is not None and heads_per_chunk < 1:
            raise ValueError("heads_per_chunk must be >= 1 or None")
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = fused
                module.heads_per_chunk = heads_per_chunk

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-layer layer-normed patch tokens (``x_norm_patchtokens``) as a feature map.

        Args:
            images: ``B x 3 x H x W`` floating-point tensor on the model's device; H and W
                multiples of 14. No normalisation is applied here.

        Returns:
            ``B x C x H/14 x W/14`` features (no class or register tokens), on the images' device,
            in the final LayerNorm's output dtype: float32 for a float32 model, also under
            ``torch.autocast`` (bf16 matmuls inside, LayerNorm in float32).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"DINOv2 expects a B x 3 x H x W image tensor, got {shape}")
        if not images.is_floating_point():
            raise InputError(f"DINOv2 expects floating-point images, got {images.dtype}")
        batch, _, height, width = images.shape
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise InputError(
                f"DINOv2 input height and width must each be a positive multiple of {p}, got {height} x {width}; "
                f"resize the images first (e.g. to {max(p, round(height / p) * p)} x {max(p, round(width / p) * p)})"
            )
        grid_hw = (height // p, width // p)
        tokens = self.patch_embed(images)  # B x (rows*cols) x C
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        tokens = tokens + self._position_embeddings(grid_hw, tokens.dtype)
        if self.register_tokens is not None:
            # Registers join after the position embeddings, between the class token and the patches.
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        patches = tokens[:, 1 + self.architecture.num_register_tokens:]  # B x (rows*cols) x C
        return patches.transpose(1, 2).reshape(batch, self.embed_dim, *grid_hw)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`patch_features`."""
        return self.patch_features(images)


def _init_official_(model: DinoV2Encoder, generator: Optional[torch.Generator] = None) -> None:
    """The official training initialisation (truncated-normal 0.02 linears, layer scale 1.0)."""
    with torch.no_grad():
        nn.init.trunc_normal_(model.pos_embed, std=0.02, generator=generator)
        nn.init.normal_(model.cls_token, std=1e-6, generator=generator)
        if model.register_tokens is not None:
            nn.init.normal_(model.register_tokens, std=1e-6, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                nn.init.zeros_(module.bias)


def _freeze(model: DinoV2Encoder) -> DinoV2Encoder:
    model.eval()
    model.requires_grad_(False)
    return model


def build_dinov2(name: str) -> DinoV2Encoder:
    """A randomly initialised encoder (official init scheme) in eval mode, gradients off.

    For tests and benchmarks; use :func:`load_dinov2` for real weights.
    """
    model = DinoV2Encoder(get_dinov2_architecture(name))
    _init_official_(model)
    return _freeze(model)


def identify_dinov2_architecture(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the registry architecture whose shape signature the state dict has, or None.

    Looks at the width (``cls_token``), the number of blocks, the register count and the FFN
    type; used to tell the user which architecture a mismatching file is for.
    """
    cls_token = state_dict.get("cls_token")
    if not isinstance(cls_token, torch.Tensor) or cls_token.ndim != 3:
        return None
    block_ids = {int(m.group(1)) for k in state_dict for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    registers = state_dict.get("register_tokens")
    signature = (
        int(cls_token.shape[-1]),
        len(block_ids),
        int(registers.shape[1]) if isinstance(registers, torch.Tensor) and registers.ndim == 3 else 0,
        "swiglufused" if any(".mlp.w12." in k for k in state_dict) else "mlp",
    )
    for arch in DINOV2_ARCHITECTURES.values():
        if (arch.embed_dim, arch.depth, arch.num_register_tokens, arch.ffn_layer) == signature:
            return arch.name
    return None


def load_dinov2(name: str, checkpoint_path: PathLike, device: Union[str, torch.device] = "cpu") -> DinoV2Encoder:
    """Load an official-format DINOv2 checkpoint (``dinov2_vit*14[_reg4]_pretrain.pth``).

    The file must hold exactly the architecture's tensors (names and shapes, ``mask_token``
    included). Returns the encoder on ``device`` in eval mode with gradients off.

    Raises:
        ValueError: unknown ``name`` or invalid ``device``.
        CheckpointError: missing, truncated or corrupt file; wrong architecture (the message
            names the requested one and, when recognisable, the file's); non-finite values.
    """
    arch = get_dinov2_architecture(name)
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Invalid device {device!r}: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} requested but CUDA is not available; use 'cpu'")
    state = load_state_dict(checkpoint_path)
    with torch.device("meta"):
        model = DinoV2Encoder(arch)  # shapes only; the checkpoint provides every value
    try:
        check_state_dict_matches(model, state, model_name=name, path=checkpoint_path)
    except CheckpointError as exc:
        found = identify_dinov2_architecture(state)
        if found is not None and found != name:
            raise CheckpointError(
                f"{exc} The file holds a '{found}' model, not '{name}': select '{found}' "
                f"or use a '{name}' checkpoint."
            ) from exc
        raise
    tensors = {}
    for key, value in state.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"Checkpoint {checkpoint_path}: tensor '{key}' is not finite floating-point data "
                f"({value.dtype}); the file is damaged. Download it again."
            )
        tensors[key] = value.to(torch.float32)
    model.load_state_dict(tensors, strict=True, assign=True)
    logger.info("Loaded DINOv2 %s from %s onto %s", name, checkpoint_path, target)
    return _freeze(model.to(target))
