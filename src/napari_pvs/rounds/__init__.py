"""Fine-tuning rounds of an annotation project: snapshot, train, validate, re-predict, re-rank.

A round has three parts, so that the training can run in another process:

1. :func:`prepare_round` (``prepare``/``snapshot``, the process holding the project): freezes
   the accepted annotations (ledger row ``running`` with their ids) and copies their image and
   label crops into ``rounds/r<N>/snapshot.zarr`` — labels inside each box, 255 outside it,
   and 255 on every voxel of a validation box in a training crop. Accepts made later go to
   the next round.
2. :func:`execute_round` (``execute``, ``validation``, ``repredict``; a worker, or
   in-process): reads only the snapshot, fine-tunes the current version (or a fresh model)
   with :func:`napari_pvs.training.fit`, scores the base and the new model on the validation
   crops, writes ``models/v<N>.safetensors``, predicts the volumes that have annotations or a
   queue into ``rounds/r<N>/predictions/`` and ranks them. It never writes the ledger.
3. :func:`commit_round` (``commit``, the project's process): moves the predictions into place
   and commits the version, ``current``, the round status and the new queues in one
   transaction.

:func:`run_round` (``run``) does all three in this process (the CLI, benchmarks,
``torchrun``); :func:`start_round` (``handle``) runs part 2 in a spawned worker process
(``worker``) and returns a :class:`RoundHandle`, so a crash, an out-of-memory kill or a cancel
of the worker cannot take the caller down or damage the ledger: the previous version stays
current and the round is marked failed or cancelled with a message.

``python -m napari_pvs.rounds PROJECT [--steps ...]`` (``command``, ``__main__``) runs one
round; under ``torchrun --nproc_per_node N -m napari_pvs.rounds PROJECT`` every process trains
its share of each batch (DDP inside ``training.fit``), and only rank 0 opens the project,
writes files and commits.
"""

from napari_pvs.rounds.command import (
    add_round_arguments,
    config_from_args,
    format_event,
    format_outcome,
    main,
    run_command,
)
from napari_pvs.rounds.commit import abandon_round, commit_round
from napari_pvs.rounds.config import Event, RoundConfig, RoundOutcome
from napari_pvs.rounds.execute import STEPS_PER_EPOCH, execute_round
from napari_pvs.rounds.handle import CANCEL_GRACE_S, RoundHandle, start_round
from napari_pvs.rounds.prepare import prepare_round
from napari_pvs.rounds.run import run_round
from napari_pvs.rounds.snapshot import SNAPSHOT_CONTEXT, load_snapshot
from napari_pvs.rounds.validation import validation_counts, validation_dice

__all__ = [
    "CANCEL_GRACE_S",
    "SNAPSHOT_CONTEXT",
    "STEPS_PER_EPOCH",
    "Event",
    "RoundConfig",
    "RoundHandle",
    "RoundOutcome",
    "abandon_round",
    "add_round_arguments",
    "commit_round",
    "config_from_args",
    "execute_round",
    "format_event",
    "format_outcome",
    "load_snapshot",
    "main",
    "prepare_round",
    "run_command",
    "run_round",
    "start_round",
    "validation_counts",
    "validation_dice",
]
