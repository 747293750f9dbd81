/*
 * jai-torchserve-patch: a Java agent that fixes TorchServe 0.12.0's continuous batcher at class load.
 *
 * Why: TorchServe is archived (master and the last nightly carry the same code), and its continuous
 * batcher, which JAI's handler speaks, has four defects that no setting avoids (docs/batching.md):
 *   1. Model.pollInferJob(Map, int, LinkedBlockingDeque): a `GET /models/jai?customized=true` describe
 *      job taken as the first job of a batch is put into the batch AND back at the head of the queue, so
 *      it is answered forever and no inference request is admitted again. Fix: drop that first
 *      `jobsQueue.addFirst(j)`.
 *   2. Model.pollInferJob(Map, int): takes the model's queue lock unconditionally. An idle worker waits
 *      for new jobs while holding it, so a busy worker (which calls this before every step) stalls until
 *      new traffic arrives. Fix: when the caller's batch is not empty, tryLock() and skip admitting new
 *      jobs this step if the lock is taken; an empty batch still waits with lockInterruptibly().
 *   3. ContinuousBatching.sendResponse(ModelWorkerResponse): returns true ("the backend is done") after
 *      every message, so a handler that streams intermediate messages inside one handle() call
 *      (ts.handler_utils.utils.send_intermediate_predict_response) makes the frontend send the next
 *      request while the backend is still busy. Fix: a 200 message whose message text is exactly
 *      "Intermediate" (what JAI's handler sends) is answered chunk by chunk and returns false, so the
 *      worker thread keeps reading replies; jobs leave the batch only with the handler's final message,
 *      which (like every other message) goes through the original code unchanged.
 *   4. Model.pollInferJob(Map, int, LinkedBlockingDeque) again: a describe job met while filling a batch
 *      is put back at the head of the queue until the batch is empty, i.e. under continuous batching
 *      until every running request has ended, and the requests queued behind it wait as long. Fix: the
 *      second `jobsQueue.addFirst(j)` puts the describe into the batch (JAI's handler answers a describe
 *      at any index), and ContinuousBatching.getRequest lets a describe set the batch's command only
 *      when it is the batch's one job, so a mixed batch stays a prediction.
 * And one cost: 5. ModelRequestEncoder.encodeRequest re-sends every running request's HTTP headers at
 *      every continuous handle() call, which the Python worker parses field by field. Fix: a request
 *      cached in the backend (already running there) is encoded with an empty header list.
 * And two ends of a request: 6. ContinuousBatching drops a running job whose client hung up, and the
 *      handler learns of it only from the next call, where the request is missing; when that left the
 *      batch empty, no next call came until new traffic (the handler kept generating for nobody). Fix:
 *      such a batch is sent once more, empty. 7. When a worker process dies, BatchAggregator.sendError
 *      answered every job of its batch with a full HTTP error, written into the middle of responses
 *      already streaming (a broken chunked transfer). Fix: ContinuousBatching.sendError ends a begun
 *      response with a last chunk carrying the error in the response's own format (WorkerLoss), and puts
 *      a job the client has seen nothing of back at the head of the queue (at most once per worker);
 *      so are the jobs of a worker thread interrupted while it polls (0.12.0 dropped them unanswered).
 * Fixes 8-10 make TorchServe's token authorization behave like an OpenAI-compatible server's API key (kept
 *      across restarts, no expiry unless configured, 401 for a bad key): KeyPatches.java, docs/front-door.md.
 *
 * How: `vmargs=... -javaagent:torchserve-patch/build/jai-torchserve-patch.jar` in config.properties.
 * premain() reads the three class files from the class path WITHOUT loading them, checks that every method
 * and call site is exactly where TorchServe 0.12.0 has it (name, descriptor, call count and order), and
 * prepares the rewritten bytes with Javassist (bundled into the jar by build.sh). A transformer then hands
 * those bytes to the JVM when the classes load. Anything unexpected (another TorchServe build) prints ONE
 * line to stderr and stops the JVM with status 1: the deployment never runs continuous batching blind.
 * When Model loads, one line in logs/ts_log.log says the fixes are in place.
 *
 * Build: torchserve-patch/build.sh (`make setup` runs it). Check against an installed TorchServe:
 *   java -javaagent:torchserve-patch/build/jai-torchserve-patch.jar \
 *        -cp "$SITE_PACKAGES/ts/frontend/*:torchserve-patch/build/jai-torchserve-patch.jar" jaiserve.tspatch.Check
 *
 * This class must never let an exception escape (that aborts the JVM with a stack trace) and must not
 * name a Javassist class (a missing one would abort the JVM before the catch below could run): it reaches
 * Patches by reflection. log4j is not configured yet when premain runs, hence stderr here.
 */
