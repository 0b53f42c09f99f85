"""The DeepSpeed checkpoints of a run folder: saved so that a crash never leaves a checkpoint that counts
but does not load, and chosen for resuming by verifying them, newest first.

Collective: every rank calls ``save`` and ``newest_verified`` together.
"""
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch.distributed as dist

from eve_ds.checkpoint.consolidate import CheckpointError
from eve_ds.engine import all_gather_objects
from eve_ds.checkpoint.manifest import (LATEST, checkpoint_bytes, digest_share, is_complete, manifest_layout,
                                        point_latest, predates_manifests, step_tag, summary, tags_newest_first,
                                        verify_share, write_manifest)

logger = logging.getLogger(__name__)
# Fault injection for tests: "RANK:STEP" makes that rank kill itself with SIGKILL in the middle of that
# step's save, after DeepSpeed wrote the files and before the manifest.
KILL_DURING_SAVE = "EVE_DS_KILL_DURING_SAVE"
# DeepSpeed copies these into every checkpoint; they cannot read eve-ds's experts, so they are replaced by a
# pointer to the tool that can.
DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
RECOVERY_POINTER = '''"""These are eve-ds checkpoints: DeepSpeed's own {name} cannot read their experts. Use eve-ds's tools:
    python tools/consolidate.py CHECKPOINTS_DIR OUT [--tag TAG]   # weights for fine-tuning
    python tools/reshard.py CHECKPOINTS_DIR OUT [--tag TAG]       # to resume at another world size
"""
import sys

sys.exit(__doc__)
'''
LAYOUT_KEYS = ("world_size", "expert_parallel_size", "zero_stage", "precision")


