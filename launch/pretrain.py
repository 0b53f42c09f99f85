"""Entry point: deepspeed [--num_gpus N] launch/pretrain.py --deepspeed_config ds_configs/zero3.json [...]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
