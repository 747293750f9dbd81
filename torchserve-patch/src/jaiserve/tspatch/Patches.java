package jaiserve.tspatch;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.URL;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import javassist.CannotCompileException;
import javassist.ClassPool;
import javassist.CtBehavior;
import javassist.CtClass;
import javassist.CtConstructor;
import javassist.CtField;
import javassist.CtMethod;
import javassist.CtNewMethod;
import javassist.LoaderClassPath;
import javassist.NotFoundException;
import javassist.bytecode.CodeAttribute;
import javassist.bytecode.LocalVariableAttribute;
import javassist.expr.ExprEditor;
import javassist.expr.MethodCall;

/**
 * The seven fixes (see Agent's header), each checked against the class file before it is applied:
 * methods are found by name and descriptor, call sites by owner, name, descriptor, count and order.
 * Nothing here loads a TorchServe class: Javassist reads the class files through the class loader's
 * resources and compiles the inserted code against them, so a renamed method or field also refuses.
 */
final class Patches {
    static final String MODEL = "org.pytorch.serve.wlm.Model";
    static final String BATCHER = "org.pytorch.serve.wlm.ContinuousBatching";
    static final String ENCODER = "org.pytorch.serve.util.codec.ModelRequestEncoder";
    /** The `message` JAI's handler passes to send_intermediate_predict_response (handler/jai_handler.py). */
    static final String INTERMEDIATE = "Intermediate";

    static final String FIX_DESCRIBE = "a describe job is answered once, not re-queued"
            + " (Model.pollInferJob(Map,int,LinkedBlockingDeque))";
    static final String FIX_LOCK = "a worker with running requests skips admission instead of waiting"
            + " for the queue lock (Model.pollInferJob(Map,int))";
    static final String FIX_INTERMEDIATE = "\"" + INTERMEDIATE + "\" messages are streamed and the worker"
            + " keeps reading (ContinuousBatching.sendResponse)";
    static final String FIX_DESCRIBE_JOINS = "a describe job met while filling a batch joins it instead of"
            + " waiting at the head of the queue for the batch to end, and the batch stays a prediction"
            + " (Model.pollInferJob(Map,int,LinkedBlockingDeque), ContinuousBatching.getRequest)";
    static final String FIX_HEADERS = "a request the worker already runs is re-sent without its HTTP headers"
            + " (ModelRequestEncoder.encodeRequest)";

    static final String FIX_HUNG_UP = "a batch that clients emptied by hanging up is sent to the worker once"
            + " more, empty, so that the handler frees their requests now, not when new traffic comes"
            + " (ContinuousBatching.sendResponse, getRequest)";
    static final String FIX_WORKER_DIED = "when a worker dies, a response it had begun ends with an error in"
            + " its own format, and a request it had not answered yet waits for the replacement worker"
            + " (ContinuousBatching.sendError)";

    private static final String DEQUE = "java.util.concurrent.LinkedBlockingDeque";
    private static final String LOCK = "java.util.concurrent.locks.ReentrantLock";
    private static final String MAP = "java.util.Map";
    private static final String JOB = "org.pytorch.serve.job.Job";
    private static final String POLL_BATCH = "(Ljava/util/Map;ILjava/util/concurrent/LinkedBlockingDeque;)V";
    private static final String POLL_ADMIT = "(Ljava/util/Map;I)V";
    private static final String SEND_RESPONSE = "(Lorg/pytorch/serve/util/messages/ModelWorkerResponse;)Z";
    private static final String GET_REQUEST = "(Ljava/lang/String;Lorg/pytorch/serve/wlm/WorkerState;)"
            + "Lorg/pytorch/serve/util/messages/BaseModelRequest;";
    private static final String INFERENCE_REQUEST = "org.pytorch.serve.util.messages.ModelInferenceRequest";
    private static final String COMMANDS = "org.pytorch.serve.util.messages.WorkerCommands";
    private static final String INPUT = "org.pytorch.serve.util.messages.RequestInput";
    private static final String ENCODE_REQUEST = "(L" + INPUT.replace('.', '/') + ";Lio/netty/buffer/ByteBuf;)V";
    private static final String RESPONSE = "([BLjava/lang/CharSequence;ILjava/lang/String;Ljava/util/Map;)V";
    private static final String HELPER = "jaiAnswerIntermediate";
    private static final String HUNG_UP = "jaiClientLeft";  // fix 6's field: a client left since the last call
    private static final String BEGUN = "jaiBegun";  // fix 7's field: job id -> content type, once answered

