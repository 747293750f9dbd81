"""The TorchServe patch agent (torchserve-patch/) without a server: it accepts TorchServe 0.12.0's own
classes and applies its fixes (seven to the continuous batcher, three to token authorization); the third fix's
and seventh's behaviour on TorchServe's real ContinuousBatching and
the fifth's on its real ModelRequestEncoder, each next to the unpatched behaviour; a JVM whose classes
are not the expected ones refuses to start with one clear line; serve.sh checks the jar first.
tests/test_torchserve_patch_e2e.py shows the fixes through a real torchserve."""

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import ts

from ts_launcher import ROOT, absolute_javaagent

PATCH = ROOT / "torchserve-patch"
FRONTEND = Path(ts.__file__).parent / "frontend"  # model-server.jar and its dependencies
NAME = "jai-torchserve-patch"
# Check and the probe initialize TorchServe classes, whose log4j2.xml would write a logs/ folder: log to stderr
QUIET_LOG4J = "-Dlog4j2.loggerContextFactory=org.apache.logging.log4j.simple.SimpleLoggerContextFactory"


@pytest.fixture(scope="session")
def agent_jar():
    """The jar `make setup` builds (build.sh does nothing when it is up to date)."""
    subprocess.run([str(PATCH / "build.sh")], check=True, capture_output=True, text=True, timeout=300)
    return PATCH / "build" / "jai-torchserve-patch.jar"


