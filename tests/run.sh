#!/usr/bin/env bash
# Install everything the tests need (Python package + test deps, curl and Chromium from Debian,
# the real droid CLI from npm) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

DROID_VERSION=0.225.2
DROID_PREFIX="${DROID_PREFIX:-$PWD/.cache/droid}"
# The agent CLIs the tool tests drive as clients (tests/e2e/test_agents_real_droid.py).
CLAUDE_CODE_VERSION=2.1.328
CODEX_VERSION=0.169.0
AGENTS_PREFIX="${AGENTS_PREFIX:-$PWD/.cache/agents}"

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

# System packages some tests use: curl, Chromium for the real-browser test, PostgreSQL (Debian's).
# Installed when apt-get may be used (root, or sudo without a password); otherwise those
# tests are skipped, and under CI=true they fail.
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# PostgreSQL's server binaries for the shared-store tests (tests/pgserver.py starts its own server).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
  if [ -z "$sudo" ] || sudo -n true 2>/dev/null; then
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "could not install ${missing[*]}: the tests that need them are skipped (and fail under CI=true)" >&2
  else
    echo "${missing[*]} not installed (needs root): the tests that need them are skipped" >&2
  fi
fi

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

if [ -z "${DROIDPOOL_TEST_CLAUDE:-}" ] || [ -z "${DROIDPOOL_TEST_CODEX:-}" ]; then
  if { [ ! -x "$AGENTS_PREFIX/node_modules/.bin/claude" ] || [ ! -x "$AGENTS_PREFIX/node_modules/.bin/codex" ]; } \
      && command -v npm >/dev/null 2>&1; then
    npm install --prefix "$AGENTS_PREFIX" --no-save --no-audit --no-fund --loglevel=error \
      "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION" \
      || echo "could not install Claude Code and Codex: their tests are skipped (and fail under CI=true)" >&2
  fi
  DROIDPOOL_TEST_CLAUDE="${DROIDPOOL_TEST_CLAUDE:-$AGENTS_PREFIX/node_modules/.bin/claude}"
  DROIDPOOL_TEST_CODEX="${DROIDPOOL_TEST_CODEX:-$AGENTS_PREFIX/node_modules/.bin/codex}"
fi
export DROIDPOOL_TEST_CLAUDE DROIDPOOL_TEST_CODEX

status=0
python3 -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
