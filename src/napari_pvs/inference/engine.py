"""The network side of a prediction: models on their device, batches of windows run through them.

:class:`WindowEngine` runs each model as its inference copy (:mod:`.fused`), one batch at a
time: padding to the models' ``size_divisor``, reduced precision where the device has it
natively (autocast), and, with MC dropout, test-time mirrorings or an
ensemble, the running moments of the probability samples (:mod:`napari_pvs.uncertainty`).
:meth:`WindowEngine.stream` runs a whole prediction in tile order: in bfloat16 on CPU several
batches at once, each on its own network lane (a thread with its share of torch's threads),
blended in order on the calling thread, while two helper threads keep the lanes busy: one
reads and normalises the next batches' windows, one normalises, compresses and stores
finished chunks.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from napari_pvs.inference.blending import Frontier
from napari_pvs.inference.fused import inference_copy, rewritable_norms
from napari_pvs.inference.inputs import ChunkCache, read_windows
from napari_pvs.inference.planning import RemainingWork
from napari_pvs.inference.writer import ChunkWriter
from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled
from napari_pvs.uncertainty import predictive_moments, predictive_samples, sample_count

#: Hand the C heap's free pages back every this many windows (see memory.memory_policy), so
#: what it keeps is what the last few windows left, not what the whole run did (at 512^3,
#: every 8 windows held 30 MB less than every 32, at the same speed).
TRIM_EVERY_WINDOWS = 8
#: Completed chunks that may wait for the writer thread before the network waits for it.
MAX_PENDING_WRITES = 4


def default_batch(device: torch.device, precision: torch.dtype | None = None) -> int:
    """Windows per batch when none is asked for: 4 on CUDA; on CPU 1 in bfloat16, else 2.

    Measured on 2 CPU cores (256^3, 64^3 windows, ``memory="reuse"``): in bfloat16 batch 1 ran
    as fast as batch 2 with about 70 MB less peak memory; in float32 batch 1 took 1.8x as long
    as batch 2, and batch 4 was no faster than 2 with more than twice the memory.
    """
    if device.type == "cuda":
        return 4
    return 1 if precision == torch.bfloat16 else 2


#: Network lanes on CPU at most: each lane holds one batch's activations.
MAX_LANES = 4


def default_lanes(device: torch.device, threads: int, precision: torch.dtype | None) -> int:
    """Batches run at once: in bfloat16 on CPU one per torch thread (at most
    :data:`MAX_LANES`), each lane then running its batch on ``threads // lanes`` threads;
    otherwise one.

    Measured on 2 AVX512-BF16/AMX cores (``benchmarks/bench_lanes.py``: residual UNet, 64^3
    windows, 2 torch threads): one bfloat16 batch on both threads kept the second core idle a
    third of the time (every layer's threads meet at a barrier, and the small layers are over
    before a sleeping thread wakes), so two lanes of one thread each ran a window in 20.9 ms
    against 36.3 ms, for 200 against 150 MB above the baseline at 256^3. In float32 two lanes
    (batch 2) ran a window in 49.4 ms against 71.2 ms but held 380 MB against 280 MB, more
    than half of MONAI's 600 MB, so float32 keeps one lane (pass ``lanes`` to trade memory
    for that speed).
    """
    if device.type != "cpu" or precision != torch.bfloat16:
        return 1
    return max(1, min(int(threads), MAX_LANES))


class BatchDraws:
    """The random draws of one batch (its MC-dropout masks), made on the process's shared
    generators from the batch's own stream: seeded with ``seed`` at the first draw, carried
    on from where the batch's last draw left it, and never interleaved with another lane's
    draws (one lock for all). A batch thus draws exactly what it drew when batches ran one
    at a time under ``torch.manual_seed(seed)``, whichever lane runs it."""

    _lock = threading.Lock()

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.devices = [device] if device.type == "cuda" else []
        self._state: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock, torch.random.fork_rng(devices=self.devices):
            if self._state is None:
                torch.manual_seed(self.seed)
            else:
                cpu, cuda = self._state
                torch.set_rng_state(cpu)
                for device, state in zip(self.devices, cuda, strict=True):
                    torch.cuda.set_rng_state(state, device)
            yield
            self._state = (
                torch.get_rng_state(),
                [torch.cuda.get_rng_state(device) for device in self.devices],
            )


def model_list(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The models of a run (one, or a list: an ensemble), each checked to have the
    ``features``/``head`` methods the engine calls."""
    models = list(model) if isinstance(model, list | tuple) else [model]
    if not models:
        raise ValueError("no model given; pass a model or a list of models (an ensemble)")
    for m in models:
        for attr in ("features", "head"):
            if not callable(getattr(m, attr, None)):
                raise ValueError(
                    f"model {type(m).__name__} has no {attr}() method; models must follow "
                    "the features/head contract in docs/architecture.md"
                )
    return models