def java(*args, cwd):
    return subprocess.run(["java", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def javac(*args):
    subprocess.run(["javac", *map(str, args)], check=True, capture_output=True, text=True, timeout=300)


def test_the_agent_applies_its_ten_fixes_to_torchserves_own_classes(agent_jar, tmp_path):
    result = java(f"-javaagent:{agent_jar}", "-cp", f"{FRONTEND}/*:{agent_jar}", "jaiserve.tspatch.Check",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == ["patched org.pytorch.serve.wlm.Model", "patched org.pytorch.serve.wlm.ContinuousBatching",
                         "patched org.pytorch.serve.util.codec.ModelRequestEncoder",
                         "patched org.pytorch.serve.util.TokenAuthorization",
                         "patched org.pytorch.serve.http.TokenAuthorizationHandler"]
    assert len([line for line in lines if line.startswith("  fix: ")]) == 10
    assert lines[-1] == f"{NAME} check: OK, 10 fixes applied"
    assert f"{NAME}: TorchServe classes checked; 10 fixes will apply as they load" in result.stderr
    # the line Model's class initializer logs (into logs/ts_log.log under torchserve)
    assert re.search(rf"^INFO Model {NAME}: 7 fixes to TorchServe's continuous batcher: a describe job .*; "
                     r"a worker with running requests .*; \"Intermediate\" messages .*; "
                     r"a describe job met while filling a batch joins it .*; "
                     r"a batch that clients emptied by hanging up is sent to the worker once more, empty, .*; "
                     r"when a worker dies, a response it had begun ends with an error in its own format, .*; "
                     r"a request the worker already runs is re-sent without its HTTP headers .*$", result.stderr, re.M)
    # and TokenAuthorization's (torchserve-patch/src/jaiserve/tspatch/KeyPatches.java)
    assert re.search(rf"^INFO TokenAuthorization {NAME}: 3 fixes to TorchServe's token authorization: the keys in "
                     r"key_file.json are read back .*; keys never expire unless .*; a missing or wrong key is 401 .*$",
                     result.stderr, re.M)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_jar_bundles_javassist_with_its_notice_and_names_its_premain(agent_jar):
    with zipfile.ZipFile(agent_jar) as jar:
        names = set(jar.namelist())
        manifest = jar.read("META-INF/MANIFEST.MF").decode()
        notice = jar.read("META-INF/javassist/copyright").decode()
    assert {"javassist/ClassPool.class", "jaiserve/tspatch/Agent.class"} <= names
    assert "Premain-Class: jaiserve.tspatch.Agent" in manifest
    assert "Javassist" in notice and "LGPL" in notice


def test_config_properties_loads_the_jar_that_setup_builds(agent_jar):
    config = (ROOT / "config.properties").read_text()
    [vmargs] = re.findall(r"^vmargs=(.*)$", config, re.M)
    [agent] = [arg for arg in vmargs.split() if arg.startswith("-javaagent:")]
    assert ROOT / agent.removeprefix("-javaagent:") == agent_jar  # relative to the repo root
    [moved] = re.findall(r"^vmargs=(.*)$", absolute_javaagent(config), re.M)  # for a scratch folder
    assert moved.split() == [f"-javaagent:{agent_jar}" if arg == agent else arg for arg in vmargs.split()]


# ----- fix 3 on TorchServe's real ContinuousBatching.sendResponse -----


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """tests/java/*Probe.java compiled against the installed TorchServe."""
    classes = tmp_path_factory.mktemp("probe")
    javac("-cp", f"{FRONTEND}/*", "-d", classes, *(ROOT / "tests" / "java").glob("*Probe.java"))
    return classes


def run_probe(probe, tmp_path, *agent, name="SendResponseProbe"):
    # model_server_home: where TorchServe's ConfigManager finds ts/version.txt (WorkerDeathProbe builds a Model)
    home = f"-Dmodel_server_home={Path(ts.__file__).parent.parent}"
    result = java(QUIET_LOG4J, home, *agent, "-cp", f"{probe}:{FRONTEND}/*", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_intermediate_messages_are_streamed_while_the_worker_keeps_reading(agent_jar, probe, tmp_path):
    assert run_probe(probe, tmp_path, f"-javaagent:{agent_jar}") == [
        # streamed to the jobs of the batch (not to an expired client, nor to an id not in the batch);
        # false: the worker thread reads this handle() call's next message instead of sending a new request
        "intermediate 1: returned false; batch [a, b, late]; a got [a1]; b got [b1]; late got []",
        "intermediate 2: returned false; batch [a, b, late]; a got [a1, a2]; b got [b1]; late got []",
        # the final message goes through TorchServe's own code: finished jobs leave, b continues
        "final: returned true; batch [b]; a got [a1, a2, a3]; b got [b1, b3]; late got []",
        "b cached in backend: true",
        "failure: returned true; batch []; a got [a1, a2, a3]; b got [b1, b3, error 503]; late got []",
    ]


def test_unpatched_torchserve_ends_the_step_at_the_first_intermediate_message(probe, tmp_path):
    lines = run_probe(probe, tmp_path)
    # true: the worker thread sends the next request while the handler is still in handle()
    assert lines[0].startswith("intermediate 1: returned true;")
    assert lines[1].startswith("intermediate 2: threw IllegalStateException;")  # an id not in the batch


# ----- fix 5 on TorchServe's real ModelRequestEncoder -----

ARRIVING = "arriving: headers [url_path=v1/completions content-type=application/json] parameters [body]"


def test_a_running_request_is_re_sent_without_its_headers(agent_jar, probe, tmp_path):
    # the frame keeps its shape (an empty header list), so TorchServe's Python worker reads it as before
    assert run_probe(probe, tmp_path, f"-javaagent:{agent_jar}", name="EncoderProbe") == [
        "command I", ARRIVING, "running: headers [] parameters []", "bytes left 0"]


def test_unpatched_torchserve_re_sends_every_header_of_a_running_request(probe, tmp_path):
    assert run_probe(probe, tmp_path, name="EncoderProbe") == [
        "command I", ARRIVING,
        "running: headers [url_path=v1/completions content-type=application/json] parameters []", "bytes left 0"]


# ----- fix 7 on TorchServe's real ContinuousBatching.sendError -----


def test_a_dead_workers_requests_go_back_once_per_worker_and_an_interrupted_poll_drops_none(agent_jar, probe, tmp_path):
    # workers killed together: the request can reach a second dead worker before its death is noticed
    assert run_probe(probe, tmp_path, f"-javaagent:{agent_jar}", name="WorkerDeathProbe") == [
        "2 workers, death 1: queue 1, batch 0, client got []",
        "2 workers, death 2: queue 1, batch 0, client got []",
        "2 workers, death 3: queue 0, batch 0, client got [error 500]",  # it reached every worker: it fails
        "1 workers, death 1: queue 1, batch 0, client got []",
        "1 workers, death 2: queue 0, batch 0, client got [error 500]",
        # a thread interrupted while polling: its begun stream ends with an error line, the request it had
        # just polled goes back to the queue
        "interrupted in getRequest: threw InterruptedException; queue [polled], batch []; "
        "streaming got [line {}, error line], polled got []",
    ]


def test_unpatched_torchserve_fails_at_the_first_death_and_drops_an_interrupted_polls_jobs(probe, tmp_path):
    assert run_probe(probe, tmp_path, name="WorkerDeathProbe") == [
        "2 workers, death 1: queue 0, batch 0, client got [error 500]",
        "1 workers, death 1: queue 0, batch 0, client got [error 500]",
        # WorkerThread's finally then empties the batch: the stream never ends, the request is never answered
        "interrupted in getRequest: threw InterruptedException; queue [], batch [polled, streaming]; "
        "streaming got [line {}], polled got []",
    ]


# ----- unexpected classes: the JVM refuses to start -----

HELLO = "public class Hello { public static void main(String[] a) { System.out.println(\"main ran\"); } }"

FAKE_MODEL = """package org.pytorch.serve.wlm;
import java.util.Map;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.locks.ReentrantLock;
public class Model {
    private final ReentrantLock lock = new ReentrantLock();
    public String getModelName() { return "jai"; }
    public void addFirst(org.pytorch.serve.job.Job job) { }
    public int getMinWorkers() { return 1; }
    public void pollInferJob(Map<String, Object> jobsRepo, int batchSize, LinkedBlockingDeque<Object> jobsQueue) {
        %s
    }
    public void pollInferJob(Map<String, Object> jobsRepo, int batchSize) throws InterruptedException {
        %s
    }
}"""
# the call sites 0.12.0 has: two addFirst in the first method; the lock, then the first method, in the second
AS_IN_0_12_0 = FAKE_MODEL % (
    "jobsQueue.addFirst(jobsRepo); jobsQueue.addFirst(jobsRepo);",
    "lock.lockInterruptibly(); try { pollInferJob(jobsRepo, batchSize, null); } finally { lock.unlock(); }",
)
FAKE_BATCHER = """package org.pytorch.serve.wlm;
public class ContinuousBatching {
    public boolean sendResponse(org.pytorch.serve.util.messages.ModelWorkerResponse message) { return true; }
}"""
FAKE_ENCODER = """package org.pytorch.serve.util.codec;
public class ModelRequestEncoder {
    private void encodeRequest(org.pytorch.serve.util.messages.RequestInput req, io.netty.buffer.ByteBuf out) { }
}"""
ENCODE = ("org.pytorch.serve.util.codec.ModelRequestEncoder.encodeRequest(Lorg/pytorch/serve/util/messages/"
          "RequestInput;Lio/netty/buffer/ByteBuf;)V")
GET_REQUEST = ("org.pytorch.serve.wlm.ContinuousBatching.getRequest(Ljava/lang/String;Lorg/pytorch/serve/wlm/"
               "WorkerState;)Lorg/pytorch/serve/util/messages/BaseModelRequest;")
MODEL_2 = "org.pytorch.serve.wlm.Model.pollInferJob(Ljava/util/Map;I)V"
MODEL_3 = "org.pytorch.serve.wlm.Model.pollInferJob(Ljava/util/Map;ILjava/util/concurrent/LinkedBlockingDeque;)V"
SEND = "org.pytorch.serve.wlm.ContinuousBatching.sendResponse(Lorg/pytorch/serve/util/messages/ModelWorkerResponse;)Z"

FAKE_TOKEN_HANDLER = """package org.pytorch.serve.http;
public class TokenAuthorizationHandler {
    public void handleRequest(io.netty.channel.ChannelHandlerContext ctx, io.netty.handler.codec.http.FullHttpRequest req,
            io.netty.handler.codec.http.QueryStringDecoder decoder, String[] segments) { }
}"""
HANDLE = ("org.pytorch.serve.http.TokenAuthorizationHandler.handleRequest(Lio/netty/channel/ChannelHandlerContext;"
          "Lio/netty/handler/codec/http/FullHttpRequest;Lio/netty/handler/codec/http/QueryStringDecoder;"
          "[Ljava/lang/String;)V")

UNEXPECTED = {
    "Model without the call sites": (
        "Model", FAKE_MODEL % ("", ""), [],
        f"expected 2 call(s) to LinkedBlockingDeque.addFirst in {MODEL_3}, found 0; "
        f"expected 1 call(s) to ReentrantLock.lockInterruptibly in {MODEL_2}, found 0",
    ),
    "Model without one method": (
        "Model", FAKE_MODEL.replace("int batchSize) throws", "long batchSize) throws") % ("", ""), [],
        f"expected 2 call(s) to LinkedBlockingDeque.addFirst in {MODEL_3}, found 0; "
        f"expected method {MODEL_2}, not found",
    ),
    "Model compiled without a local variable table": (
        "Model", AS_IN_0_12_0, ["-g:none"],
        f"expected a local variable table naming parameter jobsRepo in {MODEL_3} "
        "(classes compiled with debug information), found none; "
        f"expected a local variable table naming parameter jobsRepo in {MODEL_2} "
        "(classes compiled with debug information), found none",
    ),
    "ContinuousBatching without the call sites": (
        "ContinuousBatching", FAKE_BATCHER, [],
        f"expected 1 call(s) to Job.response in {SEND}, found 0; expected method {GET_REQUEST}, not found; "
        f"expected 1 call(s) to Job.isOpen in {SEND}, found 0; "
        f"expected method org.pytorch.serve.wlm.ContinuousBatching.jaiAnswerIntermediate(Lorg/pytorch/serve/util/"
        "messages/ModelWorkerResponse;)Z, not found",
    ),
    "TokenAuthorizationHandler without the key checks": (
        "TokenAuthorizationHandler", FAKE_TOKEN_HANDLER, [],
        f"expected 3 call(s) to TokenAuthorizationHandler.checkTokenAuthorization in {HANDLE}, found 0",
    ),
    "ModelRequestEncoder without the call sites": (
        "ModelRequestEncoder", FAKE_ENCODER, [],
        f"expected 1 call(s) to RequestInput.getHeaders in {ENCODE}, found 0",
    ),
}


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    classes = tmp_path_factory.mktemp("hello")
    (classes / "Hello.java").write_text(HELLO)
    javac("-d", classes, classes / "Hello.java")
    return classes


@pytest.mark.parametrize("case", UNEXPECTED)
def test_unexpected_torchserve_classes_stop_the_jvm_with_one_line(case, agent_jar, hello, tmp_path):
    class_name, source, flags, expected = UNEXPECTED[case]
    (tmp_path / f"{class_name}.java").write_text(source)
    fake = tmp_path / "fake"
    javac(*flags, "-cp", f"{FRONTEND}/*", "-d", fake, tmp_path / f"{class_name}.java")
    # the fake first on the class path, as TorchServe's "." entry would put a stray class first
    result = java(f"-javaagent:{agent_jar}", "-cp", f"{fake}:{hello}:{FRONTEND}/*", "Hello", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""  # main never ran: no class was loaded blind
    assert result.stderr.splitlines() == [
        f"{NAME}: refusing to start TorchServe: {expected} (this agent patches TorchServe 0.12.0's continuous "
        "batcher; see docs/batching.md)"
    ]


SECOND_LOADER = """import java.net.URL;
import java.net.URLClassLoader;
public class SecondLoader {
    public static void main(String[] args) throws Exception {
        // a loader of its own (no parent): it defines the Model class found under args[0]
        ClassLoader loader = new URLClassLoader(new URL[] {new java.io.File(args[0]).toURI().toURL()}, null);
        Class.forName("org.pytorch.serve.wlm.Model", false, loader);
        System.out.println("loaded");
    }
}"""


def test_a_model_class_other_than_the_checked_one_stops_the_jvm_when_it_loads(agent_jar, tmp_path):
    """premain checked TorchServe's Model; another class by that name, from elsewhere, must not run."""
    (tmp_path / "SecondLoader.java").write_text(SECOND_LOADER)
    (tmp_path / "Model.java").write_text(FAKE_MODEL % ("", ""))
    javac("-d", tmp_path / "main", tmp_path / "SecondLoader.java")
    javac("-cp", f"{FRONTEND}/*", "-d", tmp_path / "other", tmp_path / "Model.java")
    result = java(f"-javaagent:{agent_jar}", "-cp", f"{tmp_path / 'main'}:{FRONTEND}/*", "SecondLoader",
                  tmp_path / "other", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"{NAME}: refusing to run: org.pytorch.serve.wlm.Model loaded from file:{tmp_path / 'other'}/ differs "
        "from the class checked at start-up")


def test_the_0_12_0_call_sites_with_a_local_variable_table_are_accepted(agent_jar, hello, tmp_path):
    """The counterpart of the -g:none case: the same fake Model, compiled with debug information, passes."""
    (tmp_path / "Model.java").write_text(AS_IN_0_12_0)
    javac("-g", "-cp", f"{FRONTEND}/*", "-d", tmp_path / "fake", tmp_path / "Model.java")
    result = java(f"-javaagent:{agent_jar}", "-cp", f"{tmp_path / 'fake'}:{hello}:{FRONTEND}/*", "Hello",
                  cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "main ran\n", result.stderr


def test_serve_script_stops_before_starting_a_jvm_that_cannot_find_the_agent(tmp_path):
    """The repo's config.properties copied to a deployment folder names the jar relative to the repo."""
    shutil.copy(ROOT / "config.properties", tmp_path / "config.properties")
    (tmp_path / "model_store").mkdir()
    (tmp_path / "model_store" / "jai.mar").touch()
    result = subprocess.run([str(ROOT / "scripts" / "serve.sh"), "start"], capture_output=True, text=True,
                            env=dict(os.environ, JAI_DIR=str(tmp_path), TMPDIR=str(tmp_path)), timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"serve.sh: torchserve-patch/build/jai-torchserve-patch.jar (vmargs in {tmp_path}/config.properties) "
        f"is missing: run 'make setup' in {ROOT}\n")
    assert not (tmp_path / "logs.start.txt").exists()  # torchserve was not run