    private Patches() {}

    /** Called by Agent.premain through reflection. Throws Refusal listing every mismatch found. */
    public static List<Patched> prepare(ClassLoader loader) throws Refusal {
        ClassPool pool = new ClassPool(false);
        pool.appendClassPath(new LoaderClassPath(loader));
        List<String> problems = new ArrayList<>();
        List<String> modelFixes = Arrays.asList(FIX_DESCRIBE, FIX_LOCK);
        List<String> batcherFixes = Arrays.asList(FIX_INTERMEDIATE, FIX_DESCRIBE_JOINS, FIX_HUNG_UP, FIX_WORKER_DIED);
        List<String> encoderFixes = Arrays.asList(FIX_HEADERS);
        // Model loads first (a ContinuousBatching needs one), and premain refuses unless every fix is
        // ready: the line Model logs names them all
        List<String> all = new ArrayList<>(modelFixes);
        all.addAll(batcherFixes);
        all.addAll(encoderFixes);
        Patched model = patch(pool, problems, MODEL, modelFixes,
                Patches::placeDescribeJobs, Patches::skipAdmissionWhenLockTaken, m -> logWhenLoaded(m, all));
        Patched batcher = patch(pool, problems, BATCHER, batcherFixes,
                Patches::answerIntermediateMessages, Patches::keepPredictingWithADescribe, Patches::freeHungUpClients,
                Patches::endResponsesOfADeadWorker);
        Patched encoder = patch(pool, problems, ENCODER, encoderFixes, Patches::noHeadersForCachedRequests);
        List<Patched> keys = KeyPatches.prepare(pool, problems);  // token authorization (KeyPatches)
        if (!problems.isEmpty()) {
            throw new Refusal(String.join("; ", problems));
        }
        List<Patched> patched = new ArrayList<>(Arrays.asList(model, batcher, encoder));
        patched.addAll(keys);
        return patched;
    }

    /**
     * One class's edits, in order, on its class file as read from the class path. Every edit runs (so
     * one refusal line names every mismatch); null when any of them was refused.
     */
    static Patched patch(ClassPool pool, List<String> problems, String className, List<String> fixes,
            Edit... edits) {
        try {
            byte[] original = classFile(pool, className);
            CtClass cls = pool.makeClass(new ByteArrayInputStream(original));
            int before = problems.size();
            for (Edit edit : edits) {
                attempt(problems, edit, cls);
            }
            return problems.size() > before ? null : new Patched(className, original, cls.toBytecode(), fixes);
        } catch (Refusal e) {
            problems.add(e.getMessage());
        } catch (IOException | CannotCompileException | RuntimeException e) {
            problems.add(className + ": " + e);
        }
        return null;
    }

    /**
     * Fix 5: under continuous batching TorchServe sends every running request again at every handle()
     * call, marked cached in the backend and without its body, but with all its HTTP headers, which the
     * Python worker reads with four socket reads each (64 streams: half of the handler thread's CPU).
     * The handler reads headers only when a request arrives, so a cached request's are left out: the
     * header loop of encodeRequest sees an empty map. The frame keeps its shape (an empty header list).
     */
    private static void noHeadersForCachedRequests(CtClass encoder) throws Refusal, CannotCompileException {
        CtMethod encode = declared(encoder, "encodeRequest", ENCODE_REQUEST);
        expectCalls(encode, INPUT, "getHeaders", "()Ljava/util/Map;", 1);
        expectCalls(encode, INPUT, "isCachedInBackend", "()Z", 1);
        replaceCall(encode, INPUT, "getHeaders", "()Ljava/util/Map;", 0,
                "{ $_ = $0.isCachedInBackend() ? java.util.Collections.EMPTY_MAP : $proceed($$); }");
    }

