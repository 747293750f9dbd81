package jaiserve.tspatch;

import java.util.ArrayList;
import java.util.List;

/**
 * Loads and initializes the patched classes exactly as TorchServe would (so the JVM verifies the new
 * bytecode and runs Model's log line), then prints the fixes in place. Run it with the agent:
 *   java -javaagent:JAR -cp "TS_FRONTEND/*:JAR" jaiserve.tspatch.Check
 * Exit 0 when every prepared class was loaded with our bytes; 1 otherwise; 2 when run without the agent.
 */
public final class Check {
    private Check() {}

    public static void main(String[] args) throws ClassNotFoundException {
        List<Patched> prepared = Agent.prepared();
        if (prepared == null) {
            System.err.println(Agent.NAME + " check: run with -javaagent:<this jar>");
            System.exit(2);
        }
        // TorchServe's log4j2.xml would write logs/ under the current directory: log to stderr instead
        setIfAbsent("log4j2.loggerContextFactory", "org.apache.logging.log4j.simple.SimpleLoggerContextFactory");
        setIfAbsent("org.apache.logging.log4j.simplelog.level", "INFO");
        List<String> fixes = new ArrayList<>();
        boolean ok = true;
        for (Patched p : prepared) {
            Class.forName(p.className, true, ClassLoader.getSystemClassLoader());
            boolean applied = Agent.applied().contains(p.className);
            ok &= applied;
            System.out.println((applied ? "patched " : "NOT patched ") + p.className);
            if (applied) {
                fixes.addAll(p.fixes);
            }
        }
        for (String fix : fixes) {
            System.out.println("  fix: " + fix);
        }
        System.out.println(Agent.NAME + " check: " + (ok ? "OK, " : "FAILED, ") + fixes.size() + " fixes applied");
        System.exit(ok ? 0 : 1);
    }

    private static void setIfAbsent(String key, String value) {
        if (System.getProperty(key) == null) {
            System.setProperty(key, value);
        }
    }
}
