#!/usr/bin/env bash
# The GPU check (issue 34 item 6) in one command, at most 8 minutes on one H100: random
# Whisper weights of tiny, base and small shape, bf16, 1 and 16 codebooks, gradient
# checkpointing off and on, a fine-tune step and a batched decode; one table (bench/gpu_check.py
# says what each column is). The rows share 420 s; `timeout` ends it at 480 s whatever happens,
# and the rows printed by then stay. Extra arguments go to gpu_check.py (e.g. --json rows.jsonl,
# --shapes tiny,base; --smoke runs it on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout --signal=INT --kill-after=10 480 python bench/gpu_check.py --budget-s 420 "$@"
