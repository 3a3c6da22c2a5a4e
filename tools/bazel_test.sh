#!/usr/bin/env bash
# Run the Bazel test suite offline: `bazel test //...` with the repo's .bazelrc.
#
# Installs nothing. Needs Debian 12's Bazel 4.2.3 and the repositories it uses:
#   apt-get install -y bazel-bootstrap bazel-rules-java bazel-rules-proto \
#                      bazel-platforms bazel-skylib
# and a `python3` on PATH whose pip environment has the project's dependencies
# (tensorflow, numpy, absl-py, ...): py_test targets run with that interpreter.
#
# Usage: tools/bazel_test.sh [extra bazel test flags] [targets]   (default //...)
# Exit status: bazel's own (0 all passed, 3 some test failed, 1 build failed,
# 4 no test targets found, ...).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

die() { echo "bazel_test.sh: $*" >&2; exit 2; }

command -v bazel >/dev/null 2>&1 \
  || die "bazel is not installed (expected Debian's Bazel 4.2.3). Install with:
  apt-get update && apt-get install -y bazel-bootstrap bazel-rules-java bazel-rules-proto bazel-platforms bazel-skylib"

# Repositories that .bazelrc points --override_repository at.
for d in /usr/share/bazel/rules/java /usr/share/bazel/rules/proto \
         /usr/share/bazel/tools/platforms /usr/share/bazel/tools/skylib; do
  [ -f "$d/WORKSPACE" ] || die "missing $d (Debian packages needed:
  apt-get install -y bazel-rules-java bazel-rules-proto bazel-platforms bazel-skylib)"
done

command -v python3 >/dev/null 2>&1 || die "no python3 on PATH"
# Put the real interpreter's bin dir first on the tests' PATH, so Bazel's
# autodetecting Python toolchain runs it directly (not through a pyenv shim).
# No realpath: inside a virtualenv sys.executable must stay the venv's python.
py_bin_dir="$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))')" \
  || die "python3 on PATH does not run"
export PATH="$py_bin_dir:$PATH"

# Bazel keeps its output under $HOME/.cache/bazel; make sure HOME is set.
if [ -z "${HOME:-}" ]; then
  HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
  export HOME
fi

if [ "$#" -eq 0 ]; then
  set -- //...
fi

log="$(mktemp "${TMPDIR:-/tmp}/bazel_test.XXXXXX.log")"
trap 'rm -f "$log"' EXIT

echo "+ bazel test $*   (python3: $py_bin_dir/python3)"
bazel test "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# One plain closing line: targets by final status from bazel's test summary
# (lines like "//tests:foo_test   PASSED in 3.1s" / "(cached) PASSED" / "FAILED").
passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(PASSED|FLAKY)' "$log")
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|INCOMPLETE|REMOTE FAILURE|FAILED TO BUILD|NO STATUS)' "$log")
# CI runs in a fresh clone (new path => new output base and Bazel server each
# time): don't leave that server idling for Bazel's default 3 hours.
if [ -n "${CI:-}" ] && [ "${CI}" != "false" ]; then
  bazel shutdown >/dev/null 2>&1 || true
fi

echo
echo "bazel: ${passed} passed, ${failed} failed"
if [ "$status" -ne 0 ]; then
  echo "bazel_test.sh: bazel test exited with status $status" >&2
fi
exit "$status"
