"""Entry point: deepspeed [--num_gpus N] launch/pretrain.py --deepspeed_config ds_configs/zero3.json [...]
(or torchrun, or one srun task per GPU: launch/slurm/pretrain.sbatch, or plain python for one process)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.cluster import StopRequest  # noqa: E402

if __name__ == "__main__":
    stop = StopRequest()  # before torch is imported: a signal during start-up is recorded, not fatal
    from eve_ds.errors import run_job
    from eve_ds.pretrain import main
    run_job(main, "pretrain", stop=stop)
