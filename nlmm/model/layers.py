"""Building blocks shared by every encoder: token mixers, the feed-forward MLP, attention pooling.

Token mixers:
- "softmax": multi-head self-attention through `F.scaled_dot_product_attention` with a boolean
  key-padding mask (flash / memory-efficient kernels on GPU).
- "linear": the fast-weight linear attention of the Nested Learning paper, read as an
  associative memory `S_t = S_{t-1} + phi(k_t) v_t^T`, `o_t = phi(q_t)^T S_t / phi(q_t)^T z_t`
  with `z_t = sum phi(k_s)` and `phi = elu + 1` (positive features keep the normaliser positive).
  It is causal — each token reads the memory written by the tokens up to it, the paper's
  recurrence — and computed in chunked parallel form: a causally masked matrix product inside
  each chunk, and the state carried across chunks by an exclusive cumulative sum of per-chunk
  states, with no loop in Python at all. Attention pooling then reads every position, so the
  embedding still sees the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlmm.model.ttt import LowRankAdapter

LINEAR_ATTENTION_EPS = 1e-6
INIT_STD = 0.02


def trunc_normal(tensor: Tensor, std: float = INIT_STD) -> Tensor:
    """In-place normal init truncated at two standard deviations (GPT-2 / ViT style)."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def feature_map(x: Tensor) -> Tensor:
    """Positive feature map of the linear attention (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                     chunk: int = 64) -> Tensor:
    """Causal fast-weight linear attention of (B, H, L, D) queries/keys and (B, H, L, Dv) values.

    Position t reads the memory written by tokens <= t, computed `chunk` tokens at a time.
    `key_mask` (B, L), True = real token: padded keys and values are zeroed, so they never
    enter the memory. It runs in fp32 with autocast off, because the state is a running sum
    over the sequence (bf16 products would lose the small late contributions); the result has
    the dtype of `v`.
    """
    with torch.autocast(q.device.type, enabled=False):
        out = _chunked_linear_attention(q.float(), k.float(), v.float(), key_mask, chunk)
    return out.to(v.dtype)


def _chunked_linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
                              chunk: int) -> Tensor:
    q, k = feature_map(q), feature_map(k)
    if key_mask is not None:
        keep = key_mask[:, None, :, None].to(k.dtype)
        k, v = k * keep, v * keep
    b, h, length, d = q.shape
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Zero keys/values in the tail add nothing to any state; the tail queries are cut off.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc, kc, vc = (t.reshape(b, h, n_chunks, chunk, t.shape[-1]) for t in (q, k, v))

    chunk_state = torch.einsum("bhncd,bhnce->bhnde", kc, vc)
    chunk_norm = kc.sum(dim=3)
    # Exclusive prefix sums: the memory as it stands when each chunk begins.
    state_before = torch.cumsum(F.pad(chunk_state, (0, 0, 0, 0, 1, 0))[:, :, :-1], dim=2)
    norm_before = torch.cumsum(F.pad(chunk_norm, (0, 0, 1, 0))[:, :, :-1], dim=2)

    causal_mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bhncd,bhnmd->bhncm", qc, kc) * causal_mask
    num = torch.einsum("bhncm,bhnme->bhnce", scores, vc) \
        + torch.einsum("bhncd,bhnde->bhnce", qc, state_before)
    den = scores.sum(dim=-1) + torch.einsum("bhncd,bhnd->bhnc", qc, norm_before)
    out = num / (den.unsqueeze(-1) + LINEAR_ATTENTION_EPS)
    return out.reshape(b, h, n_chunks * chunk, -1)[:, :, :length]


class SelfAttention(nn.Module):
    """Multi-head token mixer; its output projection carries the test-time low-rank adapter."""

    def __init__(self, d_model: int, n_heads: int, mixer: str, linear_chunk: int,
                 adapter_rank: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.mixer = mixer
        self.linear_chunk = linear_chunk
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.adapter = LowRankAdapter(d_model, d_model, adapter_rank)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        if self.mixer == "softmax":
            attn_mask = None if mask is None else mask[:, None, None, :]
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = linear_attention(q, k, v, mask, chunk=self.linear_chunk)
        y = y.transpose(1, 2).reshape(b, length, d)
        return self.adapter(y, self.out(y))


class MLP(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, d_model: int, ffn_mult: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, ffn_mult * d_model)
        self.down = nn.Linear(ffn_mult * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch (Touvron et al. 2021, CaiT), or the identity when
    `init` is None. At init 0 the branch starts switched off, yet its gain gets a gradient at
    once and the branch's weights from the second step on."""

    def __init__(self, d_model: int, init: float | None) -> None:
        super().__init__()
        self.gain = None if init is None else nn.Parameter(torch.full((d_model,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x if self.gain is None else x * self.gain.to(x.dtype)


class AttentionPool(nn.Module):
    """A learned query per head attends over the valid tokens and returns one (B, d) vector.

    Written with einsum rather than SDPA: it is one query per sequence, so it is cheap, and the
    padding mask is applied exactly (pads get zero weight).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Parameter(trunc_normal(torch.empty(n_heads, d_model // n_heads)))
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, length, d = x.shape
        k = self.key(x).view(b, length, self.n_heads, -1)
        v = self.value(x).view(b, length, self.n_heads, -1)
        scores = torch.einsum("blhd,hd->bhl", k, self.query.to(k.dtype)) / math.sqrt(k.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = scores.float().softmax(dim=-1).to(v.dtype)
        return torch.einsum("bhl,blhd->bhd", weights, v).reshape(b, d)


def sinusoidal_positions(length: int, d_model: int) -> Tensor:
    """The fixed sine/cosine position table of Vaswani et al. (2017), shape (length, d_model)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
    return table
