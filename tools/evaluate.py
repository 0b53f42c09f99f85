"""Evaluate a fine-tuned EVE checkpoint on a split and print the metrics in the paper's layout; for VQA also
write the results file the official evaluation server takes.

    deepspeed --num_gpus 2 tools/evaluate.py --task vqa --pretrained runs/eve-tiny/consolidated \
        --run runs/finetune-vqa --val-questions v2_OpenEnded_mscoco_test-dev2015_questions.json \
        --val-annotations '' --val-images test2015 --image-name 'COCO_{folder}_{image_id:012d}.jpg' \
        --results vqa_test-dev_results.json

Without ``--run`` it evaluates the weights folder ``--pretrained`` itself, which must hold the task's model with its
head: a fine-tuning run consolidated by tools/consolidate.py, or the authors' fine-tuned file imported by
tools/convert_released.py:

    python tools/convert_released.py import vqa_eve_base.pth runs/eve-base-vqa --model eve-base --tokenizer tok.json
    deepspeed --num_gpus 2 tools/evaluate.py --task vqa --pretrained runs/eve-base-vqa --answer-list answer_list.json

Run it with as many ranks as the run's expert-parallel size needs (its DeepSpeed config, the task's file of
ds_configs/ by default). The split is given by the same options as in training (``--val-*``, ``--nlvr2-val*``,
``--karpathy`` with ``--eval-split val|test``); the tokenizer is the run's, from ``--pretrained`` (or ``--tokenizer``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.errors import run_job  # noqa: E402
from eve_ds.finetune.train import evaluate_run  # noqa: E402

if __name__ == "__main__":
    run_job(evaluate_run, "evaluate")
