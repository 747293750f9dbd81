import java.io.File;
import java.io.PrintStream;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Deque;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import org.pytorch.serve.archive.model.Manifest;
import org.pytorch.serve.archive.model.ModelArchive;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.messages.ModelInferenceRequest;
import org.pytorch.serve.util.messages.ModelWorkerResponse;
import org.pytorch.serve.util.messages.Predictions;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.wlm.ContinuousBatching;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.WorkerState;

/**
 * Kills, three times over, the worker of a request the client has seen nothing of yet: TorchServe's worker
 * thread calls its real ContinuousBatching.sendError with the batch it had sent, and the probe prints, per
 * death, whether the request went back to the model's queue or was answered with an error. Once with a
 * model of two workers, once with one. Then a worker thread interrupted inside getRequest, holding a begun
 * stream and a request it has just polled: what each client got, and what is left in the queue and the
 * batch (WorkerThread's finally then empties the batch). tests/test_torchserve_patch.py runs it with and
 * without the agent.
 */
public final class WorkerDeathProbe {
    /** Its worker dies while a thread polls: the poll hands over one more job, then the interrupt arrives. */
    static final class InterruptedModel extends Model {
        Job polled;

        InterruptedModel() {
            super(new ModelArchive(new Manifest(), "jai.mar", new File("."), true), 10);
        }

        @Override
        public void pollInferJob(Map<String, Job> jobsRepo, int batchSize) throws InterruptedException {
            jobsRepo.put(polled.getJobId(), polled);
            throw new InterruptedException("the worker's channel closed");
        }
    }

    public static void main(String[] args) throws Exception {
        ConfigManager.Arguments arguments = new ConfigManager.Arguments();
        arguments.setModelStore(".");  // Model reads its GPU count from the ConfigManager
        PrintStream out = System.out;
        System.setOut(System.err);  // its GPU probe prints a line about nvidia-smi
        ConfigManager.init(arguments);
        System.setOut(out);
        for (int workers : new int[] {2, 1}) {
            Model model = new Model(new ModelArchive(new Manifest(), "jai.mar", new File("."), true), 10);
            model.setMinWorkers(workers);
            ContinuousBatching batcher = new ContinuousBatching(model);
            Map<String, Job> batch = field(batcher.getClass().getSuperclass(), batcher, "jobs");
            Map<String, Deque<Job>> queues = field(Model.class, model, "jobsDb");
            Deque<Job> queue = queues.get(Model.DEFAULT_DATA_QUEUE);
            SendResponseProbe.RecordingJob job = new SendResponseProbe.RecordingJob("r" + workers);
            for (int death = 1; death <= 3; death++) {
                Job sent = death == 1 ? job : queue.poll();  // the next worker thread takes it from the queue
                if (sent == null) {
                    break;
                }
                batch.put(sent.getJobId(), sent);
                ModelInferenceRequest request = new ModelInferenceRequest("jai");
                request.addRequest(sent.getPayload());
                batcher.sendError(request, "Worker died.", 500);
                System.out.println(workers + " workers, death " + death + ": queue " + queue.size()
                        + ", batch " + batch.size() + ", client got " + seen(job));
            }
        }
        interruptedWhilePolling();
    }

    private static void interruptedWhilePolling() throws Exception {
        InterruptedModel model = new InterruptedModel();
        model.setMinWorkers(2);
        ContinuousBatching batcher = new ContinuousBatching(model);
        Map<String, Job> batch = field(batcher.getClass().getSuperclass(), batcher, "jobs");
        Map<String, Deque<Job>> queues = field(Model.class, model, "jobsDb");
        SendResponseProbe.RecordingJob streaming = new SendResponseProbe.RecordingJob("streaming");
        batch.put(streaming.getJobId(), streaming);
        ModelWorkerResponse first = new ModelWorkerResponse();  // its first line went out: the stream has begun
        first.setCode(200);
        first.setMessage("Prediction success");
        Predictions line = new Predictions();
        line.setRequestId(streaming.getJobId());
        line.setResp("{}".getBytes(StandardCharsets.UTF_8));
        line.setContentType("application/x-ndjson");
        line.setStatusCode(200);
        line.setHeaders(new TreeMap<>(Collections.singletonMap(RequestInput.TS_STREAM_NEXT, "true")));
        first.setPredictions(new ArrayList<>(Collections.singletonList(line)));
        batcher.sendResponse(first);
        SendResponseProbe.RecordingJob polled = new SendResponseProbe.RecordingJob("polled");
        model.polled = polled;
        String outcome;
        try {
            batcher.getRequest("W-9000-jai_1.0", WorkerState.WORKER_MODEL_LOADED);
            outcome = "returned";
        } catch (InterruptedException e) {
            outcome = "threw InterruptedException";
        }
        List<String> queued = new ArrayList<>();
        for (Job job : queues.get(Model.DEFAULT_DATA_QUEUE)) {
            queued.add(job.getJobId());
        }
        System.out.println("interrupted in getRequest: " + outcome + "; queue " + queued + ", batch "
                + new TreeMap<>(batch).keySet() + "; streaming got " + seen(streaming) + ", polled got "
                + seen(polled));
    }

    /** What a client received, a stream's error line (WorkerLoss.lastChunk) named as such. */
    private static List<String> seen(SendResponseProbe.RecordingJob job) {
        List<String> out = new ArrayList<>();
        for (String body : job.received) {
            out.add(body.contains("\"finish_reason\": \"error\"") ? "error line"
                    : body.startsWith("error ") ? body : "line " + body);
        }
        return out;
    }

    @SuppressWarnings("unchecked")
    private static <T> T field(Class<?> owner, Object instance, String name) throws ReflectiveOperationException {
        Field field = owner.getDeclaredField(name);
        field.setAccessible(true);
        return (T) field.get(instance);
    }
}
