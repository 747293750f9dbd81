"""Draining, the handler's side (handler/jaiserve/drain.py): the marker refuses new requests with a 503
while admitted ones finish, and each worker publishes its count of unfinished requests. No server here;
tests/test_scaleout.py drains real servers."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ts.context import Context, RequestProcessor

import jai_handler
from jaiserve.drain import DRAINING, FRONTEND_CLASS, DrainState, drain_folder


def test_the_marker_file_switches_draining_on_and_off(tmp_path):
    state = DrainState(tmp_path / "jai-drain.123", pid=42)
    assert not state.draining()  # no folder at all: not draining
    state.folder.mkdir()
    (state.folder / "draining").touch()
    assert state.draining()
    (state.folder / "draining").unlink()
    assert not state.draining()


def test_active_counts_are_written_whole_and_only_when_they_change(tmp_path, monkeypatch):
    state = DrainState(tmp_path / "jai-drain.7", pid=99)
    state.record_active(3)
    assert (state.folder / "active.99").read_text() == "3\n"
    assert [p.name for p in state.folder.iterdir()] == ["active.99"]  # the scratch file was renamed away
    writes = []
    monkeypatch.setattr(os, "replace", lambda *a: writes.append(a))
    state.record_active(3)
    assert writes == []  # unchanged: no write at all
    monkeypatch.undo()
    state.record_active(0)
    assert (state.folder / "active.99").read_text() == "0\n"


def test_an_unwritable_folder_is_logged_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    state = DrainState(blocker / "jai-drain.1", pid=5)
    with caplog.at_level(logging.WARNING):
        state.record_active(2)
    assert state.recorded is None and "cannot record active requests" in caplog.text


def test_the_folder_is_named_after_the_frontend_pid_in_tmpdir():
    assert drain_folder(4321, {"TMPDIR": "/srv/t"}) == Path("/srv/t/jai-drain.4321")
    assert drain_folder(4321, {}) == Path("/tmp/jai-drain.4321")  # serve.sh: ${TMPDIR:-/tmp}


def test_a_worker_finds_its_frontends_folder_and_a_test_process_finds_none(tmp_path):
    assert DrainState.for_worker() is None  # pytest's parent is no TorchServe frontend
    # a parent whose command line names TorchServe's frontend class, as the Java frontend's does
    child = (
        "import sys; sys.path.insert(0, sys.argv[1]); from jaiserve.drain import DrainState; "
        "state = DrainState.for_worker(); print(state.folder if state else None)"
    )
    parent = (
        "import subprocess, sys; "
        "print(subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], capture_output=True, text=True,"
        " check=True).stdout.strip(), __import__('os').getpid())"
    )
    handler_dir = str(Path(jai_handler.__file__).parent)
    out = subprocess.run([sys.executable, "-c", parent, child, handler_dir, FRONTEND_CLASS],
                         env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=60)
    folder, parent_pid = out.stdout.split()
    assert folder == str(tmp_path / f"jai-drain.{parent_pid}"), out.stderr


# ----- the handler with a fake TorchServe context -----

YAML = {  # one engine step per handle() call (step_budget_ms 0), so a call leaves requests running
    "batchSize": 4,
    "handler": {"n_head": 2, "threads": 1, "step_budget_ms": 0, "defaults": {"max_tokens": 6, "temperature": 0}},
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def draining_handler(model_dir, folder, continuous):
    context = Context("jai", str(model_dir), {}, 4, None, "0.12.0",
                      model_yaml_config={**YAML, "continuousBatching": continuous})
    handler = jai_handler.JAIHandler()
    handler.initialize(context)
    assert handler.drain is None  # not a TorchServe worker: drain support stays off...
    handler.drain = DrainState(folder, pid=1000)  # ...so the test gives it a folder of its own
    return handler, context


def call(handler, context, batch):
    """One handle() call over [(request_id, body or None for a running request)]: {id: (status, body, done)}."""
    context.request_ids = {i: rid for i, (rid, _) in enumerate(batch)}
    context.request_processor = [RequestProcessor({}) for _ in batch]
    context.stopping_criteria = None
    responses = handler.handle([{"body": body} if body is not None else {} for _, body in batch], context)
    return {
        rid: (context.get_response_status(i)[0], responses[i],
              context.stopping_criteria[i](responses[i]) if context.stopping_criteria else None)
        for i, (rid, _) in enumerate(batch)
    }


def active(folder):
    return int((folder / "active.1000").read_text())


def test_continuous_batching_refuses_new_requests_while_running_ones_finish(model_dir, tmp_path):
    folder = tmp_path / "jai-drain.1"
    handler, context = draining_handler(model_dir, folder, continuous=True)
    replies = call(handler, context, [("old", {"prompt": "서울 채용", "max_tokens": 6})])
    assert replies["old"][0] == 200 and replies["old"][2] is False and active(folder) == 1
    (folder / "draining").touch()
    assert json.loads(handler.describe_handle())["draining"] is True
    replies = call(handler, context, [("old", None), ("new", {"prompt": "부산", "max_tokens": 3})])
    status, body, done = replies["new"]
    assert status == 503 and done is None  # a complete response, not the start of a stream
    assert json.loads(body) == {"code": 503, "type": "Draining", "message": DRAINING}
    assert context.get_response_status(1)[1] == "Service Unavailable"
    steps = 2
    while replies["old"][2] is False:  # the admitted request runs to its end
        replies = call(handler, context, [("old", None)])
        steps += 1
    status, body, _ = replies["old"]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 6 == steps
    assert active(folder) == 0
    (folder / "draining").unlink()  # a server that stops draining admits again
    assert call(handler, context, [("later", {"prompt": "판교", "max_tokens": 1})])["later"][0] == 200


def test_the_default_batcher_refuses_a_batch_that_arrives_while_draining(model_dir, tmp_path):
    folder = tmp_path / "jai-drain.2"
    handler, context = draining_handler(model_dir, folder, continuous=False)
    replies = call(handler, context, [("a", {"prompt": "대전", "max_tokens": 4})])
    assert replies["a"][0] == 200 and json.loads(replies["a"][1])["usage"]["completion_tokens"] == 4
    assert active(folder) == 0  # counted up at admission, back down when it finished
    folder.joinpath("draining").touch()
    replies = call(handler, context, [("b", {"prompt": "제주", "max_tokens": 4}), ("c", {"prompt": "x"})])
    assert {rid: (status, json.loads(body)["type"]) for rid, (status, body, _) in replies.items()} == {
        "b": (503, "Draining"), "c": (503, "Draining")}
    assert handler.running == {} and active(folder) == 0
