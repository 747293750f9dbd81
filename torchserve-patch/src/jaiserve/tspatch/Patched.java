package jaiserve.tspatch;

import java.util.List;

/** One class checked and rewritten in premain: its class file as read, its new bytes, the fixes in it. */
final class Patched {
    final String className;
    final byte[] original;
    final byte[] patched;
    final List<String> fixes;

    Patched(String className, byte[] original, byte[] patched, List<String> fixes) {
        this.className = className;
        this.original = original;
        this.patched = patched;
        this.fixes = fixes;
    }
}