def run_layout(world_size: int, expert_parallel_size: int, ds_config: dict) -> dict:
    """What a checkpoint of a job is only loadable at (LAYOUT_KEYS)."""
    precision = next((name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled")), "fp32")
    return {"world_size": world_size, "expert_parallel_size": expert_parallel_size,
            "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0), "precision": precision}


def describe_layout(layout: dict) -> str:
    ranks = layout["world_size"]
    return (f"{ranks} rank{'s' * (ranks != 1)}, expert-parallel size {layout['expert_parallel_size']}, ZeRO stage "
            f"{layout['zero_stage']}, {layout['precision']}")


def check_run_folder(checkpoint_dir, resume: bool, auto_resume: bool, resume_from, layout: dict):
    """What can be known of a run folder's checkpoints before any rank starts, checked: a fresh start into a folder
    that holds a run's checkpoints (it would replace them), ``--resume`` where there is none, and a checkpoint of
    another layout of ranks, which DeepSpeed cannot load."""
    checkpoint_dir = Path(checkpoint_dir)
    tags = tags_newest_first(checkpoint_dir)
    complete = [tag for tag in tags if is_complete(tag)] or ([checkpoint_dir / LATEST] if tags and (
        checkpoint_dir / LATEST).is_file() else [])  # checkpoints from before manifests: 'latest' names one
    out = checkpoint_dir.parent
    if resume_from is not None and complete:
        raise CheckpointError(f"{out} already holds the checkpoints of a run ({complete[0].name}): continue it with "
                              f"--resume or --auto-resume, or start from {resume_from} with another --out")
    if not (resume or auto_resume or resume_from):
        if complete:
            raise CheckpointError(f"{out} already holds the checkpoints of a run ({complete[0].name}), which a fresh "
                                  f"start would replace: continue it with --resume or --auto-resume, or choose "
                                  f"another --out")
        return
    if resume and not complete:
        raise CheckpointError(f"--resume: {checkpoint_dir} holds no complete checkpoint; start without --resume "
                              f"(--auto-resume starts or resumes, whichever applies)")
    saved = manifest_layout(complete[0]) if complete and complete[0].is_dir() else None
    if saved and {key: saved.get(key) for key in LAYOUT_KEYS} != {key: layout[key] for key in LAYOUT_KEYS}:
        raise CheckpointError(f"{complete[0]} was written by {describe_layout(saved)}, and this job has "
                              f"{describe_layout(layout)}: DeepSpeed loads a checkpoint only at its own layout; "
                              f"reshard it (python tools/reshard.py {checkpoint_dir} UNIVERSAL) and start with "
                              f"--resume-from UNIVERSAL and another --out")


def _human(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def remove_old_checkpoints(checkpoint_dir: Path, keep: int):
    """Keeps the newest ``keep`` complete checkpoints (all for 0) and removes every folder older than the
    oldest of them, incomplete ones included; so the last complete checkpoint is never removed, and a newer
    incomplete one never counts in its place."""
    tags = tags_newest_first(checkpoint_dir)
    kept = [tag for tag in tags if is_complete(tag)][:keep]
    if keep <= 0 or not kept:
        return
    for tag in tags[tags.index(kept[-1]) + 1:]:
        shutil.rmtree(tag, ignore_errors=True)


class RunCheckpoints:

    def __init__(self, checkpoint_dir, keep: int, layout: dict = None, parameters: int = None):
        """``keep``: the newest complete checkpoints kept on disk (0 keeps all); ``layout``: what the manifests
        record of the job (LAYOUT_KEYS); ``parameters``: the model's, for what a first checkpoint will need."""
        self.dir, self.keep, self.layout, self.parameters = Path(checkpoint_dir), keep, layout, parameters
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def save(self, engine, step: int, client_state: dict, write_files=None) -> Path:
        """``write_files(folder)``, on rank 0, adds files of the job's own (its tokenizer) to the checkpoint."""
        started = time.perf_counter()
        tag_dir = self.dir / step_tag(step)
        if self.rank == 0 and tag_dir.exists():
            self._clear(tag_dir)
        dist.barrier()
        try:
            engine.save_checkpoint(str(self.dir), tag=tag_dir.name, client_state={**client_state, "step": step},
                                   save_latest=False)
            if self.rank == 0:
                for name in DEEPSPEED_RECOVERY_SCRIPTS:  # DeepSpeed puts them beside the checkpoint folders
                    if (self.dir / name).exists():
                        (self.dir / name).write_text(RECOVERY_POINTER.format(name=name))
                if write_files is not None:
                    write_files(tag_dir)
            dist.barrier()
            if os.environ.get(KILL_DURING_SAVE) == f"{self.rank}:{step}":
                os.kill(os.getpid(), signal.SIGKILL)
            written = time.perf_counter()
            files = {}
            for part in all_gather_objects(digest_share(tag_dir, self.rank, self.world_size)):
                files.update(part)
            if self.rank == 0:
                write_manifest(tag_dir, files, step, self.layout)
        except (OSError, RuntimeError) as error:
            failure = self._out_of_space(tag_dir, error)
            if failure is None:
                raise
            raise failure from error
        if self.rank == 0:
            point_latest(self.dir, tag_dir)
            remove_old_checkpoints(self.dir, self.keep)
            logger.info("checkpoint %s: %d files, %.2f GiB, written in %.1f s, digested and flushed in %.1f s",
                        tag_dir, len(files), sum(f["bytes"] for f in files.values()) / 2**30, written - started,
                        time.perf_counter() - written)
        dist.barrier()
        return tag_dir

    def _clear(self, tag_dir: Path):
        """Makes way for a save at a step that has a folder already: a save that did not finish is removed; a
        complete checkpoint (one that failed verification, passed over on resuming) is kept aside, never deleted."""
        if not is_complete(tag_dir):
            shutil.rmtree(tag_dir)
            return
        aside = tag_dir.with_name(f"{tag_dir.name}.damaged")
        number = 1
        while aside.exists():
            number += 1
            aside = tag_dir.with_name(f"{tag_dir.name}.damaged-{number}")
        tag_dir.rename(aside)
        logger.warning("%s failed verification when the run resumed; kept as %s, and this step is saved anew",
                       tag_dir, aside.name)

    def _out_of_space(self, tag_dir: Path, error: Exception):
        """The error to raise for a save that failed on a full filesystem (torch's writer says only "iostream
        error"), naming what a checkpoint needs; None for any other failure."""
        free = shutil.disk_usage(self.dir).free
        previous = next((tag for tag in tags_newest_first(self.dir) if tag != tag_dir and is_complete(tag)), None)
        if previous is not None:
            needed = checkpoint_bytes(previous)
            need = f", and a checkpoint of this run takes {_human(needed)}"
        else:  # fp32 weights or masters and two AdamW moments per parameter, and under ZeRO 0-2 the module's weights
            needed = 16 * (self.parameters or 0)
            need = f", and a checkpoint of this model takes up to {_human(needed)}" if needed else ""
        if free > max(needed, 2**20) and "No space left" not in str(error):
            return None
        failure = CheckpointError(f"no space left on the filesystem of {self.dir} while rank {self.rank} wrote "
                                  f"{tag_dir.name} ({_human(free)} free{need}): free space there or give the run "
                                  f"more (the incomplete {tag_dir.name} is skipped on resuming)")
        failure.only_here = True
        return failure

    def resume_point(self, resume: bool, auto_resume: bool):
        """The checkpoint to resume from: with ``resume``, the newest verified one (an error where there is none);
        with ``auto_resume``, that one or None; otherwise None."""
        tag = self.newest_verified() if resume or auto_resume else None
        if resume and tag is None:
            raise CheckpointError(f"--resume: {self.dir} holds no complete checkpoint")
        return tag

    def newest_verified(self):
        """The newest checkpoint folder whose files all match its manifest, or None when the run has none.
        Damaged or incomplete ones are passed over with a warning naming the bad file. A run whose
        checkpoints predate manifests resumes from ``latest`` unverified, with a warning."""
        tags = tags_newest_first(self.dir)
        if tags and predates_manifests(self.dir):
            latest = self.dir / LATEST
            if not latest.is_file():
                return None
            tag = self.dir / latest.read_text().strip()
            self._warn(f"{self.dir}: its checkpoints were written before manifests existed; resuming from "
                       f"{tag.name} without verifying it")
            return tag
        damaged = []
        for tag in tags:
            if not is_complete(tag):
                self._warn(f"{tag}: incomplete (no manifest: its save did not finish); skipped")
                continue
            started = time.perf_counter()
            problems = [problem for part in all_gather_objects(verify_share(tag, self.rank, self.world_size))
                        for problem in part]
            if not problems:
                if damaged:
                    self._warn(f"resuming from the previous complete checkpoint, {tag}")
                if self.rank == 0:
                    logger.info("verified %s against its manifest in %.1f s", tag, time.perf_counter() - started)
                return tag
            damaged.append(tag)
            self._warn(f"{tag}: damaged, {summary(problems)}; falling back to an earlier checkpoint")
        if damaged:
            raise CheckpointError(f"{self.dir}: no checkpoint verifies against its manifest (damaged: "
                                  f"{', '.join(tag.name for tag in damaged)})")
        return None

    def _warn(self, message: str):
        if self.rank == 0:
            logger.warning(message)
