#!/usr/bin/env bash
# Times the README's curl walk-through end to end against a freshly started embedded service:
# upload 300 emotion rows, fine-tune smollm2-135m-instruct for one epoch, poll, download the adapter.
# Usage: make bench-walkthrough   (prints one line for docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${BENCH_PORT:-8765}"
H="http://127.0.0.1:$PORT"
OUT="$(mktemp -d)"
PORT=$PORT setsid scripts/run-embedded > "$OUT/service.log" 2>&1 &
SERVICE=$!
trap 'kill -INT -- -$SERVICE 2>/dev/null || true; wait $SERVICE 2>/dev/null || true; rm -rf "$OUT"' EXIT
for _ in $(seq 1 120); do curl -sf "$H/readyz" > /dev/null && break; sleep 0.5; done
KEY=$(cat var/api-key)

start=$(date +%s.%N)
head -n 300 ../shared/data/emotion/train.jsonl > "$OUT/emotion-300.jsonl"
FILE=$(curl -sf "$H/v1/files" -H "Authorization: Bearer $KEY" -F purpose=fine-tune -F file=@"$OUT/emotion-300.jsonl" | jq -r .id)
JOB=$(curl -sf "$H/v1/fine_tuning/jobs" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"model": "smollm2-135m-instruct", "training_file": "'"$FILE"'",
       "text_template": "Text: {text}\nEmotion: {label}",
       "hyperparameters": {"n_epochs": 1, "batch_size": 8}}' | jq -r .id)
while true; do
  STATUS=$(curl -sf "$H/v1/fine_tuning/jobs/$JOB" -H "Authorization: Bearer $KEY" | jq -r .status)
  case "$STATUS" in succeeded|failed|cancelled) break;; esac
  sleep 2
done
[ "$STATUS" = succeeded ] || { echo "job $JOB ended $STATUS"; exit 1; }
JOBJSON=$(curl -sf "$H/v1/fine_tuning/jobs/$JOB" -H "Authorization: Bearer $KEY")
ADAPTER=$(echo "$JOBJSON" | jq -r '.result_files[0]')
curl -sf -H "Authorization: Bearer $KEY" -o "$OUT/adapter.tar" "$H/v1/files/$ADAPTER/content"
tar -tf "$OUT/adapter.tar" | grep -q adapter_model.safetensors
end=$(date +%s.%N)
train_s=$(echo "$JOBJSON" | jq '.finished_at - .started_at')
printf 'walkthrough: %.1f s wall (upload to downloaded adapter); training %s s; %s steps; %s trained tokens\n' \
  "$(python3 -c "print($end - $start)")" "$train_s" "$(echo "$JOBJSON" | jq .progress.total_steps)" \
  "$(echo "$JOBJSON" | jq .trained_tokens)"
