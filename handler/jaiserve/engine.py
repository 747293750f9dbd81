"""The generation engine: iteration-level scheduling over a preallocated KV cache.

Each ``step()`` produces one token for every running request whose turn it is, in at most two batched
forwards:
- *decode*: one token for every request with room in its cache row, rows 0..B-1 in one forward;
- *prefill*: newly admitted prompts and re-cropped windows, packed end to end into one sequence (no
  padding), written to their cache rows; at most ``max_prefill_tokens`` a step (always one item), so
  one step's stall is bounded. The oldest waiting work goes first.

Past the window: the model has ``block_size`` positions. When a request's context outgrows its cache
row, the seed crops the context to its last ``block_size`` tokens and re-reads them at positions
0..block_size-1 every step. With ``window_stride`` S the engine keeps the last ``block_size - S + 1``
tokens instead, prefills them at positions 0.. into the request's row, and decodes the next S tokens
from the cache before it crops again: one re-prefill per S tokens instead of one per token. S = 1 is
the seed's behaviour exactly (every token sees the last ``block_size`` tokens). A re-prefill is prefill
work like a prompt: it waits its turn in the step's prefill budget, so the request past the window pays
for its window (it skips a step when the budget is spent) and its batch-mates' steps stay bounded.

Requests join between steps and leave as soon as they finish; the cache rows of decoding requests are
kept contiguous so the decode forward reads a view of the cache, not a gathered copy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable

import torch
from tokenizers import Tokenizer

from .detokenizer import IncrementalDetokenizer
from .model import GPT, DecodeWrite, KVCache, PrefillWrite
from .sampling import ParameterError, SamplingParams, sample

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|eos|>")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 2048  # longest prompt, in tokens (longer than block_size is allowed)


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: Hashable
    token_ids: list[int]  # tokens generated this step
    text: str  # text completed this step; pieces join to the final generated text
    finish_reason: str | None = None  # "stop" or "length" once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    request_id: Hashable
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


@dataclass(eq=False)
class _Request:
    id: Hashable
    context: list[int]  # prompt + generated tokens
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    stop_ids: frozenset[int]
    cached: int = 0  # positions of this request written to its cache row
    queued_at: int = 0  # step at which it began waiting for prefill (admission or a re-crop)
    text: str = ""  # generated text, decoded cleanly so far
    emitted: int = 0  # characters of ``text`` already handed out
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.context[self.prompt_len :]


class Engine:
    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 32,
        limits: Limits = Limits(),
        max_prefill_tokens: int = 1024,
        eos_token_id: int | None = None,
        window_stride: int = 1,
    ):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.limits = limits
        self.max_prefill_tokens = max_prefill_tokens  # bounds how long one step can stall decoding
        block_size = self.config.block_size
        is_int = isinstance(window_stride, int) and not isinstance(window_stride, bool)
        if not is_int or not 1 <= window_stride < block_size:
            raise ValueError(f"window_stride must be an integer in [1, {block_size - 1}], got {window_stride!r}")
        self.window_stride = window_stride
        # tokens a full context is cropped to: with them in the cache, the next window_stride tokens decode
        self.window_keep = block_size - window_stride + 1
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(self.config, max_batch, self.device, self.dtype)
        self.eos_token_id = eos_token_id if eos_token_id is not None else _find_eos(tokenizer)
        self.waiting: deque[_Request] = deque()
        self.rows: list[_Request] = []  # index = KV cache row
        self.full: deque[_Request] = deque()  # cache row full: waiting for a re-prefill, oldest first
        self.steps = 0  # steps run; orders prefill work by how long it has waited

    # ----- requests in and out -----

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def add_request(self, request_id: Hashable, prompt_ids: list[int], params: SamplingParams):
        """Queue a request; it joins the running batch at the next step with a free slot."""
        if params.max_tokens > self.limits.max_tokens:
            raise ParameterError(
                "max_tokens", f"must be <= {self.limits.max_tokens}, got {params.max_tokens}"
            )
        if not prompt_ids:
            raise ParameterError("prompt", "must encode to at least one token")
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise ParameterError(
                "prompt",
                f"is {len(prompt_ids)} tokens, longer than the limit of {self.limits.max_prompt_tokens}",
            )
        if max(prompt_ids) >= self.config.vocab_size or min(prompt_ids) < 0:
            raise ParameterError("prompt", f"has token ids outside [0, {self.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ParameterError("stop", "needs a tokenizer")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        if self.tokenizer is not None:
            # a stop string that is one (special) token may never appear in the decoded text
            stop_ids |= {i for s in params.stop if (i := self.tokenizer.token_to_id(s)) is not None}
        self.waiting.append(
            _Request(
                id=request_id,
                context=list(prompt_ids),
                prompt_len=len(prompt_ids),
                params=params,
                generator=generator,
                detokenizer=IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None,
                stop_ids=frozenset(stop_ids),
                queued_at=self.steps,
            )
        )

    def abort(self, request_id: Hashable) -> bool:
        """Drop a request wherever it is (e.g. its client went away). Returns whether it was found."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                return True
        for req in self.rows:
            if req.id == request_id:
                self._retire([req])
                return True
        return False

    @property
    def running(self) -> int:
        return len(self.rows)

    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    # ----- one iteration -----

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Generate one token for every running request whose turn it is (admitting waiting ones first).

        Every request with room in its cache row gets a token; a request whose row is full gets one
        when its re-prefill fits this step's prefill budget.
        """
        decoding = self._decode_rows_first()
        prefill = self._take_prefill_work()
        requests, logits = [], []
        for reqs, forward in ((decoding, self._decode), (prefill, self._prefill)):
            if reqs:
                logits.append(forward(reqs))
                requests += reqs
        self.steps += 1
        if not requests:
            return []
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests]).tolist()
        outputs = [self._append(req, token) for req, token in zip(requests, tokens)]
        self._retire([r for r in requests if r.finish_reason is not None])
        self._queue_full_rows(requests)
        return outputs

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Run requests to completion on an otherwise idle engine (batch jobs, tests, benchmarks)."""
        assert not self.has_work(), "generate() needs the engine to itself"
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self.add_request(i, prompt, p)
        tokens: list[list[int]] = [[] for _ in prompts]
        pieces: list[list[str]] = [[] for _ in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        while self.has_work():
            for out in self.step():
                tokens[out.request_id] += out.token_ids
                pieces[out.request_id].append(out.text)
                if out.finished:
                    results[out.request_id] = Completion(
                        out.request_id,
                        tokens[out.request_id],
                        "".join(pieces[out.request_id]),
                        out.finish_reason,
                        out.prompt_tokens,
                    )
        return results

    # ----- scheduling -----

    def _decode_rows_first(self) -> list[_Request]:
        """Move the requests with room in their cache row to rows 0..B-1 and return them.

        A full row's contents are dead (it will be re-prefilled), so only the decoding row moves.
        """
        block_size = self.config.block_size
        decoding = [r for r in self.rows if r.cached < block_size]
        holes = [i for i in range(len(decoding)) if self.rows[i].cached >= block_size]
        movers = [j for j in range(len(decoding), len(self.rows)) if self.rows[j].cached < block_size]
        for hole, mover in zip(holes, movers):
            self.cache.move_row(mover, hole, self.rows[mover].cached)
            self.rows[hole], self.rows[mover] = self.rows[mover], self.rows[hole]
        return self.rows[: len(decoding)]

    def _take_prefill_work(self) -> list[_Request]:
        """Re-crops of full rows and admissions of waiting requests, oldest first, within the step's
        prefill budget (the first item always goes, so a step always makes progress)."""
        taken, budget = [], self.max_prefill_tokens
        while True:
            recrop = self.full[0] if self.full else None
            has_slot = self.waiting and len(self.rows) < self.max_batch
            admit = self.waiting[0] if has_slot else None
            if admit is not None and (recrop is None or admit.queued_at <= recrop.queued_at):
                req, queue = admit, self.waiting
            elif recrop is not None:
                req, queue = recrop, self.full
            else:
                break
            cost = len(req.context) - self._window_start(req)
            if taken and cost > budget:
                break  # the rest waits for the next step
            budget -= cost
            taken.append(queue.popleft())
            if queue is self.waiting:
                self.rows.append(req)
        return taken

    def _window_start(self, req: _Request) -> int:
        """Where a prefill of ``req`` starts in its context: 0 while it fits the model's positions,
        else ``window_keep`` tokens from the end (the seed's crop when window_stride is 1)."""
        length = len(req.context)
        return 0 if length <= self.config.block_size else length - self.window_keep

    def _queue_full_rows(self, requests: list[_Request]) -> None:
        """Running requests whose cache row is now full wait for a re-prefill, from this step on."""
        for req in requests:
            if req.finish_reason is None and req.cached == self.config.block_size:
                req.queued_at = self.steps
                self.full.append(req)

    def _retire(self, finished: list[_Request]) -> None:
        """Free the cache rows of ``finished``, moving the last rows down to keep rows contiguous."""
        gone = set(map(id, finished))
        self.full = deque(r for r in self.full if id(r) not in gone)
        for row in sorted((i for i, r in enumerate(self.rows) if id(r) in gone), reverse=True):
            last = len(self.rows) - 1
            if row != last:
                self.cache.move_row(last, row, self.rows[last].cached)
                self.rows[row] = self.rows[last]
            self.rows.pop()

    # ----- forwards: each returns last-position logits (B, vocab) -----

    def _prefill(self, reqs: list[_Request]) -> torch.Tensor:
        row_of = {id(r): i for i, r in enumerate(self.rows)}
        ids, positions, rows, seg = [], [], [], []
        for n, req in enumerate(reqs):
            window = req.context[self._window_start(req) :]  # cache position 0 holds its first token
            ids += window
            positions += range(len(window))
            rows += [row_of[id(req)]] * len(window)
            seg += [n] * len(window)
            req.cached = len(window)
        dev = self.device
        ids_t = torch.tensor([ids], device=dev)
        pos_t = torch.tensor([positions], device=dev)
        seg_t = torch.tensor(seg, device=dev)
        # block-diagonal causal mask: a token sees earlier tokens of its own prompt only
        mask = (seg_t[:, None] == seg_t[None, :]) & (pos_t[0][:, None] >= pos_t[0][None, :])
        write = PrefillWrite(self.cache, torch.tensor(rows, device=dev), pos_t[0])
        h = self.model.hidden(ids_t, pos_t, mask, write)  # (1, N, C)
        last = torch.tensor([r.cached for r in reqs], device=dev).cumsum(0) - 1
        return self.model.head(h[0, last])

    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        assert reqs == self.rows[: len(reqs)], "decode rows must be the leading cache rows"
        dev = self.device
        positions = torch.tensor([r.cached for r in reqs], device=dev)  # (B,)
        ids = torch.tensor([[r.context[-1]] for r in reqs], device=dev)  # (B, 1)
        kv_len = max(r.cached for r in reqs) + 1
        visible = torch.arange(kv_len, device=dev)[None, :] <= positions[:, None]  # (B, kv_len)
        # additive, made once per step: attention would convert a boolean mask again in every layer
        mask = torch.zeros(visible.shape, device=dev, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
        write = DecodeWrite(self.cache, positions, kv_len)
        h = self.model.hidden(ids, positions[:, None], mask[:, None, None, :], write)  # (B, 1, C)
        for r in reqs:
            r.cached += 1
        return self.model.head(h[:, -1])

    # ----- per-token bookkeeping -----

    def _append(self, req: _Request, token: int) -> StepOutput:
        req.context.append(token)
        n_generated = len(req.context) - req.prompt_len
        hit_stop_id = token in req.stop_ids
        done = hit_stop_id or n_generated >= req.params.max_tokens
        if req.detokenizer is not None:
            req.text += req.detokenizer.add([token])
            if done:
                req.text += req.detokenizer.flush()
        cut = self._cut_at_stop_string(req)  # also when a stop id ended it: its text may be in ``text``
        if hit_stop_id or cut:
            req.finish_reason = "stop"
        elif done:
            req.finish_reason = "length"
        text = self._emit(req) if req.detokenizer is not None else ""
        return StepOutput(req.id, [token], text, req.finish_reason, req.prompt_len, n_generated)

    def _cut_at_stop_string(self, req: _Request) -> bool:
        """Truncate ``req.text`` before the first stop string; True if one was found."""
        if not req.params.stop:
            return False
        # emitted text never ends in a partial stop string (see _emit), so a match starts after it
        hits = [i for s in req.params.stop if (i := req.text.find(s, req.emitted)) >= 0]
        if not hits:
            return False
        req.text = req.text[: min(hits)]
        return True

    def _emit(self, req: _Request) -> str:
        """Text safe to hand out: hold back a tail that could still grow into a stop string."""
        end = len(req.text)
        if req.finish_reason is None and req.params.stop:
            end -= _partial_stop_suffix(req.text, req.params.stop)
        end = max(end, req.emitted)
        piece = req.text[req.emitted : end]
        req.emitted = end
        return piece


def _partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _find_eos(tokenizer: Tokenizer | None) -> int | None:
    if tokenizer is None:
        return None
    for name in EOS_TOKENS:
        if (token_id := tokenizer.token_to_id(name)) is not None:
            return token_id
    return None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = cuda if available, else mps, else cpu; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
