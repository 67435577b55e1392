#!/usr/bin/env bash
# vgate with curl: readiness, Vertex's predict, OpenAI chat, and a stream.
#   examples/curl.sh http://127.0.0.1:8080 [API_KEY]
set -euo pipefail
base="${1:-http://127.0.0.1:8080}"
auth=()
[ -z "${2:-}" ] || auth=(-H "Authorization: Bearer $2")

curl -sf "$base/ping"
echo
curl -sf "${auth[@]}" "$base/generate" -H 'Content-Type: application/json' \
  -d '{"instances": [{"prompt": "Hello", "max_tokens": 8}]}'
echo
curl -sf "${auth[@]}" "$base/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}'
echo
curl -sfN "${auth[@]}" "$base/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "", "prompt": "Hello", "max_tokens": 8, "stream": true}'