    /**
     * Fixes 1 and 4 (queue side), the two `jobsQueue.addFirst(j)` calls of pollInferJob:
     * - the first (first-job branch: the describe is already in jobsRepo) becomes a no-op: leaving it
     *   there and returning sends it alone, once (fix 1);
     * - the second (a describe met while filling a batch, which 0.12.0 puts back at the head of the queue
     *   and ends the batch with) puts the describe into the batch instead (fix 4). Under continuous
     *   batching the batch never empties while requests stream, so the describe used to wait for every
     *   running request and, at the head of the queue, held back every request behind it. JAI's handler
     *   answers a describe at any index of a batch (handler/jai_handler.py). The default batcher does not
     *   call this method (it uses Model.pollBatch): its describe is still sent alone.
     */
    private static void placeDescribeJobs(CtClass model) throws Refusal, CannotCompileException {
        CtMethod poll = declared(model, "pollInferJob", POLL_BATCH);
        expectCalls(poll, DEQUE, "addFirst", "(Ljava/lang/Object;)V", 2);
        expectParameter(poll, 1, "jobsRepo", "Ljava/util/Map;");  // named by the replacement
        // the second first: replacing it leaves the first call's index as it is
        replaceCall(poll, DEQUE, "addFirst", "(Ljava/lang/Object;)V", 1,
                "{ jobsRepo.put(((" + JOB + ") $1).getJobId(), $1); }");
        replaceCall(poll, DEQUE, "addFirst", "(Ljava/lang/Object;)V", 0, "{ }");
    }

    /**
     * Fix 4, batch side: ContinuousBatching.getRequest gives the batch the command of its last job, so a
     * describe joining running requests would make the whole batch a DESCRIBE (for the worker thread:
     * no failure on a reply timeout). A describe sets the command only when it is the batch's one job.
     */
    private static void keepPredictingWithADescribe(CtClass batcher) throws Refusal, CannotCompileException {
        CtMethod get = declared(batcher, "getRequest", GET_REQUEST);
        String setCommand = "(L" + COMMANDS.replace('.', '/') + ";)V";
        expectCalls(get, INFERENCE_REQUEST, "setCommand", setCommand, 1);
        replaceCall(get, INFERENCE_REQUEST, "setCommand", setCommand, 0,
                "{ if ($1 != " + COMMANDS + ".DESCRIBE || jobs.size() == 1) { $0.setCommand($1); } }");
    }

    /**
     * Fix 2: `lock.lockInterruptibly()` becomes "wait for the lock only with an empty batch". Returning
     * from inside the try skips its finally, which only unlocks a held lock: here it is not held.
     */
    private static void skipAdmissionWhenLockTaken(CtClass model) throws Refusal, CannotCompileException {
        CtMethod admit = declared(model, "pollInferJob", POLL_ADMIT);
        expectCalls(admit, LOCK, "lockInterruptibly", "()V", 1);
        expectCalls(admit, MODEL, "pollInferJob", POLL_BATCH, 1);
        // the replacement names the enclosing method's parameter: it needs the local variable table
        expectParameter(admit, 1, "jobsRepo", "Ljava/util/Map;");
        replaceCall(admit, LOCK, "lockInterruptibly", "()V", 0,
                "{ if (jobsRepo.isEmpty()) { $0.lockInterruptibly(); } else if (!$0.tryLock()) { return; } }");
    }

    /**
     * Fix 3: an intermediate message answers each prediction whose job is in the batch (skipping ids no
     * longer there; honouring the client's expiry like the original) and returns false: the worker
     * thread goes on reading this handle() call's replies. No job leaves the batch here: the final
     * message, handled by the original code, removes finished and disconnected ones. That code throws on
     * a prediction whose job is not in the batch (the worker thread then ends and TorchServe restarts the
     * worker); it is left so: the batch cannot change between a call's request and its final message,
     * so only a handler answering for a request it was not given reaches it, and that bug should be loud.
     */
    private static void answerIntermediateMessages(CtClass batcher) throws Refusal, CannotCompileException {
        CtMethod send = declared(batcher, "sendResponse", SEND_RESPONSE);
        // the original as read from 0.12.0: one Job.response call, two removals from the batch
        expectCalls(send, JOB, "response", RESPONSE, 1);
        expectCalls(send, MAP, "remove", "(Ljava/lang/Object;)Ljava/lang/Object;", 2);
        for (CtMethod m : batcher.getDeclaredMethods()) {
            if (m.getName().equals(HELPER)) {
                throw new Refusal(BATCHER + " already declares " + HELPER + ": patched twice?");
            }
        }
        batcher.addMethod(CtNewMethod.make(
                "private boolean " + HELPER + "(org.pytorch.serve.util.messages.ModelWorkerResponse message) {"
                + "  java.util.Iterator predictions = message.getPredictions().iterator();"
                + "  while (predictions.hasNext()) {"
                + "    org.pytorch.serve.util.messages.Predictions prediction ="
                + "        (org.pytorch.serve.util.messages.Predictions) predictions.next();"
                + "    org.pytorch.serve.job.Job job = (org.pytorch.serve.job.Job) jobs.get(prediction.getRequestId());"
                + "    if (job != null) {"
                + "      if (job.getPayload().getClientExpireTS() > System.currentTimeMillis()) {"
                + "        job.response(prediction.getResp(), prediction.getContentType(), prediction.getStatusCode(),"
                + "            prediction.getReasonPhrase(), prediction.getHeaders());"
                + "      } else {"
                + "        logger.warn(\"Drop response for inference request {} due to client timeout\","
                + "            job.getPayload().getRequestId());"
                + "      }"
                + "    }"
                + "  }"
                + "  return false;"
                + "}",
                batcher));
        send.insertBefore("if ($1.getCode() == 200 && \"" + INTERMEDIATE + "\".equals($1.getMessage())) {"
                + " return " + HELPER + "($1); }");
    }