package jaiserve.tspatch;

import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.lang.reflect.InvocationTargetException;
import java.security.ProtectionDomain;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

public final class Agent {
    static final String NAME = "jai-torchserve-patch";

    private static volatile List<Patched> prepared;
    private static final Set<String> applied = ConcurrentHashMap.newKeySet();

    private Agent() {}

    public static void premain(String args, Instrumentation inst) {
        try {
            prepared = prepare();
            inst.addTransformer(new Transformer(prepared));
            System.err.println(NAME + ": TorchServe classes checked; " + fixCount() + " fixes will apply as they load");
        } catch (Throwable failure) {
            refuse(failure);
        }
    }

    @SuppressWarnings("unchecked")
    private static List<Patched> prepare() throws Throwable {
        try {
            return (List<Patched>) Class.forName("jaiserve.tspatch.Patches")
                    .getDeclaredMethod("prepare", ClassLoader.class)
                    .invoke(null, ClassLoader.getSystemClassLoader());
        } catch (InvocationTargetException e) {
            throw e.getCause();
        }
    }

    /** One clear line, then exit: TorchServe must not start with its continuous batcher unpatched. */
    static void refuse(Throwable why) {
        String what = why instanceof Refusal ? why.getMessage() : why.toString();
        System.err.println(NAME + ": refusing to start TorchServe: " + what
                + " (this agent patches TorchServe 0.12.0's continuous batcher; see docs/batching.md)");
        System.err.flush();
        System.exit(1);
    }

    /** The prepared patches (null before premain ran), for Check. */
    static List<Patched> prepared() {
        return prepared;
    }

    /** Binary names of the classes the JVM has loaded with our bytes, for Check. */
    static Set<String> applied() {
        return Collections.unmodifiableSet(applied);
    }

    private static int fixCount() {
        int n = 0;
        for (Patched p : prepared) {
            n += p.fixes.size();
        }
        return n;
    }

    /** Hands out the prepared bytes, and only in place of exactly the class file that was checked. */
    private static final class Transformer implements ClassFileTransformer {
        private final Map<String, Patched> byInternalName = new HashMap<>();

        Transformer(List<Patched> patches) {
            for (Patched p : patches) {
                byInternalName.put(p.className.replace('.', '/'), p);
            }
        }

        @Override
        public byte[] transform(ClassLoader loader, String internalName, Class<?> redefined,
                ProtectionDomain domain, byte[] classFile) {
            Patched patch = internalName == null ? null : byInternalName.get(internalName);
            if (patch == null || redefined != null) {
                return null;
            }
            if (!Arrays.equals(classFile, patch.original)) {
                // Another copy of the class than the one checked at start-up (a second class path entry):
                // never run it blind. halt, not exit: we are inside class loading on a server thread.
                System.err.println(NAME + ": refusing to run: " + patch.className + " loaded from "
                        + location(domain) + " differs from the class checked at start-up");
                System.err.flush();
                Runtime.getRuntime().halt(1);
            }
            applied.add(patch.className);
            return patch.patched;
        }

        private static String location(ProtectionDomain domain) {
            return domain == null || domain.getCodeSource() == null ? "an unknown place"
                    : String.valueOf(domain.getCodeSource().getLocation());
        }
    }
}
