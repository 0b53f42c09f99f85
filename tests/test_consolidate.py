"""tools/consolidate.py on real checkpoints of short 2-rank pre-training runs, good and damaged, and on
checkpoints written by hand in DeepSpeed's ZeRO-0 layout (no launch)."""
import json
import shutil
from functools import partial

import pytest
import torch

from eve_ds.checkpoint import CheckpointError, consolidate, load_pretrained
from eve_ds.checkpoint import pretrained
from eve_ds.checkpoint.consolidate import DENSE_STATES, EXPERT_STATES, saved_model_config
from eve_ds.checkpoint.manifest import LATEST, MANIFEST
from eve_ds.config import ConfigError, preset
from eve_ds.data.tokenizer import SPECIAL_TOKENS_FILE, TOKENIZER_FILE, TextTokenizer
from eve_ds.model import EVE
from eve_ds.objectives import PretrainingModel
from tests.conftest import launch_pretrain, run_tool, small_ds_config
from tests.test_tokenizer import roberta_style_tokenizer

ZERO3 = {"zero_optimization": {"stage": 3}, "eve": {"expert_parallel_size": 2}}


@pytest.fixture(scope="module", params=["zero2_ep", "zero3_ep"])
def run(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    overrides = ZERO3 if request.param == "zero3_ep" else {}
    launch_pretrain(tmp_path, tmp_path / "run", small_ds_config(**overrides), "--steps", 3, "--save-interval", 1,
                    "--keep-checkpoints", 3)
    return tmp_path / "run" / "checkpoints"


consolidate_cli = partial(run_tool, "consolidate.py")
reshard_cli = partial(run_tool, "reshard.py")


@pytest.mark.distributed
def test_cli_writes_weights_that_load_into_the_model(run, tmp_path):
    result = consolidate_cli(run, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "step 3" in result.stdout
    state_dict, config = load_pretrained(tmp_path / "out")
    description = json.loads((tmp_path / "out" / "config.json").read_text())
    assert description["source"]["step"] == 3 and description["dtype"] == "float32"
    assert all(tensor.dtype == torch.float32 for tensor in state_dict.values())
    full = PretrainingModel.from_pretrained(tmp_path / "out")
    encoder = EVE.from_pretrained(tmp_path / "out")
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, full.encoder.state_dict()[name], rtol=0, atol=0)
    experts = [state_dict[f"encoder.blocks.2.ffn.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"]
               for e in range(config.num_experts)]
    assert all(not torch.equal(experts[0], other) for other in experts[1:])

    older = consolidate(run, tag="step_00000001")
    assert older.step == 1
    assert any(not torch.equal(older.state_dict[k], v) for k, v in state_dict.items())

    assert consolidate_cli(run, tmp_path / "bf16", "--dtype", "bf16").returncode == 0
    bf16, _ = load_pretrained(tmp_path / "bf16")
    assert all(tensor.dtype == torch.bfloat16 for tensor in bf16.values())


@pytest.mark.distributed
def test_checkpoints_from_before_the_routing_switch_load_as_router_only(run, tmp_path):
    assert consolidate(run).model_config == saved_model_config(run)
    assert saved_model_config(run).routing_embedding_to_experts  # the default, recorded
    old, tag_dir = damaged_copy(run, tmp_path)
    states_path = next(tag_dir / name for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt",
                                                   "mp_rank_00_model_states.pt") if (tag_dir / name).is_file())
    states = torch.load(states_path, weights_only=False)
    del states["model_config"]["routing_embedding_to_experts"]
    torch.save(states, states_path)
    assert not saved_model_config(old).routing_embedding_to_experts
    assert consolidate_cli(old, tmp_path / "out").returncode == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_config"]["routing_embedding_to_experts"] is False
    assert all(not moe.routing_embedding_to_experts for moe in EVE.from_pretrained(tmp_path / "out").moe_layers())


def damaged_copy(run, tmp_path, manifests=False):
    """A copy of the run's checkpoints to damage; without manifests it is a checkpoint as written before
    they existed, whose files the readers themselves must check."""
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    if not manifests:
        for manifest in copy.glob(f"*/{MANIFEST}"):
            manifest.unlink()
    return copy, copy / (copy / "latest").read_text().strip()


