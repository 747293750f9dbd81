#!/usr/bin/env bash
# TorchServe's frontend is Java: make sure a JDK/JRE 17+ is on PATH (installs it with apt as root).
set -euo pipefail

java_major() {
    command -v java >/dev/null || { echo 0; return; }
    java -version 2>&1 | sed -n 's/.*version "\([0-9]*\)[."].*/\1/p' | head -n 1
}

major=$(java_major)
if ((${major:-0} >= 17)); then
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "ensure_java.sh: Java 17+ not found (have: ${major:-none}); installing openjdk-17-jre-headless"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    exit 0
fi
echo "ensure_java.sh: TorchServe needs Java 17+ (found: ${major:-none})." >&2
echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2
echo "  macOS:         brew install openjdk@17" >&2
exit 1
