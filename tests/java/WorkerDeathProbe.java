import java.io.File;
import java.io.PrintStream;
import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.Deque;
import java.util.List;
import java.util.Map;
import org.pytorch.serve.archive.model.Manifest;
import org.pytorch.serve.archive.model.ModelArchive;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.messages.ModelInferenceRequest;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;
import org.pytorch.serve.wlm.ContinuousBatching;
import org.pytorch.serve.wlm.Model;

/**
 * Kills, three times over, the worker of a request the client has seen nothing of yet: TorchServe's worker
 * thread calls its real ContinuousBatching.sendError with the batch it had sent, and the probe prints, per
 * death, whether the request went back to the model's queue or was answered with an error. Once with a
 * model of two workers, once with one. tests/test_torchserve_patch.py runs it with and without the agent.
 */
public final class WorkerDeathProbe {
    /** A client that records the errors the frontend sends it. */
    static final class RecordingJob extends Job {
        final List<String> received = new ArrayList<>();

        RecordingJob(String id) {
            super("jai", "1.0", WorkerCommands.PREDICT, new RequestInput(id));
        }

        @Override
        public void response(byte[] body, CharSequence contentType, int status, String phrase,
                Map<String, String> headers) {
            received.add("response " + status);
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
            RecordingJob job = new RecordingJob("r" + workers);
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
                        + ", batch " + batch.size() + ", client got " + job.received);
            }
        }
    }

    @SuppressWarnings("unchecked")
    private static <T> T field(Class<?> owner, Object instance, String name) throws ReflectiveOperationException {
        Field field = owner.getDeclaredField(name);
        field.setAccessible(true);
        return (T) field.get(instance);
    }
}