@pytest.mark.distributed
def test_checkpoints_that_do_not_verify_against_their_manifest_are_refused(run, tmp_path):
    result = consolidate_cli(run, tmp_path / "good")
    assert result.returncode == 0 and "not verified" not in result.stdout  # a complete checkpoint verifies, silently
    checkpoints, tag_dir = damaged_copy(run, tmp_path, manifests=True)
    victim = next(tag_dir.glob("zero_pp_rank_1_*optim_states.pt"))
    intact = victim.read_bytes()
    victim.write_bytes(intact[:1000])
    for tool in (consolidate_cli, reshard_cli):
        result = tool(checkpoints, tmp_path / "out")
        assert result.returncode == 2 and f"{victim}: 1000 bytes, the manifest says {len(intact)}" in result.stderr
    victim.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))  # same size, one bit flipped
    result = consolidate_cli(checkpoints, tmp_path / "out")
    assert result.returncode == 2 and f"{victim}: SHA-256 differs from the manifest" in result.stderr
    victim.unlink()
    result = consolidate_cli(checkpoints, tmp_path / "out")
    assert result.returncode == 2 and f"{victim}: missing" in result.stderr
    (tag_dir / MANIFEST).unlink()  # a save that did not finish, beside complete checkpoints
    result = consolidate_cli(checkpoints, tmp_path / "out")
    assert result.returncode == 2 and "incomplete (no manifest" in result.stderr
    assert not (tmp_path / "out").exists()
    result = consolidate_cli(checkpoints, tmp_path / "out", "--tag", "step_00000002")  # an older one still works
    assert result.returncode == 0, result.stderr