    /**
     * Fix 6: sendResponse drops a running job whose client closed its connection (`!job.isOpen()`, the
     * second `jobs.remove`), and the handler learns of it only from the next call, where the request is
     * missing. When that leaves the batch empty, 0.12.0 sends no next call: getRequest waits in the
     * queue for new traffic and the worker's engine keeps the hung-up requests (with 2 workers, the last
     * hung-up request of each). Now getRequest, with the batch emptied that way, sends one empty batch:
     * the handler aborts every request it holds (handler/jai_handler.py) and answers an empty list.
     */
    private static void freeHungUpClients(CtClass batcher) throws Refusal, CannotCompileException {
        CtMethod send = declared(batcher, "sendResponse", SEND_RESPONSE);
        expectCalls(send, JOB, "isOpen", "()Z", 1);
        expectCalls(send, MAP, "remove", "(Ljava/lang/Object;)Ljava/lang/Object;", 2);
        CtMethod get = declared(batcher, "getRequest", GET_REQUEST);
        declared(other(batcher, MODEL), "getModelName", "()Ljava/lang/String;");  // named by the empty batch
        batcher.addField(CtField.make("private boolean " + HUNG_UP + ";", batcher));
        // the second removal is the closed connection's (the first: a request the handler finished)
        replaceCall(send, MAP, "remove", "(Ljava/lang/Object;)Ljava/lang/Object;", 1,
                "{ $_ = $proceed($$); " + HUNG_UP + " = true; }");
        get.insertBefore("if (" + HUNG_UP + ") { " + HUNG_UP + " = false; if (jobs.isEmpty()) {"
                + " return new " + INFERENCE_REQUEST + "(model.getModelName()); } }");
    }

