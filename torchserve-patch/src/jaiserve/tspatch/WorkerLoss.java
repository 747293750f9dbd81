package jaiserve.tspatch;

import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.WeakHashMap;

/**
 * What the patched ContinuousBatching (Patches fix 7) does with the requests of a worker that died. Plain
 * JDK code, called from the inserted code: the agent's jar is on the system class path, where TorchServe's
 * classes load too, so a patched class can call it.
 *
 * A request whose response has begun (status 200 and its headers went out with the first chunk) gets a
 * last chunk carrying the error in the format the handler chose for it, told by the content type of its
 * first chunk: an NDJSON line with "finish_reason": "error" (native stream), an OpenAI error event and
 * `data: [DONE]` (OpenAI stream: the SDKs raise their API error), or the route's JSON error body (a
 * non-streamed call, which continuous batching answers as a chunked response that so far held nothing).
 * A request the client has seen nothing of yet goes back to the queue, for another worker or the replacement:
 * at most once per worker the model runs. Workers killed together (the OOM killer, a container losing its
 * processes) can hand a requeued request to a thread whose worker is dead but not yet noticed, which
 * fails it a second time through no fault of its own; a request that kills every worker it reaches takes
 * each worker down at most once, then fails with TorchServe's error.
 */
public final class WorkerLoss {
    /** The message every such last chunk carries; tests and docs/updates.md quote it. */
    public static final String MESSAGE = "the worker generating this response stopped (TorchServe starts a"
            + " new one): the response is incomplete; send the request again";
    static final String NDJSON = "application/x-ndjson";
    static final String SSE = "text/event-stream";

    /** How often each job went back to the queue; weak keys: a job answered and dropped leaves by itself. */
    private static final Map<Object, Integer> REQUEUED = new WeakHashMap<>();

    private WorkerLoss() {}

    /**
     * The last chunk of a response that had begun when its worker died.
     *
     * @param contentType the content type of the response's first chunk (null: none was set)
     * @param urlPath TorchServe's url_path header of the request ("v1/..." on the OpenAI routes)
     */
    public static byte[] lastChunk(CharSequence contentType, String urlPath) {
        String type = contentType == null ? "" : contentType.toString();
        String openai = "{\"error\": {\"message\": \"" + MESSAGE + "\", \"type\": \"server_error\", \"param\": null,"
                + " \"code\": \"worker_died\"}}";
        String body;
        if (type.startsWith(SSE)) {
            body = "data: " + openai + "\n\ndata: [DONE]\n\n";
        } else if (type.startsWith(NDJSON)) {
            body = "{\"code\": 500, \"type\": \"InternalServerError\", \"message\": \"" + MESSAGE
                    + "\", \"finish_reason\": \"error\"}\n";
        } else if (isOpenAI(urlPath)) {
            body = openai;
        } else {
            body = "{\"code\": 500, \"type\": \"InternalServerError\", \"message\": \"" + MESSAGE + "\"}";
        }
        return body.getBytes(StandardCharsets.UTF_8);
    }

    /**
     * True while a job has gone back to the queue fewer times than the model has workers (at least once);
     * counts this time. False after: a request that kills every worker it reaches must not take the
     * replacements down one after another.
     */
    public static boolean requeue(Object job, int workers) {
        synchronized (REQUEUED) {
            int times = REQUEUED.getOrDefault(job, 0);
            if (times >= Math.max(1, workers)) {
                return false;
            }
            REQUEUED.put(job, times + 1);
            return true;
        }
    }

    static boolean isOpenAI(String urlPath) {
        String path = urlPath == null ? "" : urlPath.replaceAll("^/+", "");
        return path.equals("v1") || path.startsWith("v1/");
    }
}
