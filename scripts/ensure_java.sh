#!/usr/bin/env bash
# TorchServe's frontend is Java, and torchserve-patch/ (the agent config.properties loads into it) is
# compiled here: make sure a JDK 17+ (java and javac) and Javassist (which the agent bundles) are present.
# Installs what is missing with apt as root; otherwise says what to install.
set -euo pipefail

major() { # major <java|javac>: the tool's major version on PATH, empty when absent
    command -v "$1" >/dev/null || return 0
    "$1" -version 2>&1 | sed -n -E 's/^(.* version "|javac )([0-9]+).*/\2/p' | head -n 1
}

javassist=${JAVASSIST_JAR:-/usr/share/java/javassist.jar}
missing=()
java=$(major java) javac=$(major javac)
if ((${java:-0} < 17 || ${javac:-0} < 17)); then
    missing+=(openjdk-17-jdk-headless)
fi
[[ -f $javassist ]] || missing+=(libjavassist-java)
((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "ensure_java.sh: installing ${missing[*]} (found java ${java:-none}, javac ${javac:-none}, $javassist: $([[ -f $javassist ]] && echo yes || echo no))"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi
echo "ensure_java.sh: JAI needs a JDK 17+ (found java ${java:-none}, javac ${javac:-none}) and Javassist ($javassist)." >&2
echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jdk-headless libjavassist-java" >&2
echo "  elsewhere:     a JDK 17 (macOS: brew install openjdk@17), and Javassist 3.x from Maven Central" >&2
echo "                 (org.javassist:javassist) named by JAVASSIST_JAR, its licence file by JAVASSIST_NOTICE" >&2
exit 1
