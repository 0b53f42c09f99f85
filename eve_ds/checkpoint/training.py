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
from eve_ds.checkpoint.manifest import (LATEST, digest_share, is_complete, point_latest, predates_manifests, step_tag,
                                        summary, tags_newest_first, verify_share, write_manifest)

logger = logging.getLogger(__name__)
# Fault injection for tests: "RANK:STEP" makes that rank kill itself with SIGKILL in the middle of that
# step's save, after DeepSpeed wrote the files and before the manifest.
KILL_DURING_SAVE = "EVE_DS_KILL_DURING_SAVE"


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

    def __init__(self, checkpoint_dir, keep: int):
        """``keep``: the newest complete checkpoints kept on disk (0 keeps all)."""
        self.dir, self.keep = Path(checkpoint_dir), keep
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def save(self, engine, step: int, client_state: dict) -> Path:
        started = time.perf_counter()
        tag_dir = self.dir / step_tag(step)
        if self.rank == 0 and tag_dir.exists():  # left by a save that did not finish
            shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag_dir.name, client_state={**client_state, "step": step},
                               save_latest=False)
        dist.barrier()
        if os.environ.get(KILL_DURING_SAVE) == f"{self.rank}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        written = time.perf_counter()
        files = {}
        for part in all_gather_objects(digest_share(tag_dir, self.rank, self.world_size)):
            files.update(part)
        if self.rank == 0:
            write_manifest(tag_dir, files, step)
            point_latest(self.dir, tag_dir)
            remove_old_checkpoints(self.dir, self.keep)
            logger.info("checkpoint %s: %d files, %.2f GiB, written in %.1f s, digested and flushed in %.1f s",
                        tag_dir, len(files), sum(f["bytes"] for f in files.values()) / 2**30, written - started,
                        time.perf_counter() - written)
        dist.barrier()
        return tag_dir

    def resume_point(self, resume: bool, auto_resume: bool):
        """The checkpoint to resume from: with ``resume``, the newest verified one (an error where there is none);
        with ``auto_resume``, that one or None; otherwise None."""
        tag = self.newest_verified() if resume or auto_resume else None
        if resume and tag is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.dir}")
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
