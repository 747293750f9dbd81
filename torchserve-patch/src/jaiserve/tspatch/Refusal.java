package jaiserve.tspatch;

/** The installed TorchServe classes are not the ones this agent was written for; the message says how. */
final class Refusal extends Exception {
    private static final long serialVersionUID = 1L;

    Refusal(String message) {
        super(message);
    }
}
