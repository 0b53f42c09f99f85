"""The fine-tuning job's own rules, without launches (tests/test_finetune_jobs.py launches it)."""
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from eve_ds.config import PRESETS, ConfigError, preset
from eve_ds.data import TextTokenizer
from eve_ds.errors import UsageError
from eve_ds.finetune.tasks import TASKS, load_task, sharded_map
from eve_ds.finetune.train import (FinetuningJob, epoch_batches, fine_tuning_deepspeed_config, open_tokenizer, paper_layout,
                                   parse_args, preset_name, trained_head_options)
from tests.conftest import REPO, SHAPES, run_tool
from tests.test_consolidate import write_stage0_checkpoint
from tests.test_tokenizer import roberta_style_tokenizer


def take(batches, count):
    return [next(batches) for _ in range(count)]


def test_epoch_batches_share_each_epoch_out_equally_and_resume_mid_epoch():
    size, micro_batch, world_size = 23, 3, 2  # 11 per rank, 9 in whole micro-batches
    ranks = [take(epoch_batches(size, micro_batch, rank, world_size, seed=4, start=0), 6) for rank in range(2)]
    epoch0 = [index for rank in ranks for batch in rank[:3] for epoch, index in batch]
    assert len(epoch0) == len(set(epoch0)) == 18 and all(epoch == 0 for rank in ranks for b in rank[:3] for epoch, _ in b)
    assert all(epoch == 1 for rank in ranks for batch in rank[3:] for epoch, _ in batch)
    assert take(epoch_batches(size, micro_batch, 1, world_size, seed=4, start=4), 2) == ranks[1][4:6]
    with pytest.raises(ValueError, match="no micro-batch"):
        next(epoch_batches(5, 3, 0, 2, seed=0, start=0))


def test_each_tasks_tiny_example_loads_without_problems():
    args = parse_args(["--task", "vqa", "--pretrained", "unused"])
    tokenizer = TextTokenizer(SHAPES / "tokenizer.json", 40)
    for task_name in TASKS:
        task = load_task(task_name, args, tokenizer, 32, seed=0)
        assert not task.problems, task_name
        item = task.train[0]
        assert item["text_ids"].shape == (40, ) and item["images"].shape[-2:] == (32, 32)


def test_sharded_map_in_one_process_keeps_the_order():
    assert torch.equal(sharded_map(lambda indices: indices * 2, 7, 3, "cpu"), torch.arange(7) * 2)


def test_recipes_follow_the_size_of_the_weights_and_metrics_print_as_in_the_paper():
    assert preset_name(PRESETS["eve-large"]) == "eve-large" and preset_name(PRESETS["eve-tiny"]) == "eve-tiny"
    assert paper_layout("nlvr2", {"accuracy": 81.25}, "val") == "NLVR2 accuracy (val): 81.25"
    recalls = Counter({f"{prefix}{direction}_r@{k}": 10.0 * k for prefix in ("", "itc_") for direction in ("tr", "ir")
                       for k in (1, 5, 10)})
    recalls.update({"r_mean": 53.3, "itc_r_mean": 53.3})
    table = paper_layout("retrieval", recalls, "test")
    assert "dual encoder" in table and table.count("100.0") == 4


def test_a_config_whose_fixed_micro_batch_misses_the_global_batch_is_refused(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}))
    args = SimpleNamespace(deepspeed_config=path, expert_parallel_size=None)
    with pytest.raises(ConfigError, match="global batch of 32, not the 128 asked for"):
        fine_tuning_deepspeed_config(args, 2, PRESETS["eve-tiny"], 128)
    ds_config, _ = fine_tuning_deepspeed_config(args, 2, PRESETS["eve-tiny"], 32)
    assert ds_config["train_batch_size"] == 32


def test_expert_parallel_size_on_the_command_line_replaces_the_configs():
    shipped = REPO / "ds_configs" / "finetune_vqa.json"
    _, parallelism = fine_tuning_deepspeed_config(SimpleNamespace(deepspeed_config=shipped, expert_parallel_size=None),
                                                  2, PRESETS["eve-tiny"], 32)
    assert parallelism.expert_parallel_size == 2
    _, parallelism = fine_tuning_deepspeed_config(SimpleNamespace(deepspeed_config=shipped, expert_parallel_size=1),
                                                  1, PRESETS["eve-tiny"], 32)
    assert parallelism.expert_parallel_size == 1
    assert parse_args(["--task", "vqa", "--pretrained", "x", "--expert-parallel-size", "1"]).expert_parallel_size == 1