    /**
     * Fix 7: when the worker process dies, WorkerThread (finally) calls aggregator.sendError(req, "Worker
     * died.", status), and BatchAggregator.sendError answers every job of the batch with a full HTTP
     * error response, written into the middle of responses already streaming: the client sees a broken
     * chunked transfer. ContinuousBatching gets its own sendError: a response that has begun ends with a
     * last chunk in its own format (WorkerLoss.lastChunk, by the content type of its first chunk); a job
     * the client has seen nothing of goes back to the head of the queue for another worker or the
     * replacement, at most once per worker of the model (WorkerLoss.requeue; then it fails as before).
     * Which jobs have begun: every Job.response call of this class records the job id and content type
     * (the intermediate messages' helper of fix 3 included). The jobs of a thread interrupted inside
     * getRequest (which 0.12.0 drops unanswered) get the same treatment.
     */
    private static void endResponsesOfADeadWorker(CtClass batcher) throws Refusal, CannotCompileException {
        String sendError = "(Lorg/pytorch/serve/util/messages/BaseModelRequest;Ljava/lang/String;I)V";
        for (CtMethod m : batcher.getDeclaredMethods()) {
            if (m.getName().equals("sendError")) {
                throw new Refusal(BATCHER + " already declares sendError: patched twice, or not 0.12.0");
            }
        }
        declared(other(batcher, "org.pytorch.serve.wlm.BatchAggregator"), "sendError", sendError);  // overridden
        declared(other(batcher, MODEL), "addFirst", "(L" + JOB.replace('.', '/') + ";)V");  // the queue's head
        declared(other(batcher, MODEL), "getMinWorkers", "()I");  // how often a job may go back
        CtMethod send = declared(batcher, "sendResponse", SEND_RESPONSE);
        CtMethod helper = declared(batcher, HELPER, "(Lorg/pytorch/serve/util/messages/ModelWorkerResponse;)Z");
        CtMethod get = declared(batcher, "getRequest", GET_REQUEST);
        expectCalls(send, JOB, "response", RESPONSE, 1);
        expectCalls(helper, JOB, "response", RESPONSE, 1);
        batcher.addField(CtField.make("private java.util.Map " + BEGUN + " = new java.util.HashMap();", batcher));
        String record = "{ " + BEGUN + ".put($0.getJobId(), $2 == null ? \"\" : $2.toString()); $proceed($$); }";
        replaceCall(send, JOB, "response", RESPONSE, 0, record);
        replaceCall(helper, JOB, "response", RESPONSE, 0, record);
        get.insertBefore(BEGUN + ".keySet().retainAll(jobs.keySet());");  // finished jobs left the batch
        batcher.addMethod(CtNewMethod.make(
                "public void sendError(org.pytorch.serve.util.messages.BaseModelRequest message, String error,"
                + "    int status) {"
                + "  if (message instanceof org.pytorch.serve.util.messages.ModelLoadModelRequest) {"
                + "    super.sendError(message, error, status);"
                + "    return;"
                + "  }"
                + "  " + HUNG_UP + " = false;"
                + "  java.util.List batch = new java.util.ArrayList(jobs.values());"
                + "  for (int i = batch.size() - 1; i >= 0; i--) {"  // backwards: addFirst keeps their order
                + "    " + JOB + " job = (" + JOB + ") batch.get(i);"
                + "    String type = (String) " + BEGUN + ".get(job.getJobId());"
                + "    if (job.isControlCmd()) {"
                + "      job.sendError(status, error);"
                + "    } else if (type != null) {"
                + "      java.util.Map headers = new java.util.HashMap();"
                + "      headers.put(org.pytorch.serve.util.messages.RequestInput.TS_STREAM_NEXT, \"false\");"
                + "      String path = (String) job.getPayload().getHeaders().get(\"url_path\");"
                + "      job.response(jaiserve.tspatch.WorkerLoss.lastChunk(type, path), type, 200, null, headers);"
                + "      logger.warn(\"Worker died: ended the begun response of request {}\","
                + "          job.getPayload().getRequestId());"
                + "    } else if (jaiserve.tspatch.WorkerLoss.requeue(job, model.getMinWorkers())) {"
                + "      job.getPayload().setCachedInBackend(false);"
                + "      model.addFirst(job);"
                + "      logger.warn(\"Worker died: request {} goes back to the queue\","
                + "          job.getPayload().getRequestId());"
                + "    } else {"
                + "      job.sendError(status, error);"
                + "    }"
                + "  }"
                + "  " + BEGUN + ".clear();"
                + "  cleanJobs();"
                + "}",
                batcher));
        // A worker thread interrupted while it polls (its worker died, or it is scaled down) leaves getRequest
        // with an exception and no request, so WorkerThread's finally skips sendError and only empties the
        // batch: the jobs it held were dropped unanswered (seen: a request a dead worker had just handed back,
        // polled by the other dying worker's thread in that millisecond). They get sendError's treatment.
        try {
            get.addCatch("{ sendError(null, \"Worker died.\", 500); throw $e; }",
                    batcher.getClassPool().get("java.lang.InterruptedException"));
        } catch (NotFoundException e) {
            throw new Refusal("java.lang.InterruptedException not found on the class path: " + e.getMessage());
        }
    }

    /** One line in logs/ts_log.log, through Model's own logger, when the JVM initializes Model. */
    private static void logWhenLoaded(CtClass model, List<String> fixes) throws CannotCompileException {
        CtConstructor init = model.getClassInitializer();
        if (init == null) {
            init = model.makeClassInitializer();
        }
        String line = Agent.NAME + ": " + fixes.size() + " fixes to TorchServe's continuous batcher: "
                + String.join("; ", fixes);
        init.insertAfter("org.slf4j.LoggerFactory.getLogger(\"" + MODEL + "\").info(\""
                + line.replace("\\", "\\\\").replace("\"", "\\\"") + "\");");
    }

