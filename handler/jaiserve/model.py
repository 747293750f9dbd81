"""The JAI GPT: the seed's nanoGPT architecture, with a KV-cache-aware forward.

Parameter names match the seed's checkpoint (``tok_emb``, ``pos_emb``, ``blocks.N.attn.c_attn``, ...)
so a trained ``state_dict`` loads without renaming. This module does no I/O: see ``checkpoint.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 24000  # rows of tok_emb and head: the tokenizer's id space
    block_size: int = 256  # rows of pos_emb: the longest context the model was trained on
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads; not visible in tensor shapes, so stored or configured
    n_embd: int = 384  # residual stream width; n_embd / n_head is the head size

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        """Weights of the model this config describes, counted from its shapes (whatever dtype or
        packed layout the Linear layers are later given)."""
        C, V = self.n_embd, self.vocab_size
        block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)  # 2 LNs, attn, MLP
        return V * C + self.block_size * C + self.n_layer * block + 2 * C + V * C  # tok_emb, pos_emb, ln_f, head


class KVCache:
    """Keys and values of every cached token, preallocated and written by position.

    ``k[layer]`` and ``v[layer]`` are ``(rows, n_head, block_size, head_dim)``: one row per request
    being decoded. Rows are filled by the engine; this class only stores and moves them.
    """

    def __init__(self, config: GPTConfig, rows: int, device, dtype):
        shape = (config.n_layer, rows, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k, self.v))  # per-layer views, made once for the decode forward

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst`` (used to compact rows)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class PrefillWrite:
    """Packed prompts: write each token's k/v to its (row, position) of the cache (PackedPrompts attends)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, positions: torch.Tensor):
        self.cache, self.rows, self.positions = cache, rows, positions  # (N,), (N,)

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # k, v: (1, nh, N, hs); the cache index [rows, :, positions] addresses (N, nh, hs)
        self.cache.k[layer][self.rows, :, self.positions] = k[0].transpose(0, 1)
        self.cache.v[layer][self.rows, :, self.positions] = v[0].transpose(0, 1)
        return k, v


