"""Entry point: deepspeed --num_gpus 2 launch/finetune.py --task {vqa,nlvr2,retrieval} --pretrained DIR [...]
(see README)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.cluster import StopRequest  # noqa: E402

if __name__ == "__main__":
    stop = StopRequest()  # before torch is imported: a signal during start-up is recorded, not fatal
    from eve_ds.errors import run_job
    from eve_ds.finetune.train import main
    run_job(main, "finetune", stop=stop)
