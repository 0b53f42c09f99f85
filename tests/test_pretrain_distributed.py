"""Real 2-rank launches on CPU (gloo) of the pre-training entry point."""
import json
import re
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eve_ds.config import preset
from eve_ds.data import TextTokenizer
from eve_ds.flops import H100_BF16_DENSE_TFLOPS, training_flops
from eve_ds.checkpoint.pretrained import StoredWeights, held_model
from tests.conftest import SHAPES, launch_pretrain, read_metrics, run_tool, small_ds_config

pytestmark = pytest.mark.distributed
LOSSES = ("loss", "image_loss", "text_loss", "aux_loss")


def test_expert_parallel_training_matches_data_parallel(tmp_path, dirty_manifest):
    """ZeRO-2 with ep_size=2 (each rank holds 2 of the 4 experts, tokens cross by all-to-all) gives the
    losses of ep_size=1 (every rank holds all experts) on the same data and seed."""
    steps = 4
    parallel, log = launch_pretrain(tmp_path, tmp_path / "ep2", small_ds_config(), "--steps", steps,
                                    data=dirty_manifest)
    replicated, _ = launch_pretrain(tmp_path, tmp_path / "ep1", small_ds_config(eve={"expert_parallel_size": 1}),
                                    "--steps", steps, data=dirty_manifest)
    assert [r["step"] for r in parallel] == list(range(1, steps + 1))
    for ep2, ep1 in zip(parallel, replicated):
        for key in LOSSES:
            assert ep2[key] == pytest.approx(ep1[key], rel=1e-4, abs=1e-5), (ep2["step"], key)
    assert "expert-parallel size 2" in log
    # Unreadable images are replaced by readable ones and counted.
    assert parallel[-1]["skipped"]["unreadable image"] > 0 and parallel[-1]["skipped"]["missing image"] > 0
    assert "74 lines, weight 1" in log  # the malformed ones too: they are counted when read
    # Throughput: activated FLOPs of the step over its time, per rank, and their fraction of the peak.
    flops = parallel[-1]["tflops_per_rank"] * 1e12 * parallel[-1]["step_time_s"] * 2
    config = preset("eve-tiny").replace(vocab_size=TextTokenizer(SHAPES / "tokenizer.json", 40).vocab_size)
    assert flops == pytest.approx(8 * training_flops(config, 37, 40, 27, 12.5), rel=0.02)  # 8 samples a step
    assert parallel[-1]["mfu"] == pytest.approx(parallel[-1]["tflops_per_rank"] / H100_BF16_DENSE_TFLOPS)
    assert all(0 <= record["data_wait_s"] < record["step_time_s"] for record in parallel)
    assert "% waiting for data" in log
    images = EventAccumulator(str(tmp_path / "ep2" / "tensorboard")).Reload().Tags()["images"]
    assert sorted(images) == ["expert_load/layer_2", "expert_load/layer_3"]
    load = parallel[-1]["expert_load"]
    assert set(load) == {"layer_2", "layer_3"}
    for layer in load.values():
        assert sum(layer["vision"]) == pytest.approx(1.0, abs=1e-3)
        assert sum(layer["text"]) == pytest.approx(1.0, abs=1e-3)


ZERO3_EP_CHECKPOINTED = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                         "eve": {"expert_parallel_size": 2, "activation_checkpointing": True}}


# The ZeRO-2 run trains the router-only variant and is resumed without saying so: the checkpoint's setting wins.
# The ZeRO-3 run reads with 2 loader workers per rank: resumed after 3 micro-batches, worker 0 plays the reader
# of worker 1.
# The VLMo objectives run under ZeRO-3 with expert parallelism: five encoder passes a step, the contrastive features
# gathered over both ranks, hard negatives drawn from both ranks' pairs.
@pytest.mark.parametrize("overrides, first_args, both_args", [({}, ["--no-routing-embedding-to-experts"], []),
                                                              (ZERO3_EP_CHECKPOINTED, [], ["--num-workers", "2"]),
                                                              (ZERO3_EP_CHECKPOINTED, [], ["--objectives", "itc,itm,mlm"])],
                         ids=["zero2_ep_router_only", "zero3_ep_checkpointed", "zero3_ep_vlmo_objectives"])
