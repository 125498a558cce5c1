"""The simulated annotator: opens the patches a reviewer would open next and accepts their
ground truth through :meth:`napari_pvs.project.Project.accept`, the call a person's review makes.

Pool volume ``i`` of the benchmark is project volume id ``i`` (the protocol checks it when it
adds them), so a patch record's ``volume_id`` finds its ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_pvs.benchmark.cases import Case
from napari_pvs.benchmark.config import StrategySpec

#: The annotator recorded with every accepted patch.
ANNOTATOR = "simulated"


class SimulatedAnnotator:
    """Reviews the pool's queues with the complete ground truth of each pool volume."""

    def __init__(self, pool: Sequence[Case], patch: int) -> None:
        self.pool = list(pool)
        self.patch = patch

    def pick(self, project, spec: StrategySpec, n: int, seed: int, round_index: int):
        """The ``n`` patches a reviewer would open next: each volume ranked on its own, then
        taken in turn (volume order drawn by seed). Returns (patch records, note)."""
        rank_seed = seed * 1000 + round_index
        note = ""
        queues = []
        for vid in range(1, len(self.pool) + 1):
            try:
                records = self._rank(project, spec, vid, n, rank_seed, round_index)
            except ValueError as exc:  # fg-random with nothing predicted: as a reviewer would
                if spec.name != "fg-random" or "predicted PVS" not in str(exc):
                    raise
                records = self._rank(project, StrategySpec("random"), vid, n, rank_seed, 0)
                note = f"no predicted PVS in pool-{vid}: random there"
            queues.append(sorted(records, key=lambda r: r.rank))
        order = np.random.default_rng([seed, round_index, 77]).permutation(len(queues))
        picked = []
        for position in range(max((len(q) for q in queues), default=0)):
            for index in order:
                if position < len(queues[index]):
                    picked.append(queues[index][position])
        return picked[:n], note

    def _rank(self, project, spec: StrategySpec, vid: int, n: int, seed: int, round_index: int):
        """One volume's queue: ``Project.rank``, or its own steps for options it lacks."""
        from napari_pvs.project import UNREVIEWED
        from napari_pvs.ranking import rank_patches

        if spec.product_defaults:
            return project.rank(vid, strategy=spec.name, n=n, patch=self.patch, seed=seed)
        ranked = rank_patches(
            project.predict(vid),
            n=n,
            patch=self.patch,
            strategy=spec.name,
            exclude=project.labels(vid)["labels"],
            unlabelled_value=UNREVIEWED,
            exclude_boxes=project.excluded_boxes(vid),
            seed=seed,
            image=project.open_volume(vid),
            noise=spec.noise,
            noise_round=max(round_index - 1, 0),
            noise_decay=spec.noise_decay,
            foreground_share=spec.foreground_share,
        )
        return project.record_queue(vid, ranked, model_version=project.current_version().version)

    def accept(self, project, records) -> None:
        for record in records:
            case = self.pool[record.volume_id - 1]
            box = tuple(slice(a, b) for a, b in zip(record.start, record.stop, strict=True))
            project.accept(
                record.volume_id,
                record.start,
                record.stop,
                case.truth[box].astype(np.uint8),
                annotator=ANNOTATOR,
                patch_id=record.id,
            )

    def accept_everything(self, project) -> None:
        """Full supervision: every patch box of the pool grid accepted with its ground truth."""
        from napari_pvs.ranking import PatchGrid

        for vid, case in enumerate(self.pool, start=1):
            grid = PatchGrid(case.truth.shape, self.patch, self.patch)
            for index in np.ndindex(*grid.n):
                lo, hi = grid.box(index)
                box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
                project.accept(vid, lo, hi, case.truth[box].astype(np.uint8), annotator=ANNOTATOR)
