#!/usr/bin/env bash
# The main job: pre-trains eve-tiny on the embedded data set with ZeRO-3, expert parallelism and
# activation checkpointing over 2 ranks (CPU, or 2 GPUs where present). Extra arguments go to
# launch/pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
if ! python -c "import torch, sys; sys.exit(torch.cuda.device_count() < 2)"; then
  export DS_ACCELERATOR=cpu
fi
set -x
deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/zero3.json "$@"