class WindowEngine:
    """Models on their device in eval mode, run batch by batch through their inference copies
    (:func:`.fused.inference_copy`: fused norm + PReLU, weights in the run's precision,
    channels-last where asked).

    ``channels_last=None`` chooses it: on CUDA, and on CPU when every model's instance norms
    are rewritten (measured on 2 AVX512-BF16/AMX cores, 64^3 windows: a residual UNet window
    took 0.5x the time of the unfused contiguous model in bfloat16 and 0.7x in float32, a
    cross-modal one 0.7-0.8x; without the rewrite channels-last measured no faster on CPU).

    ``models`` are the models given (their weights sign the run); ``runners`` are the copies
    that run. Each batch draws its MC-dropout masks from its own seed (``seed`` and the batch
    index, :class:`BatchDraws`), so a resumed run that recomputes a batch gets the same
    samples. ``lanes`` batches run at once (default :func:`default_lanes`).
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        device: torch.device,
        window: tuple[int, int, int],
        amp_dtype: torch.dtype | None,
        channels_last: bool | None,
        mc_samples: int,
        tta: int,
        seed: int,
        lanes: int | None = None,
    ) -> None:
        if lanes is not None and lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.lanes = lanes
        self.device = device
        self.window = window
        self.amp_dtype = amp_dtype
        self.mc_samples = mc_samples
        self.tta = tta
        self.seed = seed
        self.models = [m.to(self.device).eval() for m in models]
        # The fused path was measured on CPUs only; other devices run the models as given.
        fuse = device.type == "cpu" and all(rewritable_norms(m) for m in self.models)
        if channels_last is None:
            channels_last = device.type == "cuda" or fuse
        self.channels_last = bool(channels_last)
        self.runners = [
            inference_copy(m, amp_dtype, self.channels_last, fuse)[0] for m in self.models
        ]
        self.size_divisor = max(int(getattr(m, "size_divisor", 1) or 1) for m in self.models)
        self.n_samples = sample_count(len(self.models), self.mc_samples, self.tta)

    @torch.inference_mode()
    def run_batch(self, image: np.ndarray, modality: str, batch_index: int) -> np.ndarray:
        """Moments ``(B, 1 or 3, *window)`` of the probability samples for one batch."""
        x = torch.from_numpy(image)
        div = self.size_divisor
        pad = [(-s) % div for s in self.window]
        if any(pad):
            x = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (0, p)])
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        draws = BatchDraws(self.seed * 1_000_003 + batch_index, self.device)
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            if self.n_samples == 1:  # one deterministic pass: the probability itself
                moments = next(predictive_samples(self.runners, x, modality))
            else:
                moments = predictive_moments(
                    self.runners, x, modality, self.mc_samples, self.tta, draws
                )
        crop = (slice(None), slice(None), *(slice(0, w) for w in self.window))
        return moments[crop].float().cpu().numpy()

    @contextlib.contextmanager
    def network_lanes(self) -> Iterator[tuple[ThreadPoolExecutor, int]]:
        """Threads that each run one batch at a time on their share of torch's CPU threads
        (:func:`default_lanes`), and their number; torch's thread count is as before once
        they are done."""
        threads = torch.get_num_threads()
        lanes = self.lanes or default_lanes(self.device, threads, self.amp_dtype)
        try:
            with ThreadPoolExecutor(
                lanes,
                thread_name_prefix="napari-pvs-network",
                initializer=torch.set_num_threads,
                initargs=(max(1, threads // lanes),),
            ) as pool:
                yield pool, lanes
        finally:
            torch.set_num_threads(threads)  # the lanes set the count new threads start with

    def _batch_results(
        self,
        todo: list[tuple[int, list]],
        modality: str,
        read: Callable[[int], Future],
        network: ThreadPoolExecutor,
        lanes: int,
        cancel: CancelToken | None,
    ) -> Iterator[np.ndarray]:
        """Each batch's moments in ``todo`` order, with up to ``lanes`` batches on the network
        and the windows of as many more read ahead (``read(position)``: a future of them).
        Nothing new starts once ``cancel`` is set; closing it cancels what has not started,
        and the executors wait for what has."""
        inputs: deque[Future] = deque()
        running: deque[Future] = deque()
        next_read = next_run = 0
        try:
            while running or next_run < len(todo):
                check_cancelled(cancel)
                while next_read < min(len(todo), next_run + lanes + 1):
                    inputs.append(read(next_read))
                    next_read += 1
                while next_run < len(todo) and len(running) < lanes:
                    image = inputs.popleft().result()
                    batch_index = todo[next_run][0]
                    running.append(network.submit(self.run_batch, image, modality, batch_index))
                    next_run += 1
                yield running.popleft().result()
        finally:
            for future in (*inputs, *running):
                future.cancel()

    def stream(
        self,
        data,
        intensity: tuple[float, float],
        modality: str,
        work: RemainingWork,
        frontier: Frontier,
        writer: ChunkWriter,
        progress: ProgressCallback,
        cancel: CancelToken | None,
        trim_heap: Callable[[], None],
    ) -> int:
        """Run ``work``'s batches in tile order, blending each into ``frontier`` and handing
        every chunk to ``writer`` as soon as its last window has run; returns the windows run.

        Up to one batch per network lane runs at once (:meth:`network_lanes`), blended here in
        tile order; the next batches are read meanwhile; at most :data:`MAX_PENDING_WRITES`
        chunks wait for the writer. Raises :class:`napari_pvs.progress.Cancelled` within one
        batch per lane of ``cancel`` being set, after the chunks already written are marked
        done.
        """
        plan = frontier.plan
        n_stats = 3 if self.n_samples > 1 else 1
        todo, pending = work.batches, work.pending
        total = work.windows
        run = 0
        progress(0, total, "predicting")
        writes: deque[Future] = deque()
        source = ChunkCache(data)
        try:
            with (
                ThreadPoolExecutor(1) as reader,
                ThreadPoolExecutor(1) as chunks_out,
                self.network_lanes() as (network, lanes),
            ):

                def read(position: int) -> Future:
                    return reader.submit(read_windows, source, plan, todo[position][1], intensity)

                results = self._batch_results(todo, modality, read, network, lanes, cancel)
                with contextlib.closing(results):
                    for (_, windows), moments in zip(todo, results, strict=True):
                        check_cancelled(cancel)
                        for k, idx in enumerate(windows):
                            frontier.add(idx, moments[k])
                        if (run + len(windows)) // TRIM_EVERY_WINDOWS > run // TRIM_EVERY_WINDOWS:
                            trim_heap()
                        run += len(windows)
                        last_rank = plan.rank[windows[-1]]
                        while pending and pending[0][0] <= last_rank:
                            _, chunk = pending.pop(0)
                            acc = frontier.take(chunk, n_stats)
                            writes.append(chunks_out.submit(writer.write, chunk, acc))
                        # Collect finished writes (raising their errors); bound those waiting.
                        while writes and (writes[0].done() or len(writes) > MAX_PENDING_WRITES):
                            writes.popleft().result()
                        progress(run, total, "predicting")
                for write in writes:
                    write.result()
        except BaseException:
            with contextlib.suppress(Exception):  # keep what was written before the stop
                writer.mark_done()
            raise
        writer.mark_done()
        if pending:
            raise RuntimeError(f"internal error: {len(pending)} chunks were never completed")
        return run