    // ----- checks -----

    static CtMethod declared(CtClass cls, String name, String descriptor) throws Refusal {
        for (CtMethod m : cls.getDeclaredMethods()) {
            if (m.getName().equals(name) && m.getSignature().equals(descriptor)) {
                return m;
            }
        }
        throw new Refusal("expected method " + cls.getName() + "." + name + descriptor + ", not found");
    }

    /** Another class, read from the class path beside ``cls`` (not loaded). */
    private static CtClass other(CtClass cls, String className) throws Refusal {
        try {
            return cls.getClassPool().get(className);
        } catch (javassist.NotFoundException e) {
            throw new Refusal("expected class " + className + " on the class path, not found");
        }
    }

    static void expectCalls(CtBehavior in, String owner, String name, String descriptor, int count)
            throws Refusal, CannotCompileException {
        List<Integer> lines = new ArrayList<>();
        in.instrument(new ExprEditor() {
            @Override
            public void edit(MethodCall call) {
                if (matches(call, owner, name, descriptor)) {
                    lines.add(call.getLineNumber());
                }
            }
        });
        if (lines.size() != count) {
            throw new Refusal("expected " + count + " call(s) to " + shortName(owner) + "." + name
                    + " in " + describe(in) + ", found " + lines.size());
        }
    }

    static void expectParameter(CtMethod m, int slot, String name, String descriptor) throws Refusal {
        CodeAttribute code = m.getMethodInfo().getCodeAttribute();
        LocalVariableAttribute table = code == null ? null
                : (LocalVariableAttribute) code.getAttribute(LocalVariableAttribute.tag);
        if (table != null) {
            for (int i = 0; i < table.tableLength(); i++) {
                if (table.index(i) == slot && table.startPc(i) == 0) {
                    if (table.variableName(i).equals(name) && table.descriptor(i).equals(descriptor)) {
                        return;
                    }
                    throw new Refusal("expected parameter " + name + " " + descriptor + " in " + describe(m)
                            + ", found " + table.variableName(i) + " " + table.descriptor(i));
                }
            }
        }
        throw new Refusal("expected a local variable table naming parameter " + name + " in " + describe(m)
                + " (classes compiled with debug information), found none");
    }

    // ----- edits -----

    static void replaceCall(CtBehavior in, String owner, String name, String descriptor, int index,
            String source) throws CannotCompileException {
        in.instrument(new ExprEditor() {
            private int seen;

            @Override
            public void edit(MethodCall call) throws CannotCompileException {
                if (matches(call, owner, name, descriptor) && seen++ == index) {
                    call.replace(source);
                }
            }
        });
    }

    // ----- helpers -----

    /** A rewrite of one class: checks its call sites, then edits them (or throws Refusal). */
    interface Edit {
        void apply(CtClass cls) throws Refusal, CannotCompileException;
    }

    /** Runs one edit; a mismatch is recorded and the other edits are still checked (one line names all). */
    private static void attempt(List<String> problems, Edit edit, CtClass cls) {
        try {
            edit.apply(cls);
        } catch (Refusal e) {
            problems.add(e.getMessage());
        } catch (CannotCompileException | RuntimeException e) {
            problems.add(e.toString());
        }
    }

    private static boolean matches(MethodCall call, String owner, String name, String descriptor) {
        return call.getClassName().equals(owner) && call.getMethodName().equals(name)
                && call.getSignature().equals(descriptor);
    }

    /** The class file as the class path holds it, read as a resource: the class itself is not loaded. */
    private static byte[] classFile(ClassPool pool, String className) throws Refusal, IOException {
        URL url = pool.find(className);
        if (url == null) {
            throw new Refusal("expected class " + className + " on the class path, not found");
        }
        try (InputStream in = url.openStream()) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            byte[] buffer = new byte[16384];
            for (int n; (n = in.read(buffer)) > 0; ) {
                out.write(buffer, 0, n);
            }
            return out.toByteArray();
        }
    }

    private static String describe(CtBehavior b) {
        return b.getDeclaringClass().getName() + "." + b.getName() + b.getSignature();
    }

    private static String shortName(String className) {
        return className.substring(className.lastIndexOf('.') + 1);
    }
}