def test_resume_continues_the_same_loss_sequence(tmp_path, dirty_manifest, overrides, first_args, both_args):
    steps, interrupted_at = 6, 3
    ds_config = small_ds_config(**overrides)
    if "--objectives" in both_args:  # validated too: every objective's loss on fixed batches
        both_args = [*both_args, "--val-data", dirty_manifest, "--val-interval", interrupted_at]
    full, log = launch_pretrain(tmp_path, tmp_path / "full", ds_config, "--steps", steps,
                                "--save-interval", interrupted_at, *first_args, *both_args, data=dirty_manifest)
    if overrides:
        assert "routing embedding to the router and experts; ZeRO stage 3, expert-parallel size 2, " \
               "activation checkpointing on" in log
    else:
        assert "routing embedding to the router only" in log
    # A run that died after its step-3 checkpoint: same folder state as then.
    run = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", run)
    shutil.rmtree(run / "checkpoints" / f"step_{steps:08d}")
    (run / "checkpoints" / "latest").write_text(f"step_{interrupted_at:08d}")

    resumed, log = launch_pretrain(tmp_path, run, ds_config, "--steps", steps, "--save-interval",
                                   interrupted_at, "--resume", *both_args, data=dirty_manifest)
    assert "resumed from" in log
    if first_args:
        assert "trained with routing_embedding_to_experts False; the resumed run keeps that" in log
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    losses = ("loss", "itc_loss", "itm_loss", "mlm_loss", "aux_loss") if "--objectives" in both_args else LOSSES
    assert all(key in full[-1] for key in losses) and ("image_loss" in full[-1]) == (losses == LOSSES)
    for before, after in zip(full[interrupted_at:], resumed[interrupted_at:]):
        for key in losses + ("lr", ):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (after["step"], key)
    assert resumed == read_metrics(run)
    # The readers' position is one file of each checkpoint, not a copy in every rank's model states.
    checkpoint = run / "checkpoints" / f"step_{steps:08d}"
    position = json.loads((checkpoint / "data_position.json").read_text())
    assert position["layout"]["world_size"] == 2 and len(position["states"]) == 2
    for states in checkpoint.glob("*model_states.pt"):
        assert "data" not in torch.load(states, map_location="cpu", weights_only=False)
    if "--objectives" in both_args:  # consolidation keeps the heads the run trained, and says which objectives
        validated = [record for record in resumed if "val_itc_loss" in record]
        assert [record["step"] for record in validated] == [3, 6] and "val_image_loss" not in validated[0]
        assert all(0 < record[f"val_{name}_loss"] < 20 for record in validated for name in ("itc", "itm", "mlm"))
        assert validated[-1]["val_itm_loss"] == pytest.approx(full[-1]["val_itm_loss"], rel=1e-5)
        assert "objectives itc,itm,mlm" in log
        assert re.search(r"step 6/6  loss [\d.]+  itc [\d.]+  itm [\d.]+  mlm [\d.]+  aux [\d.]+  lr", log)
        result = run_tool("consolidate.py", run / "checkpoints", tmp_path / "weights")
        assert result.returncode == 0, result.stderr
        held = held_model(tmp_path / "weights")
        assert held.head_options == {"objectives": {"itc": 1.0, "itm": 1.0, "mlm": 1.0}}
        names = set(StoredWeights(tmp_path / "weights" / "model.safetensors"))
        assert {"itm_head.weight", "temperature", "text_head.weight", "image_projection.weight"} <= names
        assert "image_head.weight" not in names


