"""Training and fine-tuning on labelled 3D patches or whole labelled volumes.

Labels are uint8: 1 = PVS, 0 = not PVS, 255 = unlabelled (ignored by the loss and by
validation). The package's modules, one concept each: ``data`` (training volumes and their
split), ``config`` (what decides a run, what it returns), ``sampling`` (patch centres and the
seeded batches), ``augmentation``, ``losses``, ``validation``, ``checkpointing`` (best and
resumable checkpoints), ``distributed`` (torchrun/DDP), ``loop`` (:func:`fit`) and
``calibration`` (test-time mirrorings and the smallest cluster kept).
"""

from napari_pvs.training.augmentation import augment
from napari_pvs.training.calibration import calibrate_segmentation
from napari_pvs.training.checkpointing import last_checkpoint_path
from napari_pvs.training.config import TrainConfig, TrainResult
from napari_pvs.training.data import UNLABELLED, TrainingVolume, split_volumes
from napari_pvs.training.distributed import (
    TORCHRUN_VARIABLES,
    DistributedContext,
    distributed_context,
)
from napari_pvs.training.loop import fit
from napari_pvs.training.losses import distributed_masked_loss, labelled_dice, masked_loss
from napari_pvs.training.validation import evaluate_patches

__all__ = [
    "TORCHRUN_VARIABLES",
    "UNLABELLED",
    "DistributedContext",
    "TrainConfig",
    "TrainResult",
    "TrainingVolume",
    "augment",
    "calibrate_segmentation",
    "distributed_context",
    "distributed_masked_loss",
    "evaluate_patches",
    "fit",
    "labelled_dice",
    "last_checkpoint_path",
    "masked_loss",
    "split_volumes",
]
