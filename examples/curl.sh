#!/usr/bin/env bash
# curl against a local droidpool: models, a streamed answer, a plain answer, a follow-up in
# the same droid session by X-Session-Id, the session list, and the Anthropic and Responses
# dialects.
# Usage: bash examples/curl.sh [MODEL]   (default: $DROIDPOOL_MODEL, else the first /v1/models id)
set -euo pipefail

BASE=${DROIDPOOL_URL:-http://127.0.0.1:8765}
MODEL=${1:-${DROIDPOOL_MODEL:-}}
# Needed only once droidpool has API keys configured.
AUTH=()
if [ -n "${DROIDPOOL_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $DROIDPOOL_API_KEY"); fi

echo "== GET /v1/models"
curl -sS "${AUTH[@]}" "$BASE/v1/models"
echo
if [ -z "$MODEL" ]; then
  MODEL=$(curl -sS "${AUTH[@]}" "$BASE/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
fi

echo "== streaming (-N: print each SSE event as it arrives)"
curl -sS "${AUTH[@]}" -N "$BASE/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "stream": true, "stream_options": {"include_usage": true},
       "messages": [{"role": "user", "content": "Count from one to five in words."}]}'

echo "== non-streaming, keeping the response headers"
headers=$(mktemp)
trap 'rm -f "$headers"' EXIT
curl -sS "${AUTH[@]}" -D "$headers" "$BASE/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'",
       "messages": [{"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": "My favourite colour is teal. Say hi."}]}'
echo
SESSION=$(awk 'tolower($1) == "x-session-id:" {print $2}' "$headers" | tr -d '\r')
echo "session: $SESSION"

echo "== follow-up: only the new message, same droid session"
curl -sS "${AUTH[@]}" "$BASE/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -H "X-Session-Id: $SESSION" \
  -d '{"model": "'"$MODEL"'",
       "messages": [{"role": "user", "content": "What is my favourite colour?"}]}'
echo

echo "== sessions"
curl -sS "${AUTH[@]}" "$BASE/v1/sessions"
echo
curl -sS "${AUTH[@]}" "$BASE/v1/sessions/$SESSION"
echo
# Forget it:  curl -sS "${AUTH[@]}" -X DELETE "$BASE/v1/sessions/$SESSION"

echo "== Anthropic Messages, streamed (named events)"
curl -sS "${AUTH[@]}" -N "$BASE/v1/messages" \
  -H 'Content-Type: application/json' -H 'anthropic-version: 2023-06-01' \
  -d '{"model": "'"$MODEL"'", "max_tokens": 1024, "stream": true,
       "messages": [{"role": "user", "content": "Name two rivers."}]}'

echo "== Anthropic token estimate"
curl -sS "${AUTH[@]}" "$BASE/v1/messages/count_tokens" \
  -H 'Content-Type: application/json' -H 'anthropic-version: 2023-06-01' \
  -d '{"model": "'"$MODEL"'", "messages": [{"role": "user", "content": "Name two rivers."}]}'
echo

echo "== OpenAI Responses, then a follow-up by previous_response_id"
RESPONSE=$(curl -sS "${AUTH[@]}" "$BASE/v1/responses" \
  -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "instructions": "Answer briefly.", "input": "My pet is a heron."}' \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["id"])')
echo "response: $RESPONSE"
curl -sS "${AUTH[@]}" "$BASE/v1/responses" \
  -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "input": "What is my pet?", "previous_response_id": "'"$RESPONSE"'"}'
echo