class PackedPrompts:
    """The attention mask of a prefill: prompts packed into one sequence, each causal within itself.

    A mask over the packed sequence would make attention cost grow with the square of the whole step's
    tokens, nearly all of it masked (21 prompts of 24 tokens: 504 x 504 scores, 21 x 24 x 24 of them
    seen). ``attend`` instead lines the prompts up as rows of a batch and runs plain causal attention on
    it: a real token only sees keys at or before its own position, so padding at a row's end (copies of
    its last token) is never seen by a token that is kept. Prompts are grouped by length (within a power
    of two) and each group is padded to its own longest, so a 256-token window re-read in the same step
    as short prompts does not pad them to 256.
    """

    def __init__(self, lengths: list[int], device):
        self.single = len(lengths) == 1
        if self.single:
            return
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        groups: dict[int, list[int]] = {}  # prompt indices by length bucket, in arrival order
        for i, n in enumerate(lengths):
            groups.setdefault((n - 1).bit_length(), []).append(i)
        self.gathers = []  # per group (rows, longest): each row's tokens in the packed sequence
        scatter = [0] * sum(lengths)  # each packed token's place in the groups' outputs, concatenated
        placed = 0
        for members in groups.values():
            longest = max(lengths[i] for i in members)
            self.gathers.append(torch.tensor(
                [[starts[i] + min(j, lengths[i] - 1) for j in range(longest)] for i in members], device=device))
            for row, i in enumerate(members):
                for j in range(lengths[i]):
                    scatter[starts[i] + j] = placed + row * longest + j
            placed += len(members) * longest
        self.scatter = torch.tensor(scatter, device=device)

    def attend(self, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        """Causal attention of each prompt over itself: ``c_attn``'s output ``(1, N, 3C)`` -> ``(1, N, C)``.
        Gathered and scattered as whole token rows, before the heads split and after they merge."""
        C = qkv.shape[2] // 3
        outputs = []
        for gather in self.gathers:
            rows, longest = gather.shape
            tokens = qkv[0].index_select(0, gather.flatten())  # (rows * longest, 3C)
            q, k, v = tokens.view(rows, longest, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # (rows, nh, L, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            outputs.append(y.transpose(1, 2).reshape(rows * longest, C))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return y.index_select(0, self.scatter).unsqueeze(0)


class DecodeStep:
    """One new token for each of rows 0..B-1 of the cache: where its key and value go, what it attends to.

    The decode forward is the engine's hot path, and at a few rows Python and per-operator costs are a
    third of it, so its tokens stay ``(B, C)`` rows rather than ``(B, 1, C)`` sequences, the cache is
    addressed through per-layer views made once, and rows at the same position need no mask (with
    pack_linears' fused GELU, one request's engine step went from ~870 to ~640 operator calls).
    """

    def __init__(self, cache: KVCache, positions: list[int]):
        device = cache.k.device
        self.cache, self.kv_len = cache, max(positions) + 1
        self.positions = torch.tensor(positions, device=device)  # (B,)
        self.rows = torch.arange(len(positions), device=device)
        self.mask = None  # additive (B, 1, 1, kv_len), made once: attention would convert a boolean one per layer
        if min(positions) != max(positions):
            hidden = torch.arange(self.kv_len, device=device)[None, :] > self.positions[:, None]
            mask = torch.zeros(hidden.shape, device=device, dtype=cache.k.dtype).masked_fill_(hidden, float("-inf"))
            self.mask = mask[:, None, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``(B, nh, hs)`` keys and values; return the rows' ``(B, nh, kv_len, hs)`` caches."""
        keys, values = self.cache.layers[layer]
        keys[self.rows, :, self.positions] = k
        values[self.rows, :, self.positions] = v
        B = k.shape[0]
        return keys[:B, :, : self.kv_len], values[:B, :, : self.kv_len]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask=None, kv_write=None):
        if isinstance(kv_write, DecodeStep):
            return self.decode(x, kv_write)
        B, T, C = x.size()
        qkv = self.c_attn(x)
        q, k, v = qkv.split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_write is not None:
            k, v = kv_write(self.layer, k, v)  # (B, nh, T_kv, hs)
        if isinstance(mask, PackedPrompts):
            if not mask.single:
                return self.c_proj(mask.attend(qkv, self.n_head))
            mask = None  # one prompt: plain causal attention
        # mask=None means a plain causal sequence starting at position 0, as in training
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def decode(self, x: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        """One new token per row: ``x`` ``(B, C)`` -> ``(B, C)``."""
        B, C = x.shape
        q, k, v = self.c_attn(x).view(B, 3, self.n_head, C // self.n_head).unbind(1)  # (B, nh, hs) each
        keys, values = step.write(self.layer, k, v)
        if x.device.type == "cpu" and B >= BMM_DECODE_MIN_ROWS:
            y = decode_attention(q, keys, values, step.mask)
        else:
            y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=step.mask).view(B, C)
        return self.c_proj(y)


# Decode steps of at least this many rows attend with decode_attention on CPU, smaller ones with
# scaled_dot_product_attention: its one fused operator wins while the cache read is small (one request:
# 21 vs 54 us a layer), the batched products once it is large (64 requests, 150 tokens: 3.3 vs 4.0 ms a
# layer; the engine at 64 requests x 128 tokens 1,062 vs 1,002 tokens/s, three interleaved runs). Equal
# at 16 rows.
BMM_DECODE_MIN_ROWS = 16


def decode_attention(q, k, v, mask=None):
    """Attention of one new token per row over its cached keys, as two batched matrix products.

    q ``(B, nh, hs)``, k and v ``(B, nh, L, hs)`` views of the cache, mask additive ``(B, 1, 1, L)`` or
    None (every key visible); returns ``(B, nh * hs)``. scaled_dot_product_attention's CPU flash kernel is
    built for many queries per row; with one it reads a large cache slower than these two products do.
    """
    B, nh, L, hs = k.shape
    scores = torch.baddbmm(  # (B*nh, 1, L): mask + q.k / sqrt(hs)
        q.new_zeros(()) if mask is None else mask.expand(B, nh, 1, L).reshape(B * nh, 1, L),
        q.reshape(B * nh, 1, hs),
        k.reshape(B * nh, L, hs).transpose(1, 2),  # a view: rows and heads of the cache merge
        alpha=hs**-0.5,
    )
    y = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * nh, L, hs))  # (B*nh, 1, hs)
    return y.view(B, nh * hs)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()  # exact erf GELU, as trained
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_write=None):
        x = x + self.attn(self.ln_1(x), mask, kv_write)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def hidden(self, idx, positions, mask=None, kv_write=None):
        """Final hidden states ``(B, T, C)`` of tokens ``idx`` at ``positions`` (both ``(B, T)``)."""
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x, mask, kv_write)
        return self.ln_f(x)

    def forward(self, idx):
        """Logits ``(B, T, vocab)`` of a causal sequence at positions 0..T-1 (the training forward)."""
        positions = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)
        return self.head(self.hidden(idx, positions))

    def num_parameters(self) -> int:
        return self.config.num_parameters
