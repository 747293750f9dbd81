#!/usr/bin/env bash
# Build torchserve-patch/build/jai-torchserve-patch.jar: the Java agent that fixes TorchServe 0.12.0's
# continuous batcher when its classes load (what and why: src/jaiserve/tspatch/Agent.java;
# docs/batching.md). Javassist (Debian's libjavassist-java, which scripts/ensure_java.sh installs) is bundled into
# the jar with its copyright notice, so the agent needs nothing else at run time.
set -euo pipefail

usage() {
    cat <<USAGE
usage: torchserve-patch/build.sh [--force]

Compiles src/ with javac --release 8 (TorchServe 0.12.0's classes are Java 8 bytecode) and writes
build/jai-torchserve-patch.jar, only when a source, this script or the Javassist jar is newer than it
(--force: always). JAVASSIST_JAR (default /usr/share/java/javassist.jar) and JAVASSIST_NOTICE (default
/usr/share/doc/libjavassist-java/copyright) point elsewhere on a system without Debian's package.
USAGE
}

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
out=$here/build/jai-torchserve-patch.jar
javassist=${JAVASSIST_JAR:-/usr/share/java/javassist.jar}
notice=${JAVASSIST_NOTICE:-/usr/share/doc/libjavassist-java/copyright}
jdk_bin=${JAVA_HOME:+$JAVA_HOME/bin/}

for file in "$javassist" "$notice"; do
    [[ -f $file ]] || { echo "build.sh: $file not found: run scripts/ensure_java.sh (Debian: apt-get install libjavassist-java)" >&2; exit 1; }
done
command -v "${jdk_bin}javac" >/dev/null ||
    { echo "build.sh: javac not found: run scripts/ensure_java.sh (Debian: apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }

# -L: the Debian jar is a symlink; compare the file it points to
if ((!force)) && [[ -f $out ]] &&
    [[ -z $(find -L "$here/src" "$here/build.sh" "$javassist" "$notice" -newer "$out" -print -quit) ]]; then
    exit 0
fi

mkdir -p "$here/build"
stage=$(mktemp -d "$here/build/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/classes/META-INF/javassist"

mapfile -t sources < <(find "$here/src" -name '*.java' | sort)
"${jdk_bin}javac" --release 8 -g -Xlint:all -Werror -encoding UTF-8 -cp "$javassist" -d "$stage/classes" "${sources[@]}"

# Javassist's classes beside ours (its own manifest and signatures left out), its notice kept
(cd "$stage/classes" && "${jdk_bin}jar" xf "$javassist" && rm -f META-INF/MANIFEST.MF META-INF/*.SF META-INF/*.RSA META-INF/*.DSA)
cp "$notice" "$stage/classes/META-INF/javassist/copyright"
[[ ! -f /usr/share/common-licenses/LGPL-2.1 ]] || cp /usr/share/common-licenses/LGPL-2.1 "$stage/classes/META-INF/javassist/"

cat >"$stage/MANIFEST.MF" <<MANIFEST
Premain-Class: jaiserve.tspatch.Agent
Implementation-Title: jai-torchserve-patch
MANIFEST
"${jdk_bin}jar" cfm "$stage/patch.jar" "$stage/MANIFEST.MF" -C "$stage/classes" .
mv "$stage/patch.jar" "$out"
echo "build.sh: built $out"