def unimodal_data(folder) -> tuple:
    """``images:`` shards of 24 shipped images without captions, and a ``texts:`` corpus of 40 captions."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line) for line in (SHAPES / "manifest.jsonl").read_text().splitlines()[64:104]]
    with tarfile.open(folder / "images.tar", "w") as archive:
        for number, line in enumerate(lines[:24]):
            payload = (SHAPES / line["image"]).read_bytes()
            info = tarfile.TarInfo(f"{number:05d}.png")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": line["caption"]}) + "\n" for line in lines))
    return f"images:{folder / 'images.tar'}", f"texts:{folder / 'corpus.jsonl'}"


# A step whose first micro-batch is text-only and whose second holds pairs would, without the zero gradients that
# unimodal passes give the parameters they do not use, add its image gradients to the previous step's under ZeRO-3
# (the resumed run, with fresh buffers, then differs from the uninterrupted one from step 4 on).
@pytest.mark.parametrize("overrides", [{}, ZERO3_EP_CHECKPOINTED], ids=["zero2_ep", "zero3_ep_checkpointed"])
def test_unimodal_sources_train_and_resume_with_expert_parallelism(tmp_path, dirty_manifest, overrides):
    """Pairs, images alone and texts alone mixed by micro-batch (two a step), each rank on the same modality at once:
    the image-only and text-only encodings route through the expert-parallel MoE layers; a resume continues the
    same losses."""
    images, texts = unimodal_data(tmp_path / "unimodal")
    steps, interrupted_at = 6, 3
    ds_config = small_ds_config(**overrides, gradient_accumulation_steps=2)
    args = ["--steps", steps, "--save-interval", interrupted_at, "--objectives", "msm,mlm", "--data", dirty_manifest,
            images, texts, "--data-weights", 1, 1, 1, "--tokenizer", SHAPES / "tokenizer.json"]
    full, log = launch_pretrain(tmp_path, tmp_path / "full", ds_config, *args)
    assert f"data: {images}, 24 samples in 1 shards, weight 1" in log and f"data: {texts}, 40 lines, weight 1" in log
    assert {"image_loss", "text_loss", "mlm_loss"} <= {key for record in full for key in record}
    # a step of text-only micro-batches has no image loss, one of image-only ones no text loss
    assert any("image_loss" not in record or "mlm_loss" not in record for record in full)
    run = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", run)
    shutil.rmtree(run / "checkpoints" / f"step_{steps:08d}")
    (run / "checkpoints" / "latest").write_text(f"step_{interrupted_at:08d}")
    resumed, log = launch_pretrain(tmp_path, run, ds_config, *args, "--resume")
    assert "resumed from" in log
    for before, after in zip(full[interrupted_at:], resumed[interrupted_at:]):
        losses = [key for key in before if key.endswith("loss")]
        assert losses == [key for key in after if key.endswith("loss")]
        for key in losses + ["lr"]:
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (after["step"], key)


VLMO_TEXT_STAGE = ("encoder.token_embed.*,encoder.token_norm.*,encoder.text_pos,encoder.blocks.*.ffn.text*,"
                   "encoder.norm.*,text_head.*")


def test_vlmo_stagewise_recipe_runs_as_a_sequence_of_runs(tmp_path, dirty_manifest):
    """vlmo-tiny under ZeRO-3: an image stage (images alone, masked image modeling), a text stage from it (texts
    alone, MLM) training only the text parameters, then the image-text stage (itc,itm,mlm) from that; each stage
    consolidated, and the frozen parameters left exactly as the stage before wrote them."""
    images, texts = unimodal_data(tmp_path / "unimodal")
    ds_config = small_ds_config(zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0},
                                eve={"expert_parallel_size": 1})
    common = ["--model", "vlmo-tiny", "--tokenizer", SHAPES / "tokenizer.json", "--steps", 3, "--save-interval", 3]
    stages = [("image", ["--objectives", "msm", "--data", images]),
              ("text", ["--objectives", "mlm", "--data", texts, "--train-only", VLMO_TEXT_STAGE]),
              ("vl", ["--objectives", "itc,itm,mlm", "--data", dirty_manifest])]
    weights = {}
    for number, (stage, args) in enumerate(stages):
        init = ["--init-from", weights[stages[number - 1][0]]] if number else []
        metrics, log = launch_pretrain(tmp_path, tmp_path / stage, ds_config, *common, *args, *init)
        assert "VL-FFN of width 512 in layers [2, 3]" in log and len(metrics) == 3
        result = run_tool("consolidate.py", tmp_path / stage / "checkpoints", tmp_path / f"{stage}_weights")
        assert result.returncode == 0, result.stderr
        weights[stage] = tmp_path / f"{stage}_weights"
        if stage == "text":
            assert re.search(r"initialised from \S+image_weights: the encoder, text_head\n", log), log[-3000:]
            assert re.search(r"--train-only \S+: 0\.\d\dM parameters trained, 1\.\d\dM frozen", log)
        if stage == "vl":
            assert "initialised from" in log and "text_head; new image_projection, itm_head, temperature, text_projection" in log
    before, after = (StoredWeights(weights[stage] / "model.safetensors") for stage in ("image", "text"))
    trained = [pattern for pattern in VLMO_TEXT_STAGE.split(",")]
    import fnmatch
    for name in before:
        if name.startswith("encoder."):
            moved = not torch.equal(before[name], after[name])
            assert moved == any(fnmatch.fnmatchcase(name, pattern) for pattern in trained), name
    assert "image_head.weight" in before and "image_head.weight" not in after
