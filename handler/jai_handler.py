"""TorchServe handler for JAI: a thin adapter between TorchServe's batches and ``jaiserve.Engine``.

With ``continuousBatching: true`` (our configuration) every ``handle()`` call runs engine steps over the
requests TorchServe currently holds: new requests arrive with a body and are admitted, running ones
arrive again without a body (and, with our frontend patch, without their headers: only an arriving
request's are read), and a request missing from the batch has disconnected (when hung-up clients
leave the batch empty, our patch sends one empty batch, so that they are freed now). One call runs
several steps, streaming each step's lines as intermediate responses, and returns to TorchServe when
its time budget (``handler.step_budget_ms``) is spent or a request finishes, so waiting requests join
within the budget and a finished request's answer and slot are not held back (the idea of vLLM's
multi-step scheduling: one frontend round trip per budget, not per token). Each request's last reply
says whether it continues (``context.stopping_criteria``). Intermediate responses inside one call need
our frontend patch (torchserve-patch/): TorchServe 0.12.0 ends the call at the first message. With
TorchServe's default batcher the same loop runs its batch to completion.

Every engine call runs on one thread of its own (the one that owns torch's OpenMP threads), so the
engine can work while this thread talks to TorchServe: with ``handler.step_ahead`` a continuous call
leaves the next step running when it returns, and the next call takes its tokens at once. The round
trip to the frontend (writing the replies, TorchServe re-sending every running request, parsing them)
then overlaps a step instead of adding to it, and so do each call's intermediate responses. The step
ahead cannot admit the requests the next call brings; that call admits them and steps once more. So
that they wait as little as possible for it, the step ahead only decodes: prompts and re-read windows
are prefilled by the steps inside calls.

The HTTP contract lives in jaiserve/api.py and openai_api.py: TorchServe's ``url_path`` header (what
follows ``/predictions/jai/<version>/``) picks the view (jaiserve/routes.py: native, or OpenAI's under
``v1/``), which parses a body into an exchange of one or more engine requests (OpenAI's ``n`` and
prompt lists fan out into the same batch) and formats their steps. This module only moves requests and steps between the two.

A worker can hold more than one checkpoint (jaiserve/updates.py, docs/updates.md): ``make update`` names a
new one, a thread of its own loads and warms it, and from then on new requests go to it while running
ones finish in the engine they started in; every step steps each engine that still holds requests.

Never raise out of ``handle()``: TorchServe would fail every request of the batch. Bad input is a
400 for that request alone; an engine failure is a 500 for the requests it touched.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from jaiserve import Engine, Limits, ParameterError, SamplingParams, file_sha256, load_model, load_tokenizer
from jaiserve.api import JSON, Defaults, Exchange, GenerationRequest, InvalidRequest, ServedModel, reason_phrase
from jaiserve.drain import DRAINING, DrainState
from jaiserve.packed import linear_kernels
from jaiserve.routes import route
from jaiserve.settings import Settings
from jaiserve.updates import CHECKPOINT, TOKENIZER, UpdateState, version_name

logger = logging.getLogger(__name__)

INTERMEDIATE = "Intermediate"  # the message torchserve-patch/ recognises as "more replies follow"


class JAIHandler(BaseHandler):
    # TorchServe requires exactly one class per handler module, hence nested.
    @dataclass
    class Call:
        """A request TorchServe has handed us and not yet answered in full."""

        exchange: Exchange  # its view's response state (jaiserve.api)
        engine_ids: list  # the engine request of each of its choices
        version: JAIHandler.Version  # the checkpoint it runs on to its end, whatever is loaded meanwhile
        chunked: bool = False  # a chunk went out: TorchServe answers it as a chunked response

    @dataclass
    class Version:
        """A checkpoint this worker serves: the current one (new requests) or one finishing its requests."""

        name: str  # jaiserve.updates.version_name: in answers, describe, metrics and logs
        source: Path  # the folder its files came from: the archive's, or one scripts/update.py named
        engine: Engine
        description: dict  # its part of describe

    @dataclass
    class Running:
        """An engine request (one choice of a call) not yet finished: its timings, for logs and metrics."""

        request: GenerationRequest
        started: float
        version: str  # the name of the checkpoint it runs on
        prompt_tokens: int = 0
        generated: int = 0  # tokens generated so far
        first_token_at: float | None = None
        last_token_at: float | None = None

    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        yaml_config = context.model_yaml_config or {}
        self.settings = Settings.from_yaml(yaml_config.get("handler"))
        self.defaults = Defaults(**self.settings.defaults, max_choices=self.settings.max_choices)
        self.continuous = bool(yaml_config.get("continuousBatching", False))
        self.threads = self.settings.threads or torch.get_num_threads()
        # the engine's thread: the model's load, every step, abort and the step left running between calls
        # (module docstring). It is the one long-lived thread that runs torch's multi-threaded operators:
        # GNU OpenMP gives every such thread a team of its own, and once two teams live in one process
        # (more OpenMP threads than cores) every parallel region starts by waking a sleeping thread (an
        # elementwise add of 200k floats: 12 us with one team, 65-85 us with two; a two-thread decode step
        # 4.7 ms against 9.1-9.8). So TorchServe's main thread runs none, and a model update loads on a
        # thread that ends after it (its team ends with it).
        self.engine_thread = self._torch_thread("jai-engine")
        self.ahead: Future | None = None  # the step running while TorchServe's round trip happens
        self.step_ahead = self.continuous and self.settings.step_ahead
        self.device = self._device(properties)
        self.max_batch = int(yaml_config.get("batchSize", 1))
        self.model_name = context.model_name
        self.versions: dict[str, JAIHandler.Version] = {}  # the current one and those finishing requests
        self._serve(self.engine_thread.submit(
            self._load_version, model_dir / self.settings.checkpoint, model_dir / self.settings.tokenizer, model_dir
        ).result())
        self.calls: dict[str, JAIHandler.Call] = {}  # by TorchServe request id
        self.running: dict[str, JAIHandler.Running] = {}  # by engine request id
        self.reported_active = None  # last value of the jai_active_requests gauge this worker sent
        self.drain = DrainState.for_worker()  # None outside a TorchServe worker (tests); see jaiserve/drain.py
        # model updates (jaiserve/updates.py, docs/updates.md): a new version loads and warms on a thread of
        # its own while this worker serves, and takes new requests from the next call on
        self.updates = UpdateState(self.drain.folder) if self.drain is not None else None
        self.loading: tuple[Path, Future] | None = None  # (version folder, its load) while one loads
        self.failed: Path | None = None  # a folder that would not load: not tried again until named again
        # handle() and the watcher take turns: a version changes between calls, never inside one
        self.lock = threading.Lock()
        if self.updates is not None:
            self.updates.report(f"{self.current.name} {self.current.source}")
            # an idle worker gets no handle() call: it follows updates all the same
            threading.Thread(target=self._watch_updates, name="jai-updates", daemon=True).start()
        self.context = context
        self.initialized = True
        self._counter("jai_worker_starts_total", 1)  # TorchServe restarts a dead worker under the same name
        logger.info("JAI ready: %s", self.description)

    def _load_version(self, checkpoint: Path, tokenizer_file: Path, source: Path) -> JAIHandler.Version:
        """Load a checkpoint and its tokenizer into an engine of their own (the loader thread, for updates)."""
        model = load_model(
            checkpoint, self.settings.n_head, self.device, self.settings.dtype, cpu_linear=self.settings.cpu_linear
        )
        tokenizer = load_tokenizer(tokenizer_file, model.config.vocab_size)
        engine = Engine(
            model,
            tokenizer,
            max_batch=self.max_batch,
            limits=Limits(self.settings.max_tokens_limit, self.settings.max_prompt_tokens),
            max_prefill_tokens=self.settings.max_prefill_tokens,
            utf8_safe_sampling=self.settings.utf8_safe_sampling,
            window_stride=self.settings.window_stride,
            threads=self.threads,
            one_thread_rows=self.settings.one_thread_rows,
        )
        sha256 = file_sha256(checkpoint)
        description = {
            "device": str(self.device),
            "dtype": self.settings.dtype,
            "parameters": model.num_parameters(),
            "linear_kernels": linear_kernels(model),
            "vocab_size": model.config.vocab_size,
            "block_size": model.config.block_size,
            "n_layer": model.config.n_layer,
            "n_head": model.config.n_head,
            "n_embd": model.config.n_embd,
            "checkpoint_sha256": sha256,
            "model_version": version_name(sha256),
        }
        return self.Version(version_name(sha256), Path(source), engine, description)

    def _load_and_warm(self, folder: Path) -> JAIHandler.Version:
        version = self._load_version(folder / CHECKPOINT, folder / TOKENIZER, folder)
        # one short greedy generation: its first requests do not pay for first-call allocations
        version.engine.generate([[0]], [SamplingParams(max_tokens=2, temperature=0)])
        return version

    def _serve(self, version: JAIHandler.Version):
        """Send new requests to ``version`` from now on; requests running elsewhere finish where they are."""
        self.current = version
        self.versions[version.name] = version
        self.engine = version.engine
        self.description = {
            **version.description,
            "max_batch": self.engine.max_batch,
            "continuous_batching": self.continuous,
            "step_ahead": self.step_ahead,
            "torch_threads": self.threads,
        }
        self.served = ServedModel(
            name=self.model_name,
            created=int(time.time()),
            context_tokens=version.engine.config.block_size,
            count_tokens=lambda text, engine=version.engine: len(engine.encode(text)),
            version=version.name,
            device=str(self.device),
        )

    def _watch_updates(self, interval_s: float = 0.25):
        while True:
            time.sleep(interval_s)
            with self.lock:
                try:
                    self._follow_updates()
                except Exception:  # never end the thread: the next look may succeed
                    logger.exception("model update: watching %s failed", self.updates.target_file)

    def _follow_updates(self):
        """At every call and every watcher look (under self.lock): start loading the version
        scripts/update.py names; serve it once it is loaded and warm."""
        if self.updates is None:
            return
        if self.loading is not None:
            folder, load = self.loading
            if not load.done():
                return
            self.loading = None
            try:
                version = load.result()
            except Exception as exc:  # a bad checkpoint must not take the worker down: keep serving
                logger.exception("model update: cannot serve %s; still serving %s", folder, self.current.name)
                self.failed = folder
                self.updates.report(f"failed {folder}: {(str(exc).splitlines() or [type(exc).__name__])[0]}")
                return
            loaded = self.versions.get(version.name)  # the same checkpoint, still finishing requests
            if loaded is not None:
                loaded.source = folder
            self._switch_to(loaded or version)
            return
        target = self.updates.target()
        if target is None or target == self.current.source or target == self.failed:
            return
        loaded = next((v for v in self.versions.values() if v.source == target), None)
        if loaded is not None:  # a rollback while the version it returns to still finishes requests
            self._switch_to(loaded)
        else:
            logger.info("model update: loading %s", target)
            # a thread for this load only: it ends once the load is done, and its OpenMP team with it
            loader = self._torch_thread("jai-loader")
            self.loading = (target, loader.submit(self._load_and_warm, target))
            loader.shutdown(wait=False)

    def _torch_thread(self, name: str) -> ThreadPoolExecutor:
        """One thread that runs torch with this worker's thread count (torch gives a new thread its default)."""
        return ThreadPoolExecutor(1, name, initializer=torch.set_num_threads, initargs=(self.threads,))

    def _switch_to(self, version: JAIHandler.Version):
        previous = self.current.name
        self._serve(version)
        self.failed = None
        self.updates.report(f"{version.name} {version.source}")
        logger.info("model update: new requests go to %s (was %s); %s", version.name, previous, version.description)

    def _device(self, properties) -> torch.device:
        if self.settings.device != "auto":
            return torch.device(self.settings.device)
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        return torch.device("cpu")

    def describe_handle(self):
        running = {name: 0 for name in self.versions}
        for state in self.running.values():
            running[state.version] = running.get(state.version, 0) + 1
        return json.dumps({**self.description, "running_requests": len(self.running), "draining": self._draining(),
                           "versions_running": running})

    # ----- TorchServe entry point -----

    def handle(self, data, context):
        with self.lock:
            return self._handle(data, context)

    def _handle(self, data, context):
        self.context = context
        replies = {}
        try:
            self._follow_updates()
            ahead = self.preprocess(data, context, replies)
            self._report_active()
            return self.postprocess(self.inference(context, replies, ahead), context, replies)
        except Exception:  # never let one failure fail the batch through TorchServe
            logger.exception("engine step failed; answering 500 to the requests of this batch")
            return self._fail_all(context)

    def preprocess(self, data, context, replies) -> list | None:
        """Admit new requests into the engine; answer bad ones, model lists and describes now; forget
        vanished ones.

        Returns the outputs of the step that ran ahead (None: none did). New requests are parsed and
        tokenized while it runs; the engine is touched only once it is done.
        """
        draining = self._draining()  # once per call: requests already running continue either way
        arrivals = []  # (idx, request id, view, exchange, prompt token ids)
        for idx, row in enumerate(data):
            request_id = context.request_ids[idx]
            if request_id in self.calls:
                continue
            # GET /models/jai?customized=true: alone in its batch, or (continuous batching, our frontend
            # patch) beside running requests, so that it does not wait for them to end
            if context.get_request_header(idx, "describe") == "True":
                replies[idx] = (200, self.describe_handle())
                continue
            view = route(context.get_request_header(idx, "url_path"))
            if draining:
                replies[idx] = (503, view.refusal(InvalidRequest(None, DRAINING, status=503, code="draining")))
                continue
            try:
                if "body" not in row and "data" not in row:  # e.g. curl -d without a JSON content type
                    raise InvalidRequest("body", "must be JSON sent with 'Content-Type: application/json'")
                exchange = view.parse(row.get("body", row.get("data")), request_id, self.defaults, self.served)
                if not exchange.requests:  # answered without the engine
                    replies[idx] = (200, exchange.final())
                    continue
                prompts = [self.engine.encode(r.prompt) for r in exchange.requests]
                arrivals.append((idx, request_id, view, exchange, prompts))
            except InvalidRequest as exc:
                replies[idx] = (exc.status, view.refusal(exc))
        ahead, self.ahead = self.ahead, None
        outputs = ahead.result() if ahead is not None else None  # raises what the step raised
        present = set(context.request_ids.values())
        for request_id in [r for r in self.calls if r not in present]:
            self._abort(request_id, "aborted")  # its client disconnected: free the slots
        for idx, request_id, view, exchange, prompts in arrivals:
            try:
                self._admit(request_id, exchange, prompts)
            except ParameterError as exc:  # the engine's configured limits (max_tokens, prompt length)
                replies[idx] = (400, view.refusal(InvalidRequest.from_parameter(exc)))
        return outputs

    def _admit(self, request_id, exchange: Exchange, prompts: list[list[int]]):
        """Queue every engine request of a call, or none of them (one refused: the others are withdrawn)."""
        requests = exchange.requests
        version = self.current
        engine_ids = [request_id] if len(requests) == 1 else [f"{request_id}/{i}" for i in range(len(requests))]
        admitted = []
        try:
            for engine_id, request, prompt_ids in zip(engine_ids, requests, prompts):
                self.engine.add_request(engine_id, prompt_ids, request.params)
                admitted.append((engine_id, request, len(prompt_ids)))
        except Exception:
            for engine_id, _, _ in admitted:
                self.engine.abort(engine_id)  # still waiting: no cache row moves
            raise
        now = time.perf_counter()
        for engine_id, request, prompt_tokens in admitted:
            self.running[engine_id] = self.Running(request, now, version.name, prompt_tokens)
        self.calls[request_id] = self.Call(exchange, engine_ids, version)

    def _abort(self, request_id, reason):
        """Drop a call and whatever of it the engine still runs."""
        call = self.calls.pop(request_id)
        for engine_id in call.engine_ids:
            state = self.running.pop(engine_id, None)
            if state is not None:
                self.engine_thread.submit(call.version.engine.abort, engine_id).result()  # may move cache rows
                self._finished(engine_id, state, reason, state.prompt_tokens, state.generated)

    def inference(self, context, replies, ahead: list | None = None) -> dict[int, tuple]:
        """Step the engine for this batch; return ``{idx: (call, whether it finished)}``.

        ``ahead``: the outputs of the step that ran since the last call, taken first. Continuous
        batching: until the step budget is spent or a call finishes, and at least one step after this
        call's admissions (a new request's first token comes with its first call, so one that finishes
        at once gets a complete response). Default batcher: until every call of the batch has finished.
        Chunks of every step but the last go out as intermediate responses, while the engine runs the
        next step; the last step's go out with ``handle()``'s return.
        """
        ids = context.request_ids
        batch = {idx: self.calls[ids[idx]] for idx in range(len(ids)) if idx not in replies}
        for idx, call in batch.items():  # before any chunk: a response's headers are fixed by its first
            context.set_response_content_type(idx, call.exchange.content_type)
        done = set()
        deadline = time.perf_counter() + self.settings.step_budget_ms / 1000
        produced = 0
        stepped = not any(v.engine.waiting for v in self.versions.values())  # nothing admitted waits for a step
        step_outputs = ahead or None  # [] when no row could decode ahead
        while len(done) < len(batch):
            if step_outputs is None:
                step_outputs, stepped = self.engine_thread.submit(self._step).result(), True
            outputs = {out.request_id: out for out in step_outputs}
            step_outputs = None
            if not outputs:
                raise RuntimeError("the engine holds this batch's requests but produced nothing")
            for idx, call in batch.items():
                for index, engine_id in enumerate(call.engine_ids):
                    if (out := outputs.get(engine_id)) is not None:  # None: finished, or waiting for a slot
                        produced += len(out.token_ids)
                        self._absorb(engine_id, out)
                        call.exchange.add(index, out)
                if idx not in done and call.exchange.finished:
                    done.add(idx)
            if self.continuous and stepped and (done or time.perf_counter() >= deadline):
                break
            if len(done) < len(batch):  # the next step runs while this one's chunks go out
                step, stepped = self.engine_thread.submit(self._step), True
                self._send_chunks(context, {i: c for i, c in batch.items() if i not in done})
                step_outputs = step.result()
        for name, version in list(self.versions.items()):  # an old version's last request has finished
            if version is not self.current and not version.engine.has_work():
                del self.versions[name]
                logger.info("model update: %s retired (its requests have finished)", name)
        if self.step_ahead and self._has_work():  # decode only: the next call's arrivals wait for it
            self.ahead = self.engine_thread.submit(self._step, prefill=False)
        self._counter("jai_generated_tokens_total", produced)  # as produced: rate() stays smooth
        return {idx: (call, idx in done) for idx, call in batch.items()}

    def postprocess(self, results, context, replies):
        """One reply per request of the batch: a refusal, a stream chunk (or empty one), or the final body."""
        criteria, responses = [], []
        for idx in range(len(context.request_ids)):
            if idx in replies:  # answered at admission (a refusal, a model list): a complete response
                responses.append(self._answer(context, idx, *replies[idx]))
                criteria.append(None)
                continue
            call, finished = results[idx]
            if finished:
                del self.calls[context.request_ids[idx]]
                responses.append(call.exchange.final())
                # never chunked before: a plain complete response; otherwise the end of the chunked one
                criteria.append(True if call.chunked else None)
            else:
                responses.append(call.exchange.chunk())
                criteria.append(False)
                call.chunked = True
        # TorchServe keeps one context for every call: the default batcher ends every request of the batch
        # here, and must not leave the criteria of an earlier (failed) call to answer this one
        context.stopping_criteria = [lambda _, done=done: done for done in criteria] if self.continuous else None
        return responses

    # ----- helpers -----

    def _step(self, prefill: bool = True) -> list:
        """One engine step of every version holding requests (the engine thread): usually one engine."""
        outputs = []
        for version in list(self.versions.values()):
            if version.engine is self.engine or version.engine.has_work():
                outputs += version.engine.step() if prefill else version.engine.step(prefill=False)
        return outputs

    def _has_work(self) -> bool:
        return any(v.engine.has_work() for v in self.versions.values())

    def _absorb(self, engine_id, out):
        """An engine request's step, for its timings; a finished one is logged and forgotten."""
        state = self.running[engine_id]
        now = time.perf_counter()
        if state.first_token_at is None:
            state.first_token_at = now
            self._histogram("jai_time_to_first_token_seconds", now - state.started)
        if out.token_ids:
            state.last_token_at = now
            state.generated += len(out.token_ids)
        if out.finished:
            del self.running[engine_id]
            self._finished(engine_id, state, out.finish_reason, out.prompt_tokens, out.completion_tokens)

    def _send_chunks(self, context, batch: dict[int, JAIHandler.Call]):
        """Stream chunks now, as one intermediate response for the calls that have one."""
        chunks = {idx: chunk for idx, call in batch.items() if (chunk := call.exchange.chunk())}
        if chunks:
            send_intermediate_predict_response(
                chunks, {idx: context.request_ids[idx] for idx in chunks}, INTERMEDIATE, 200, context
            )
            for idx in chunks:
                batch[idx].chunked = True

    def _draining(self) -> bool:
        """Whether scripts/serve.sh drain asked this server to stop admitting requests."""
        return self.drain is not None and self.drain.draining()

    @staticmethod
    def _answer(context, idx, code, body) -> str:
        if code != 200:
            context.set_response_status(code, reason_phrase(code), idx)
        context.set_response_content_type(idx, JSON)
        return body

    def _fail_all(self, context):
        """An engine failure: 500 for every request of this batch, and a clean engine for the next."""
        message = "generation failed; see the model log"
        criteria, bodies = [], []
        for idx in range(len(context.request_ids)):
            call = self.calls.get(context.request_ids[idx])
            # a request already answered in chunks ends its stream; a new one gets a complete response
            chunked = call is not None and call.chunked
            criteria.append(True if chunked else None)
            context.set_response_status(500, reason_phrase(500), idx)
            if call is not None:
                bodies.append(call.exchange.failure(500, message, streaming=chunked))
            else:  # failed before its call was admitted: the shape of the route it came by
                view = route(context.get_request_header(idx, "url_path"))
                bodies.append(view.refusal(InvalidRequest(None, message, status=500)))
            if not chunked:  # a chunked response's headers went out with its first chunk
                context.set_response_content_type(idx, JSON)
        for request_id in list(self.calls):
            self._abort(request_id, "error")
        self._report_active()
        context.stopping_criteria = [lambda _, done=done: done for done in criteria]
        return bodies

    def _finished(self, request_id, state: JAIHandler.Running, finish_reason, prompt_tokens, completion_tokens):
        """A request left the engine (stop, length, aborted or error): its log line and its metrics."""
        self._log(request_id, state, finish_reason, prompt_tokens, completion_tokens)
        self._counter("jai_prompt_tokens_total", prompt_tokens)  # generated ones are counted as produced
        self._counter("jai_requests_finished_total", 1, FinishReason=finish_reason, ModelVersion=state.version)
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
        """jai_active_requests, and this worker's count for a drain: when it changes, not every step."""
        active = len(self.running)
        if active == self.reported_active:
            return
        if self.drain is not None:
            self.drain.record_active(active)
        if self.context.metrics is not None:
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
            "request %s prompt_tokens=%d generated_tokens=%d finish_reason=%s ttft_ms=%.1f total_ms=%.1f version=%s%s",
            request_id, prompt_tokens, completion_tokens, finish_reason, ttft, (now - state.started) * 1000,
            state.version, prompt,
        )

