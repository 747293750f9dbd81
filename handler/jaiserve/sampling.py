"""Sampling parameters (validated once, at the edge) and the batched logits -> token step.

The order follows the seed's ``GPT.generate``: divide by temperature, keep logits >= the k-th largest,
then (our addition) nucleus top_p, then sample. temperature 0 means greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


class ParameterError(ValueError):
    """A request parameter out of its domain. ``field`` names it; ``str()`` reads as a sentence."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not an integer


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # tokens to generate at most (finish_reason "length")
    temperature: float = 0.8  # logits are divided by it; 0 = greedy
    top_k: int | None = 50  # keep the k largest logits (ties kept, as the seed); None = all
    top_p: float = 1.0  # then keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # a private torch.Generator: same text alone or in any batch
    stop: tuple[str, ...] = field(default=())  # generation ends before the first of these strings

    def __post_init__(self):
        if not _is_int(self.max_tokens):
            raise ParameterError("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ParameterError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not _is_number(self.temperature):
            raise ParameterError("temperature", f"must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ParameterError("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k is not None:
            if not _is_int(self.top_k):
                raise ParameterError("top_k", f"must be an integer or null, got {self.top_k!r}")
            if self.top_k < 1:
                raise ParameterError("top_k", f"must be >= 1, got {self.top_k}")
        if not _is_number(self.top_p):
            raise ParameterError("top_p", f"must be a finite number, got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise ParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not _is_int(self.seed):
            raise ParameterError("seed", f"must be an integer or null, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ParameterError("seed", f"must be in [0, 2**63), got {self.seed}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ParameterError("stop", f"must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ParameterError("stop", "must not contain an empty string")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, vocab); ``generators[i]`` is row i's Generator or None."""
    logits = logits.float()
    tokens = torch.zeros(len(params), dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        tokens[greedy] = _rows(logits, greedy).argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    vocab = logits.shape[-1]
    scaled = _rows(logits, rows)  # (R, vocab)
    small = [j for j, i in enumerate(rows) if (params[i].top_k or vocab) < vocab]
    if small:
        _sample_top_k(_rows(scaled, small), [rows[j] for j in small], params, generators, tokens)
    rest = sorted(set(range(len(rows))) - set(small))
    if rest:
        temperature = torch.tensor([params[rows[j]].temperature for j in rest], device=logits.device)
        _sample_full(_rows(scaled, rest) / temperature.unsqueeze(1), [rows[j] for j in rest], params,
                     generators, tokens)
    return tokens


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor[rows]`` without the copy when ``rows`` is every row in order."""
    return tensor if len(rows) == tensor.shape[0] else tensor[rows]


def _sample_top_k(logits, rows, params, generators, tokens) -> None:
    """Sample among each row's k largest logits only: k draws instead of vocabulary-size draws.

    Dividing by a positive temperature keeps the order, so the k largest are found on the raw logits
    and only they are divided. The seed keeps every logit equal to the k-th largest: a row where the
    (k+1)-th ties with the k-th keeps all of them, its k widened to their count (coarse logits, as
    bfloat16 Linear layers give, tie often; the full vocabulary is read for those rows only).
    """
    device = logits.device
    ks = torch.tensor([params[i].top_k for i in rows], device=device)
    temperature = torch.tensor([params[i].temperature for i in rows], device=device).unsqueeze(1)
    values, indices = torch.topk(logits, int(ks.max()) + 1, dim=-1)  # (R, kmax + 1), descending
    values = values / temperature
    kth = values.gather(1, ks.unsqueeze(1) - 1)
    tied = (values.gather(1, ks.unsqueeze(1)) == kth).squeeze(1)
    if tied.any():
        ks = torch.where(tied, (logits / temperature >= kth).sum(dim=1), ks)
        values, indices = torch.topk(logits, int(ks.max()), dim=-1)
        values = values / temperature
    kmax = int(ks.max())
    values, indices = values[:, :kmax], indices[:, :kmax]
    beyond_k = torch.arange(kmax, device=device)[None, :] >= ks[:, None]
    probs = F.softmax(values.masked_fill(beyond_k, float("-inf")), dim=-1)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device)
    if (top_p < 1).any():
        probs = _nucleus_sorted(probs, top_p)
    choice = _draw(probs, [generators[i] for i in rows], ks.tolist())
    tokens[rows] = indices.gather(1, choice.unsqueeze(1)).squeeze(1)


def _sample_full(scaled, rows, params, generators, tokens) -> None:
    """Seed semantics over the whole vocabulary (logits already divided by temperature): keep logits
    >= the k-th largest, then top_p. For rows without top_k, or with top_k at least the vocabulary."""
    vocab = scaled.shape[-1]
    ks = [min(params[i].top_k or vocab, vocab) for i in rows]
    if min(ks) < vocab:
        top = torch.topk(scaled, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor(ks, device=scaled.device).unsqueeze(1) - 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = F.softmax(scaled, dim=-1)
    top_p = torch.tensor([params[i].top_p for i in rows], device=scaled.device)
    if (top_p < 1).any():
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = _nucleus_sorted(sorted_probs, top_p) == 0
        probs = probs.masked_fill(drop.scatter(1, order, drop), 0.0)
    tokens[rows] = _draw(probs, [generators[i] for i in rows], [vocab] * len(rows))


def _nucleus_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each descending row once the mass above a token reaches top_p; renormalise."""
    before = probs.cumsum(dim=-1) - probs  # the top token has 0 before it, so it always stays
    probs = probs.masked_fill(before >= top_p.unsqueeze(1), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _draw(probs: torch.Tensor, generators: list, widths: list[int]) -> torch.Tensor:
    """One draw per row of ``probs`` (R, n), exactly as ``torch.multinomial(probs[j, :widths[j]], 1)``
    draws it, batched. torch.multinomial races exponentials: it fills one Exp(1) per entry from the
    generator and takes ``argmax(probs / exponential)``. So a seeded row fills its first ``width``
    entries from its own generator (the same random stream alone or in any batch), unseeded rows share
    one fill from the global generator, and one argmax decides every row. Entries past a row's width
    race 1 against probability 0 and never win."""
    race = torch.ones_like(probs)
    shared = [j for j, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        race.exponential_()
    elif shared:
        race[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_()
    for j, g in enumerate(generators):
        if g is not None:
            race[j, : widths[j]].exponential_(generator=g)
    return (probs / race).argmax(dim=-1)
