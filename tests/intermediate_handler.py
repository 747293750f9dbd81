"""A TorchServe handler for tests/test_torchserve_patch_e2e.py: continuous batching where every handle()
call streams intermediate messages before its final reply, as JAI's multi-step handler does.

A request ``{"name": N}`` lasts STEPS handle() calls; each call sends CHUNKS intermediate messages (with
the message text "Intermediate", like handler/jai_handler.py) and then returns one more line, so the
client must receive exactly ``expected_lines(N)``, in order. The frontend re-sends a continuing request
without its body (TorchServe caches it); a request this handler does not hold arriving without a body
means the frontend called handle() when it should not have: that is an error, not something to paper over.
"""

import json

from ts.handler_utils.utils import send_intermediate_predict_response

STEPS = 2
CHUNKS = 3
INTERMEDIATE = "Intermediate"  # the message text the agent's fix 3 recognizes

_names = {}  # request id -> the client's name, while the request runs
_steps = {}  # request id -> handle() calls it has had


def expected_lines(name):
    return [f"{name} {step}.{part}\n" for step in range(1, STEPS + 1) for part in [*range(1, CHUNKS + 1), "end"]]


def handle(data, context):
    if data is None:  # TorchServe's initialize call for a module-level handler
        return None
    ids = context.request_ids  # {batch position: request id}
    for position, request_id in ids.items():
        if request_id not in _names:
            _names[request_id] = _body(data[position], request_id)["name"]
        _steps[request_id] = _steps.get(request_id, 0) + 1
    for part in range(1, CHUNKS + 1):
        send_intermediate_predict_response(
            [_line(ids[p], part) for p in sorted(ids)], ids, INTERMEDIATE, 200, context
        )
    finals = [_line(ids[p], "end") for p in sorted(ids)]
    done = [_steps[ids[p]] == STEPS for p in sorted(ids)]
    context.stopping_criteria = [lambda _, finished=finished: finished for finished in done]
    for position, finished in zip(sorted(ids), done):
        if finished:
            del _names[ids[position]], _steps[ids[position]]
    return finals


def _line(request_id, part):
    return f"{_names[request_id]} {_steps[request_id]}.{part}\n"


def _body(item, request_id):
    body = item.get("body") if isinstance(item, dict) else None
    if body is None:
        raise RuntimeError(f"request {request_id}: a continuation for a request this handler does not hold")
    return json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
