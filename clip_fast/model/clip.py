"""CLIP (Radford et al. 2021): an image tower and a causal text Transformer mapping images
(B, 3, S, S) and token ids (B, L) to features (B, embed_dim), and the learnable logit
scale (and optional bias) of the contrastive loss over them.

Parameter names follow OpenAI's clip/model.py (and therefore open_clip's CLIP class), so
OpenAI and open_clip state_dicts of the same architecture load unchanged
(clip_fast.model.loading). The towers are in transformer.py (ViT, text Transformer) and
resnet.py (ModifiedResNet). What this file adds to the reference computation:

- the text tower cuts each batch to its longest caption (exact: under the causal mask no
  position attends to a later one, so positions after the last EOT cannot change any
  EOT feature): on CUDA in one pass whose length the loader fixes on the CPU (longest
  caption rounded up to a multiple of 16, `trim_tokens`, no host sync), elsewhere in a
  fixed number of length buckets (see CLIP.encode_text);
- both towers run their last block for the pooled position only (EOT / class token);
- LayerNorm is computed in fp32 under autocast (clip_fast.model.backends).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_fast.model.backends import LayerNorm
from clip_fast.model.config import CLIPConfig
from clip_fast.model.resnet import ModifiedResNet
from clip_fast.model.transformer import QuickGELU, Transformer, VisionTransformer


class CLIP(nn.Module):
    """Both towers, the learnable temperature (and optional bias). open_clip's API:
    encode_image, encode_text, forward(image, text) -> (image_features, text_features,
    logit_scale.exp()[, logit_bias]) or a dict when `output_dict`."""

    def __init__(self, config: CLIPConfig, output_dict: bool = False):
        super().__init__()
        self.config = config
        self.output_dict = output_dict
        # Length buckets of the text tower (see encode_text): None = 1 on CUDA, 4 elsewhere.
        self.text_buckets: int | None = None
        act = QuickGELU if config.quick_gelu else nn.GELU
        v, t = config.vision, config.text
        self.visual = ModifiedResNet(v, config.embed_dim) if v.is_resnet else VisionTransformer(v, config.embed_dim, act)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, act)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = None
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        self.initialize_parameters()

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.config.text.vocab_size

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (normal with width-dependent std; zero bn3 gammas)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for name, p in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(p)
        towers = [self.transformer] + ([self.visual.transformer] if isinstance(self.visual, VisionTransformer) else [])
        for tower in towers:
            width, layers = tower.width, len(tower.resblocks)
            proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images (B, 3, S, S), already normalised -> features (B, embed_dim)."""
        s = self.config.vision.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"images must have shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self.visual.conv1.weight.dtype)  # e.g. fp32 images into a bf16 model
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def text_bucket_count(self, device: torch.device) -> int:
        """Text-tower passes per batch: `text_buckets` when set, else 1 on CUDA, 4 elsewhere."""
        if self.text_buckets is not None:
            if not isinstance(self.text_buckets, int) or self.text_buckets < 1:
                raise ValueError(f"text_buckets must be a positive int or None, got {self.text_buckets!r}")
            return self.text_buckets
        return 1 if device.type == "cuda" else 4

    def encode_text(self, text: torch.Tensor, normalize: bool = False, trim: bool | None = None) -> torch.Tensor:
        """text (B, L <= context_length) token ids, EOT = the largest id of each row ->
        features (B, embed_dim) taken at the EOT position after ln_final.

        Trimming is exact: under the causal mask no position attends to a later one, so the
        positions after a row's EOT cannot change its feature. With k = text_bucket_count:
          k = 1 (CUDA default): one pass over the L positions given, token values never read
            on the host (no host sync; fixed shapes for torch.compile / CUDA graphs). The
            loader trims each batch on the CPU to its longest caption rounded up to a
            multiple of 16 (`trim_tokens`) before the transfer.
          k > 1 (CPU default): the lengths are read on the host and the rows are split into
            exactly k equal-count groups of increasing length, each cut to its own longest
            caption (every rank runs each text block k times, which FSDP needs).
        `trim=None` follows k; True reads the lengths on the host in every case (one host
        sync for device tensors) and trims to the longest caption rounded up to a multiple
        of 16 (k = 1) or per bucket (k > 1); False runs all L positions in one pass.
        Token ids are range-checked (ValueError) wherever they are read on the host."""
        if not isinstance(text, torch.Tensor) or text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text must be an int64/int32 tensor of token ids, got {getattr(text, 'dtype', type(text))}")
        if text.dim() != 2 or text.shape[0] == 0 or not 0 < text.shape[1] <= self.context_length:
            raise ValueError(
                f"text must have shape (B, L) with 1 <= L <= context_length={self.context_length}, got {tuple(text.shape)}"
            )
        buckets = self.text_bucket_count(text.device)
        eot = text.argmax(dim=-1)  # (B,)
        if trim is False or (trim is None and buckets == 1):
            x = self._encode_tokens(text, eot)
        else:
            lengths = self._host_lengths(text, eot)
            if buckets == 1:
                x = self._encode_tokens(text[:, : text_length_for(max(lengths), text.shape[1])], eot)
            else:
                x = self._encode_buckets(text, eot, lengths, buckets)
        return F.normalize(x, dim=-1) if normalize else x

    def _host_lengths(self, text: torch.Tensor, eot: torch.Tensor) -> list[int]:
        """Caption lengths (EOT index + 1) read on the host, with the token id range check
        (one host sync for device tensors)."""
        stats = torch.cat([torch.stack([text.min(), text.max()]), eot]).tolist()
        (lo, hi), lengths = stats[:2], [i + 1 for i in stats[2:]]
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}), got range [{lo}, {hi}]")
        return lengths

    def _encode_buckets(self, text: torch.Tensor, eot: torch.Tensor, lengths: list[int], buckets: int) -> torch.Tensor:
        """Rows are independent in the text tower: each of the `buckets` groups of similar
        lengths is cut to its own longest caption; features go back in input order. An
        empty group (fewer rows than buckets) runs the longest row once more, so every
        rank makes the same number of block calls; its output is dropped (zero gradient)."""
        parts, position, offset = [], [0] * len(lengths), 0
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        for rows in _length_buckets(lengths, buckets):
            run = rows or [longest]
            idx = torch.tensor(run, device=text.device)
            parts.append(self._encode_tokens(text[idx, : max(lengths[r] for r in run)], eot[idx]))
            for j, r in enumerate(rows):
                position[r] = offset + j
            offset += len(run)
        return torch.cat(parts)[torch.tensor(position, device=text.device)]

    def _encode_tokens(self, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens with EOT positions (B,) -> projected EOT features (B, embed_dim)."""
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]  # (B, L, C)
        x = self.transformer(x, causal=True, pool_index=eot)  # (B, C): the last block at EOT only
        return self.ln_final(x) @ self.text_projection.to(x.dtype)  # (B, embed_dim)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features, "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()


def _length_buckets(lengths: list[int], buckets: int) -> list[list[int]]:
    """Row indices in exactly `buckets` groups of increasing caption length, sizes differing
    by at most one; groups are empty when there are fewer rows than buckets. The count never
    depends on the data, so every rank runs the text blocks equally often."""
    n = len(lengths)
    order = sorted(range(n), key=lengths.__getitem__)
    return [order[i * n // buckets : (i + 1) * n // buckets] for i in range(buckets)]


TEXT_LENGTH_MULTIPLE = 16


def text_length_for(longest: int, width: int) -> int:
    """The length a batch whose longest caption has `longest` tokens is cut to: rounded up
    to a multiple of TEXT_LENGTH_MULTIPLE (few distinct shapes: torch.compile and CUDA
    graphs reuse them), at most the batch's own width."""
    return min(width, -(-max(1, longest) // TEXT_LENGTH_MULTIPLE) * TEXT_LENGTH_MULTIPLE)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids (EOT = the largest id of each row) cut to `text_length_for` their
    longest caption: the positions after every row's EOT, which cannot change any text
    feature. Meant for CPU tensors (the loader runs it before the transfer); a view."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must have shape (B, L) with B >= 1, got {tuple(tokens.shape)}")
    longest = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, : text_length_for(longest, tokens.shape[1])]
