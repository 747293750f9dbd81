import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.messages.ModelWorkerResponse;
import org.pytorch.serve.util.messages.Predictions;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;
import org.pytorch.serve.wlm.ContinuousBatching;

/**
 * Feeds TorchServe's real ContinuousBatching.sendResponse the messages a multi-step handle() call
 * produces and prints, per message, what the frontend did: the return value (false = the worker thread
 * keeps reading replies), the jobs left in the batch, and what each client received.
 * tests/test_torchserve_patch.py runs it with and without the agent and compares the lines.
 */
public final class SendResponseProbe {
    /** A client that records what the frontend sends it. */
    static final class RecordingJob extends Job {
        final List<String> received = new ArrayList<>();

        RecordingJob(String id) {
            super("jai", "1.0", WorkerCommands.PREDICT, new RequestInput(id));
        }

        @Override
        public void response(byte[] body, CharSequence contentType, int status, String phrase,
                Map<String, String> headers) {
            received.add(new String(body, StandardCharsets.UTF_8));
        }

        @Override
        public void sendError(int status, String error) {
            received.add("error " + status);
        }

        @Override
        public boolean isOpen() {
            return true;
        }
    }

    private static ContinuousBatching batcher;
    private static Map<String, Job> jobs;
    private static final Map<String, RecordingJob> clients = new TreeMap<>();

    public static void main(String[] args) throws Exception {
        batcher = new ContinuousBatching(null); // sendResponse never touches the model
        Field field = batcher.getClass().getSuperclass().getDeclaredField("jobs");
        field.setAccessible(true);
        @SuppressWarnings("unchecked")
        Map<String, Job> batch = (Map<String, Job>) field.get(batcher);
        jobs = batch;
        for (String id : new String[] {"a", "b", "late"}) {
            RecordingJob job = new RecordingJob(id);
            clients.put(id, job);
            jobs.put(id, job);
        }
        expire(clients.get("late"));

        // one handle() call: two intermediate messages (one also names a job that is not in the batch)...
        send("intermediate 1", message(200, "Intermediate", p("a", "a1", true), p("b", "b1", true), p("late", "l1", true)));
        send("intermediate 2", message(200, "Intermediate", p("a", "a2", true), p("gone", "g2", true)));
        // ...then its final message: a finishes, b continues at the next step
        send("final", message(200, "Prediction success", p("a", "a3", false), p("b", "b3", true), p("late", "l3", false)));
        System.out.println("b cached in backend: " + clients.get("b").getPayload().isCachedInBackend());
        // a failed step that had streamed first: every job in the batch gets the error
        send("failure", message(503, "Intermediate", p("b", "b4", true)));
    }

    private static void send(String what, ModelWorkerResponse message) {
        String outcome;
        try {
            outcome = "returned " + batcher.sendResponse(message);
        } catch (RuntimeException e) {
            outcome = "threw " + e.getClass().getSimpleName();
        }
        List<String> left = new ArrayList<>(jobs.keySet());
        Collections.sort(left);
        StringBuilder line = new StringBuilder(what + ": " + outcome + "; batch " + left);
        for (Map.Entry<String, RecordingJob> client : clients.entrySet()) {
            line.append("; ").append(client.getKey()).append(" got ").append(client.getValue().received);
        }
        System.out.println(line);
    }

    private static ModelWorkerResponse message(int code, String text, Predictions... predictions) {
        ModelWorkerResponse message = new ModelWorkerResponse();
        message.setCode(code);
        message.setMessage(text);
        List<Predictions> list = new ArrayList<>();
        Collections.addAll(list, predictions);
        message.setPredictions(list);
        return message;
    }

    private static Predictions p(String id, String body, boolean streamNext) {
        Predictions prediction = new Predictions();
        prediction.setRequestId(id);
        prediction.setResp(body.getBytes(StandardCharsets.UTF_8));
        prediction.setStatusCode(200);
        prediction.setHeaders(new TreeMap<>(Collections.singletonMap(RequestInput.TS_STREAM_NEXT, String.valueOf(streamNext))));
        return prediction;
    }

    /** The client's deadline (TorchServe's per-request client timeout) passes before any reply. */
    private static void expire(Job job) {
        job.getPayload().setClientExpireTS(1);
        long deadline = job.getPayload().getClientExpireTS();
        while (System.currentTimeMillis() <= deadline) {
            Thread.onSpinWait();
        }
    }
}