@pytest.mark.distributed
def test_damaged_checkpoints_get_one_clear_error_and_no_output(run, tmp_path):
    checkpoints, tag_dir = damaged_copy(run, tmp_path)
    result = consolidate_cli(checkpoints, tmp_path / "out")
    assert result.returncode == 0 and "written before checkpoints had manifests" in result.stdout
    shutil.rmtree(tmp_path / "out")
    victim = next(tag_dir.glob("zero_pp_rank_1_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    result = consolidate_cli(checkpoints, tmp_path / "out")
    assert result.returncode == 2
    assert victim.name in result.stderr and "cannot be read" in result.stderr
    assert not (tmp_path / "out").exists()

    victim.unlink()
    result = consolidate_cli(checkpoints, tmp_path / "out")
    assert result.returncode == 2 and victim.name in result.stderr and "missing" in result.stderr

    if (tag_dir / "mp_rank_00_model_states.pt").exists():  # ZeRO 1-2 write one file per expert
        shutil.copy(run / tag_dir.name / victim.name, victim)
        expert_file = next(tag_dir.glob("layer_1_expert_3_*"))
        expert_file.write_bytes(expert_file.read_bytes()[:1000])
        result = consolidate_cli(checkpoints, tmp_path / "out")
        assert result.returncode == 2 and expert_file.name in result.stderr and "cannot be read" in result.stderr
        expert_file.unlink()
        result = consolidate_cli(checkpoints, tmp_path / "out")
        assert result.returncode == 2 and expert_file.name in result.stderr and "missing" in result.stderr
        assert not (tmp_path / "out").exists()

    result = consolidate_cli(tmp_path, tmp_path / "out")
    assert result.returncode == 2 and "not a DeepSpeed checkpoint" in result.stderr
    result = consolidate_cli(checkpoints, tmp_path / "out", "--tag", "step_99")
    assert result.returncode == 2 and "'step_99' does not exist" in result.stderr


@pytest.mark.distributed
def test_checkpoint_of_another_model_size_is_refused(run, tmp_path):
    checkpoints, tag_dir = damaged_copy(run, tmp_path)
    states_path = next(p for p in sorted(tag_dir.glob("*model_states.pt")) if not p.name.startswith("layer_"))
    states = torch.load(states_path, weights_only=False)
    states["model_config"]["hidden_size"] = 256  # claims another size than its weights have
    torch.save(states, states_path)
    with pytest.raises(CheckpointError, match="does not match its model config"):
        consolidate(checkpoints)


@pytest.mark.distributed
def test_loading_into_another_model_reports_keys(run, tmp_path):
    assert consolidate_cli(run, tmp_path / "out").returncode == 0
    description = json.loads((tmp_path / "out" / "config.json").read_text())
    description["model_config"]["num_layers"] = 3
    description["model_config"]["moe_layers"] = [2]
    (tmp_path / "out" / "config.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match=r"does not fit the model:\n  \d+ unexpected: blocks.3"):
        EVE.from_pretrained(tmp_path / "out")


@pytest.mark.distributed
def test_truncated_weights_file_is_refused_by_name(run, tmp_path):
    assert consolidate_cli(run, tmp_path / "out").returncode == 0
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot be read \(.*not fully covered"):
        EVE.from_pretrained(tmp_path / "out")


@pytest.mark.distributed
def test_interrupted_write_leaves_no_partial_file(run, tmp_path, monkeypatch):
    checkpoint = consolidate(run)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as partial:
            partial.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrained.save_pretrained(tmp_path / "out", checkpoint.state_dict, checkpoint.model_config)
    assert list((tmp_path / "out").iterdir()) == []


def write_stage0_checkpoint(checkpoints, config, step: int = 1, tokenizer: TextTokenizer = None):
    """A checkpoint in DeepSpeed's ZeRO-0 layout, written by hand (random weights, no manifest, as before manifests
    existed): the dense weights, one file per (MoE layer, expert), and ``latest``; with ``tokenizer``, its files as
    the pre-training loop saves them. Returns the tag folder."""
    tag_dir = checkpoints / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    weights = PretrainingModel(config).state_dict()
    for layer, block in enumerate(config.moe_layers):
        for expert in range(config.num_experts):
            prefix = f"encoder.blocks.{block}.ffn.deepspeed_moe.experts.deepspeed_experts.{expert}."
            torch.save({name: weights.pop(name) for name in list(weights) if name.startswith(prefix)},
                       tag_dir / EXPERT_STATES.format(layer=layer, expert=expert))
    torch.save({"module": weights, "model_config": config.to_dict(), "step": step}, tag_dir / DENSE_STATES)
    if tokenizer is not None:
        tokenizer.save(tag_dir)
    (checkpoints / LATEST).write_text(tag_dir.name)
    return tag_dir


def test_consolidation_carries_the_runs_tokenizer_and_notes_its_absence(tmp_path):
    tokenizer = TextTokenizer(roberta_style_tokenizer(tmp_path / "foreign.json", with_mask=False), 40, {"mask": "c"})
    config = preset("eve-tiny").replace(vocab_size=tokenizer.vocab_size)
    tag_dir = write_stage0_checkpoint(tmp_path / "checkpoints", config, tokenizer=tokenizer)
    result = consolidate_cli(tmp_path / "checkpoints", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for name in (TOKENIZER_FILE, SPECIAL_TOKENS_FILE):
        assert (tmp_path / "out" / name).read_bytes() == (tag_dir / name).read_bytes()
    assert TextTokenizer.from_folder(tmp_path / "out", 40).mask_id == 8 and "tokenizer" not in result.stdout

    for name in (TOKENIZER_FILE, SPECIAL_TOKENS_FILE):
        (tag_dir / name).unlink()
    result = consolidate_cli(tmp_path / "checkpoints", tmp_path / "bare")
    assert result.returncode == 0, result.stderr
    assert f"note: {tag_dir} holds no tokenizer.json: give fine-tuning the tokenizer the run trained with " \
           "(--tokenizer)" in result.stdout
    assert not (tmp_path / "bare" / TOKENIZER_FILE).exists()

    TextTokenizer(roberta_style_tokenizer(tmp_path / "other.json"), 40).save(tag_dir)  # 10 tokens, the table has 9
    with pytest.raises(ConfigError, match="has 10 tokens but the token table of .* has 9 rows"):
        consolidate(tmp_path / "checkpoints")


@pytest.mark.parametrize("tool", ["consolidate.py", "reshard.py"])
def test_an_empty_latest_file_or_a_missing_folder_is_one_sentence(tool, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_stage0_checkpoint(checkpoints, preset("eve-tiny").replace(vocab_size=20), step=2)
    (checkpoints / "step_00000001").mkdir()  # an empty folder is no checkpoint
    (checkpoints / LATEST).write_text("\n")
    result = run_tool(tool, checkpoints, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{checkpoints / LATEST} is empty, so it names no checkpoint; pass --tag with one of step_00000002\n" \
        in result.stderr
    result = run_tool(tool, tmp_path / "absent", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'absent'}: no such checkpoints folder" in result.stderr
    result = run_tool(tool, checkpoints, tmp_path / "out", "--tag", "step_7")
    assert result.returncode == 2 and "'step_7' does not exist; pass --tag with one of step_00000002" in result.stderr
    assert not (tmp_path / "out").exists()
