"""TorchServe handler for JAI: a thin adapter between TorchServe's batches and ``jaiserve.Engine``.

With ``continuousBatching: true`` every ``handle()`` call is ONE engine step over
the requests TorchServe currently holds: new requests arrive with a body and are admitted, running
ones arrive again without a body, and a request missing from the batch has disconnected. Each
request's reply says whether it continues (``context.stopping_criteria``). With TorchServe's default
batcher (our configuration, see model-config.yaml for why) the same handler runs its batch to
completion in the engine and streams with intermediate responses.

Never raise out of ``handle()``: TorchServe would fail every request of the batch. Bad input is a
400 for that request alone; an engine failure is a 500 for the requests it touched.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from jaiserve import Engine, Limits, ParameterError, file_sha256, load_model, load_tokenizer
from jaiserve.api import Defaults, GenerationRequest, InvalidRequest, completion_body, error_body, parse_request
from jaiserve.checkpoint import quantize_int8
from jaiserve.settings import Settings

logger = logging.getLogger(__name__)

JSON = "application/json"
NDJSON = "application/x-ndjson"


class JAIHandler(BaseHandler):
    # TorchServe requires exactly one class per handler module, hence nested.
    @dataclass
    class Running:
        """A request TorchServe has handed us and not yet been answered in full."""

        request: GenerationRequest
        started: float
        prompt_tokens: int = 0
        steps: int = 0  # handle() calls that carried this request
        generated: int = 0  # tokens generated so far
        first_token_at: float | None = None
        last_token_at: float | None = None
        pieces: list[str] = field(default_factory=list)
        unsent_ids: list[int] = field(default_factory=list)  # tokens not yet in a stream line
        unsent_text: str = ""

    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        yaml_config = context.model_yaml_config or {}
        self.settings = Settings.from_yaml(yaml_config.get("handler"))
        self.defaults = Defaults(**self.settings.defaults)
        self.continuous = bool(yaml_config.get("continuousBatching", False))
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.device = self._device(properties)
        checkpoint = model_dir / self.settings.checkpoint
        int8 = self.settings.dtype == "int8"  # load float32, count parameters, then quantize the Linears
        model = load_model(checkpoint, self.settings.n_head, self.device, "float32" if int8 else self.settings.dtype)
        parameters = model.num_parameters()
        if int8:
            model = quantize_int8(model)
        tokenizer = load_tokenizer(model_dir / self.settings.tokenizer, model.config.vocab_size)
        self.engine = Engine(
            model,
            tokenizer,
            max_batch=int(yaml_config.get("batchSize", 1)),
            limits=Limits(self.settings.max_tokens_limit, self.settings.max_prompt_tokens),
            max_prefill_tokens=self.settings.max_prefill_tokens,
            window_stride=self.settings.window_stride,
        )
        self.description = {
            "device": str(self.device),
            "dtype": self.settings.dtype,
            "parameters": parameters,
            "vocab_size": model.config.vocab_size,
            "block_size": model.config.block_size,
            "n_layer": model.config.n_layer,
            "n_head": model.config.n_head,
            "n_embd": model.config.n_embd,
            "checkpoint_sha256": file_sha256(checkpoint),
            "max_batch": self.engine.max_batch,
            "continuous_batching": self.continuous,
            "torch_threads": torch.get_num_threads(),
        }
        self.running: dict[str, JAIHandler.Running] = {}
        self.reported_active = None  # last value of the jai_active_requests gauge this worker sent
        self.context = context
        self.initialized = True
        self._counter("jai_worker_starts_total", 1)  # TorchServe restarts a dead worker under the same name
        logger.info("JAI ready: %s", self.description)

    def _device(self, properties) -> torch.device:
        if self.settings.device != "auto":
            return torch.device(self.settings.device)
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        return torch.device("cpu")

    def describe_handle(self):
        return json.dumps({**self.description, "running_requests": len(self.running)})

    # ----- TorchServe entry point -----

    def handle(self, data, context):
        self.context = context
        if self._is_describe():  # GET /models/jai?customized=true (BaseHandler's convention)
            return [self.describe_handle()]
        replies = {}
        try:
            self.preprocess(data, context, replies)
            self._report_active()
            if not self.continuous:
                return self._run_to_completion(context, replies)
            outputs = self.inference()
            return self.postprocess(outputs, context, replies)
        except Exception:  # never let one failure fail the batch through TorchServe
            logger.exception("engine step failed; answering 500 to the requests of this batch")
            return self._fail_all(context)

    def preprocess(self, data, context, replies):
        """Admit new requests into the engine; answer bad ones with a 400 now; forget vanished ones."""
        present = set(context.request_ids.values())
        for request_id in [r for r in self.running if r not in present]:
            self.engine.abort(request_id)  # its client disconnected: free the slot
            state = self.running.pop(request_id)
            self._finished(request_id, state, "aborted", state.prompt_tokens, state.generated)
        for idx, row in enumerate(data):
            request_id = context.request_ids[idx]
            if request_id in self.running:
                continue
            try:
                if "body" not in row and "data" not in row:  # e.g. curl -d without a JSON content type
                    raise InvalidRequest("body", "must be JSON sent with 'Content-Type: application/json'")
                request = parse_request(row.get("body", row.get("data")), self.defaults)
                prompt_ids = self.engine.encode(request.prompt)
                self.engine.add_request(request_id, prompt_ids, request.params)
            except InvalidRequest as exc:
                replies[idx] = (400, _json(error_body(400, str(exc))))
            except ParameterError as exc:  # the engine's configured limits (max_tokens, prompt length)
                replies[idx] = (400, _json(error_body(400, f"{exc.field}: {exc.problem}")))
            else:
                self.running[request_id] = self.Running(request, time.perf_counter(), len(prompt_ids))

    def inference(self):
        return {out.request_id: out for out in self.engine.step()}

    def postprocess(self, outputs, context, replies):
        """One reply per request of the batch: a stream line, an empty chunk, or the final body."""
        criteria, responses = [], []
        for idx in range(len(context.request_ids)):
            request_id = context.request_ids[idx]
            if idx in replies:  # refused at admission: a complete 400 response
                responses.append(self._refuse(context, idx, *replies[idx]))
                criteria.append(None)
                continue
            state = self.running[request_id]
            state.steps += 1
            out = outputs.get(request_id)
            finished = self._absorb(request_id, state, out)
            context.set_response_content_type(idx, NDJSON if state.request.stream else JSON)
            responses.append(self._reply(state, out, finished))
            # finished on its first step: a plain complete response; otherwise end or continue the chunked one
            criteria.append(None if finished and state.steps == 1 else finished)
        context.stopping_criteria = [lambda _, done=done: done for done in criteria]
        return responses

    # ----- helpers -----

    def _absorb(self, request_id, state: JAIHandler.Running, out) -> bool:
        if out is None:
            return False  # still waiting for a prefill slot
        now = time.perf_counter()
        if state.first_token_at is None:
            state.first_token_at = now
            self._histogram("jai_time_to_first_token_seconds", now - state.started)
        if out.token_ids:
            state.last_token_at = now
            state.generated += len(out.token_ids)
        state.pieces.append(out.text)
        state.unsent_ids += out.token_ids
        state.unsent_text += out.text
        if out.finished:
            del self.running[request_id]
            self._finished(request_id, state, out.finish_reason, out.prompt_tokens, out.completion_tokens)
        return out.finished

    def _reply(self, state: JAIHandler.Running, out, finished: bool) -> str:
        request = state.request
        if finished:
            body = completion_body(
                request, "".join(state.pieces), out.finish_reason, out.prompt_tokens, out.completion_tokens
            )
            if not request.stream:
                return _json(body)
            return _json({"text": state.unsent_text, "token_ids": state.unsent_ids, **body}) + "\n"
        if not request.stream or not state.unsent_text:
            return ""  # nothing to show yet (a split character, or a non-streamed request)
        line = _json({"text": state.unsent_text, "token_ids": state.unsent_ids}) + "\n"
        state.unsent_text, state.unsent_ids = "", []
        return line

    def _run_to_completion(self, context, replies):
        """Default batcher: step until this batch is done, streaming lines as intermediate responses."""
        ids = context.request_ids
        for idx in range(len(ids)):
            if idx not in replies:
                stream = self.running[ids[idx]].request.stream
                context.set_response_content_type(idx, NDJSON if stream else JSON)
        while any(ids[i] in self.running for i in range(len(ids)) if i not in replies):
            outputs = self.inference()
            chunks = {}
            for idx in range(len(ids)):
                state = self.running.get(ids[idx])
                if idx in replies or state is None:
                    continue
                state.steps += 1
                out = outputs.get(ids[idx])
                if self._absorb(ids[idx], state, out):
                    replies[idx] = (200, self._reply(state, out, True))
                elif state.request.stream and (line := self._reply(state, None, False)):
                    chunks[idx] = line
            if chunks:
                send_intermediate_predict_response(
                    chunks, {i: ids[i] for i in chunks}, "Intermediate", 200, context
                )
        return [
            body if code == 200 else self._refuse(context, idx, code, body)
            for idx, (code, body) in sorted(replies.items())
        ]

    @staticmethod
    def _refuse(context, idx, code, body) -> str:
        context.set_response_status(code, "Bad Request", idx)
        context.set_response_content_type(idx, JSON)
        return body

    def _fail_all(self, context):
        """An engine failure: 500 for every request of this batch, and a clean engine for the next."""
        criteria = []
        for idx in range(len(context.request_ids)):
            state = self.running.get(context.request_ids[idx])
            # a request already answered in chunks ends its stream; a new one gets a complete response
            criteria.append(True if state is not None and state.steps > 0 else None)
            context.set_response_status(500, "Internal Server Error", idx)
            context.set_response_content_type(idx, JSON)
        for request_id, state in self.running.items():
            self.engine.abort(request_id)
            self._finished(request_id, state, "error", state.prompt_tokens, state.generated)
        self.running.clear()
        self._report_active()
        context.stopping_criteria = [lambda _, done=done: done for done in criteria]
        body = _json(error_body(500, "generation failed; see the model log", "InternalServerError"))
        return [body] * len(context.request_ids)

    def _finished(self, request_id, state: JAIHandler.Running, finish_reason, prompt_tokens, completion_tokens):
        """A request left the engine (stop, length, aborted or error): its log line and its metrics."""
        self._log(request_id, state, finish_reason, prompt_tokens, completion_tokens)
        self._counter("jai_prompt_tokens_total", prompt_tokens)
        self._counter("jai_generated_tokens_total", completion_tokens)
        self._counter("jai_requests_finished_total", 1, FinishReason=finish_reason)
        if state.generated >= 2:
            between = (state.last_token_at - state.first_token_at) / (state.generated - 1)
            self._histogram("jai_inter_token_latency_seconds", between)
        self._report_active()

    # ----- metrics: declared in metrics.yaml (model_metrics), else TorchServe drops them -----

    def _dimensions(self, **custom) -> list:
        # Explicit and fresh each call (TorchServe appends its defaults to the list it is given), in
        # metrics.yaml's order: custom dimensions, then ModelName and Level.
        dims = [Dimension(name, str(value)) for name, value in custom.items()]
        return dims + [Dimension("ModelName", self.context.model_name), Dimension("Level", "Model")]

    def _counter(self, name, value, **custom):
        if self.context.metrics is not None:  # None only in tests that run the handler without TorchServe
            self.context.metrics.add_counter(name, value, dimensions=self._dimensions(**custom))

    def _histogram(self, name, seconds):
        if self.context.metrics is not None:
            self.context.metrics.add_metric(
                name, seconds, "s", dimensions=self._dimensions(), metric_type=MetricTypes.HISTOGRAM
            )

    def _report_active(self):
        """jai_active_requests: sent when it changes (admission, a request leaving), not every step."""
        active = len(self.running)
        if self.context.metrics is not None and active != self.reported_active:
            self.context.metrics.add_metric(
                "jai_active_requests", active, "count", dimensions=self._dimensions(), metric_type=MetricTypes.GAUGE
            )
            self.reported_active = active

    def _log(self, request_id, state: JAIHandler.Running, finish_reason, prompt_tokens, completion_tokens):
        now = time.perf_counter()
        ttft = (state.first_token_at - state.started) * 1000 if state.first_token_at else float("nan")
        prompt = ""
        if self.settings.log_prompt_chars:
            prompt = f" prompt={state.request.prompt[: self.settings.log_prompt_chars]!r}"
        logger.info(
            "request %s prompt_tokens=%d generated_tokens=%d finish_reason=%s ttft_ms=%.1f total_ms=%.1f%s",
            request_id, prompt_tokens, completion_tokens, finish_reason, ttft, (now - state.started) * 1000, prompt,
        )


def _json(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False)
