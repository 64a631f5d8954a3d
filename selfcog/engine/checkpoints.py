"""Resumable Trainer checkpoints that are either whole or absent."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

from selfcog.distributed import wait_for_everyone

logger = logging.getLogger(__name__)

CHECKPOINT_DONE = "selfcog-complete"
"""Written into a checkpoint folder once it is complete."""
STAGING = ".checkpoints-staging"
"""The work dir's folder where the Trainer writes a checkpoint before it is renamed into place."""


class AtomicCheckpoints(TrainerCallback):
    """The Trainer writes each `checkpoint-N` into a staging folder (its output_dir, WORK_DIR/.checkpoints-staging);
    `on_save` runs once the save has finished, and then the folder is marked complete and renamed into WORK_DIR —
    one rename, so WORK_DIR only ever holds whole checkpoints. Keeps the newest `keep` (0: all).

    Under torchrun every process writes its own part (RNG state, DeepSpeed shards), so the main process moves the
    folder only once all of them got here. Public callback API only — no private Trainer methods.
    """

    def __init__(self, work_dir: Path, keep: int, main: bool = True):
        self.work_dir, self.keep, self.main = Path(work_dir), keep, main

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()
        staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.main and staged.is_dir():
            (staged / CHECKPOINT_DONE).write_text(str(state.global_step))
            target = self.work_dir / staged.name
            if target.exists():  # the same step saved again after a resume
                shutil.rmtree(target)
            staged.rename(target)
            self.prune()
        wait_for_everyone()
        return control

    def prune(self) -> None:
        done = sorted((f for f in self.work_dir.glob("checkpoint-*") if f.name.split("-")[-1].isdigit()),
                      key=lambda f: int(f.name.split("-")[-1]))
        for old in done[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)


def newest_complete_checkpoint(work_dir: Path, prune: bool = True) -> Path | None:
    """The highest-numbered checkpoint that was fully written; half-written ones are removed when `prune`
    (by the main process only under torchrun)."""
    complete = []
    for folder in Path(work_dir).glob("checkpoint-*"):
        if not folder.name.split("-")[-1].isdigit():
            continue
        if (folder / CHECKPOINT_DONE).exists():
            complete.append(folder)
        elif prune:
            logger.info(f"selfcog: removing half-written {folder}")
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete, key=lambda f: int(f.name.split("-")[-1]), default=None)