def test_fine_tuning_takes_the_tokenizer_and_its_roles_from_the_consolidated_weights(tmp_path):
    """A run pre-trained with a tokenizer of its own: its checkpoint holds the tokenizer, consolidation carries it
    on, and fine-tuning with README's command (no --tokenizer) encodes with it and its roles."""
    foreign = TextTokenizer(roberta_style_tokenizer(tmp_path / "foreign.json", with_mask=False), 40, {"mask": "c"})
    write_stage0_checkpoint(tmp_path / "checkpoints", preset("eve-tiny").replace(vocab_size=foreign.vocab_size),
                            tokenizer=foreign)
    assert run_tool("consolidate.py", tmp_path / "checkpoints", tmp_path / "consolidated").returncode == 0
    pretrained = ["--task", "vqa", "--pretrained", str(tmp_path / "consolidated")]
    chosen = open_tokenizer(parse_args(pretrained), 40)
    assert chosen.path == tmp_path / "consolidated" / "tokenizer.json" and chosen.vocab_size == 9
    assert (chosen.cls_id, chosen.sep_id, chosen.pad_id, chosen.mask_id, chosen.unk_id) == (5, 7, 3, 8, 2)
    assert open_tokenizer(parse_args([*pretrained, "--special-token", "mask=b"]), 40).mask_id == 6  # over the saved
    explicit = open_tokenizer(parse_args([*pretrained, "--tokenizer", str(SHAPES / "tokenizer.json")]), 40)
    assert explicit.path == SHAPES / "tokenizer.json" and explicit.mask_id == 4  # --tokenizer wins, with its own roles
    assert open_tokenizer(parse_args(["--task", "vqa", "--pretrained", str(tmp_path)]), 40).path == \
        SHAPES / "tokenizer.json"  # weights without a tokenizer: the shipped one


@pytest.mark.parametrize("option, value, wanted", [
    ("--epochs", "0", "an integer above 0"), ("--lr", "0", "a number above 0"),
    ("--batch-size", "0", "an integer above 0"), ("--lr-multiplier", "0", "a number above 0"), ("--save-interval", "0", "an integer above 0"),
    ("--eval-interval", "0", "an integer above 0"),
    ("--log-interval", "0", "an integer above 0"), ("--keep-checkpoints", "-1", "an integer of at least 0"),
    ("--eval-batch-size", "0", "an integer above 0"), ("--k-test", "0", "an integer above 0"),
    ("--image-size", "0", "an integer above 0"), ("--num-workers", "-1", "an integer of at least 0"),
    ("--aux-weight", "-0.5", "a number of at least 0"), ("--lr", "nan", "a number above 0"),
    ("--epochs", "-3", "an integer above 0")])
def test_options_that_cannot_work_are_refused_in_one_sentence(option, value, wanted):
    with pytest.raises(UsageError, match=rf"^argument {option}: wants {wanted}, got '{value}'$"):
        parse_args(["--task", "vqa", "--pretrained", "unused", option, value])


@pytest.mark.parametrize("interval, evaluated", [(None, [4, 8, 10]), ("3", [3, 6, 9, 10]), ("1000", [10])])
def test_evaluation_comes_every_epoch_or_every_eval_interval_steps_and_always_at_the_end(interval, evaluated):
    args = parse_args(["--task", "vqa", "--pretrained", "unused", *(["--eval-interval", interval] if interval else [])])
    args.steps = 10
    job = FinetuningJob(None, None, args, steps_per_epoch=4, client_state={}, k_test=None)
    job.evaluate = lambda step: {"accuracy": float(step)}
    records = {step: job.step_record(step, {}, 0.1) for step in range(1, 11)}
    assert [step for step, record in records.items() if "val_accuracy" in record] == evaluated
    assert all(record == {"epoch": step / 4} for step, record in records.items() if step not in evaluated)


def test_zero_is_a_value_where_it_means_something():
    args = parse_args(["--task", "vqa", "--pretrained", "unused", "--keep-checkpoints", "0", "--num-workers", "0",
                       "--aux-weight", "0"])
    assert (args.keep_checkpoints, args.num_workers, args.aux_weight) == (0, 0, 0.0)
    with pytest.raises(UsageError, match="--special-token: wants ROLE=TOKEN, got 'mask'"):
        parse_args(["--task", "vqa", "--pretrained", "unused", "--special-token", "mask"])
    with pytest.raises(UsageError, match="--special-token: unknown role 'bos'; the roles are cls, sep, pad, mask, unk"):
        parse_args(["--task", "vqa", "--pretrained", "unused", "--special-token", "bos=<s>"])


def test_evaluation_takes_the_head_a_run_trained_with_from_its_checkpoint():
    def trained(states, task, asked):
        return trained_head_options(states, task, asked, "runs/x/checkpoints/step_1")
    assert trained({}, "nlvr2", {"head": "biattn"}) == {"head": "biattn"}  # nothing saved: as asked
    assert trained({"head_options": {}}, "nlvr2", {"head": "biattn"}) == {"head": "mlp"}  # before the choice
    assert trained({"head_options": {"head": "biattn"}}, "nlvr2", {"head": "mlp"}) == {"head": "biattn"}
    assert trained({"head_options": {}}, "retrieval", {}) == {}
    with pytest.raises(UsageError, match="holds a vqa head with num_answers 9, but this job's data makes num_answers 7"):
        trained({"head_options": {"num_answers": 9}}, "vqa", {"num_answers": 7})
