import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "data" / "shapes"


def run_tool(script: str, *args):
    """Runs ``tools/<script>`` in a fresh process; returns the completed process (output captured)."""
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], capture_output=True,
                          text=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_ds_config(**overrides) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": "auto",
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 1e-3, "weight_decay": 0.05, "torch_adam": True, "fused": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_type": "linear"}},
        "eve": {"expert_parallel_size": 2},
    }
    config.update(overrides)
    return config


def launch(script: str, *args, num_ranks: int = 2) -> str:
    """Runs a script of the repository under the DeepSpeed launcher (CPU, gloo); returns its output, or fails
    the test with it."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks), "--master_port",
               str(free_port()), str(REPO / script), *map(str, args)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def launch_pretrain(tmp_path: Path, out: Path, ds_config: dict, *args, num_ranks: int = 2, data=None):
    """Runs launch/pretrain.py under the DeepSpeed launcher (CPU, gloo); returns metrics.jsonl records."""
    config_path = tmp_path / f"ds_{free_port()}.json"
    config_path.write_text(json.dumps(ds_config))
    if data is not None:
        args = (*args, "--data", data, "--tokenizer", SHAPES / "tokenizer.json")
    log = launch("launch/pretrain.py", "--deepspeed_config", config_path, "--out", out, "--num-workers", 0,
                 "--log-interval", 2, *args, num_ranks=num_ranks)
    return read_metrics(out), log


def read_metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def dirty_manifest(tmp_path_factory) -> Path:
    """64 shipped pairs plus 8 unreadable images (corrupt or missing) and two malformed manifest lines."""
    root = tmp_path_factory.mktemp("dirty_data")
    (root / "images").mkdir()
    lines = (SHAPES / "manifest.jsonl").read_text().splitlines()[:64]
    for line in lines:
        image = json.loads(line)["image"]
        shutil.copy(SHAPES / image, root / image)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    unreadable = [json.dumps({"image": f"images/{name}.png", "caption": "a broken picture"})
                  for name in ["corrupt"] * 6 + ["missing"] * 2]
    lines[5:5] = unreadable[:4] + ["{not json", json.dumps({"image": "images/000001.png"})] + unreadable[4:]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"
