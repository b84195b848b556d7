#!/usr/bin/env bash
# Install everything the tests need (Python package + test deps, the real droid CLI from npm)
# and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

DROID_VERSION=0.225.2
DROID_PREFIX="${DROID_PREFIX:-$PWD/.cache/droid}"

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

if [ -z "${DROIDPOOL_TEST_DROID:-}" ]; then
  DROIDPOOL_TEST_DROID="$DROID_PREFIX/node_modules/@factory/cli-linux-x64/bin/droid"
  if [ ! -x "$DROIDPOOL_TEST_DROID" ]; then
    if command -v npm >/dev/null 2>&1; then
      npm install --prefix "$DROID_PREFIX" --no-save --no-audit --no-fund --loglevel=error \
        "@factory/cli-linux-x64@$DROID_VERSION"
    else
      echo "npm not found: the real-droid tests will be skipped (and fail under CI=true)" >&2
    fi
  fi
fi
export DROIDPOOL_TEST_DROID

status=0
python3 -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
