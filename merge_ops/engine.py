"""Running a plan: merge one shard, finalize the folder, or merge a whole model atomically."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from merge_ops.errors import DeviceError, MethodError
from merge_ops.finite import check_finite
from merge_ops.lora import apply_lora
from merge_ops.memory import freeze_long_lived_objects, reuse_freed_memory
from merge_ops.methods.registry import get_method
from merge_ops.model_folder import write_model_files
from merge_ops.output_folder import staged_output
from merge_ops.plan import MergePlan, TensorJob, torch_dtype
from merge_ops.safetensors_io import DTYPE_NAMES, StreamingSafetensorsWriter, TensorBlocks, tensor_nbytes
from merge_ops.stop import check_stop
from merge_ops.vocabulary_rows import line_up

BLOCK_ELEMENTS = 1 << 20
"""Elementwise methods merge tensors larger than this in row blocks of about this many elements."""
READ_AHEAD = 3
"""Pieces whose inputs are read while the arithmetic works on the current one (converted copies for
methods that do not upcast themselves; for the others, views of the mapped files with their pages faulted in)."""
WRITE_BEHIND = 2
"""Results waiting for the writer before the arithmetic waits for it."""
PAGE = 4096
"""Bytes per memory page: touching one byte of each maps a whole tensor in."""


@dataclass(frozen=True)
class Piece:
    """A unit of work: a whole output tensor, or a block of its rows."""

    job: TensorJob
    rows: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return self.job.nbytes if self.rows is None else self.job.nbytes // self.job.shape[0] * (self.rows[1] - self.rows[0])

    @property
    def numel(self) -> int:
        numel = math.prod(self.job.shape)
        return numel if self.rows is None else numel // self.job.shape[0] * (self.rows[1] - self.rows[0])

    @property
    def completes_tensor(self) -> bool:
        return self.rows is None or self.rows[1] == self.job.shape[0]


Progress = Callable[[Piece], None]


def check_device(device: str) -> torch.device:
    """The torch device for ``device``; DeviceError if it is not available here."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return dev


def split_into_pieces(plan: MergePlan, index: int) -> list[Piece]:
    """The shard's tensors in order; large tensors of elementwise methods as row blocks (except token-indexed tensors
    whose rows are lined up with the merged vocabulary: padding rows are a mean over all rows)."""
    elementwise = get_method(plan.method).elementwise
    pieces = []
    for job in plan.shards[index].tensors:
        numel = math.prod(job.shape)
        if not (elementwise and job.shape and numel > BLOCK_ELEMENTS) or job.vocabulary is not None:
            pieces.append(Piece(job))
            continue
        step = max(1, BLOCK_ELEMENTS // (numel // job.shape[0]))
        pieces += [Piece(job, (r, min(r + step, job.shape[0]))) for r in range(0, job.shape[0], step)]
    return pieces


def peak_memory_estimate(plan: MergePlan) -> int:
    """Bytes the engine holds at its worst point, above the interpreter.

    Over every ``READ_AHEAD + 1`` consecutive pieces (the current one and those read ahead): the mapped input
    tensors they read (a tensor stays mapped, its pages resident once touched, while it is merged) and, for methods
    that do not convert their inputs themselves (and for token-indexed tensors lined up with a merged vocabulary), the
    reader's copies in the compute dtype. Then ``WRITE_BEHIND + 1``
    results waiting for the writer and two working copies of the largest piece in the compute dtype.
    """
    pieces = [p for i in range(len(plan.shards)) for p in split_into_pieces(plan, i)]
    if not pieces:
        return 0
    upcasts = get_method(plan.method).upcasts
    compute = tensor_nbytes(DTYPE_NAMES[torch_dtype(plan.compute_dtype)], (1,))

    def held(window: list[Piece]) -> int:
        mapped = sum({id(p.job): p.job.input_nbytes for p in window}.values())
        copied = [p for p in window if not upcasts or p.job.vocabulary is not None]  # lined-up vocabularies are copies too
        copies = sum(p.numel * compute * (len(p.job.inputs) + (p.job.base is not None)) for p in copied)
        return mapped + copies

    read = max(held(pieces[i : i + READ_AHEAD + 1]) for i in range(len(pieces)))
    return read + (WRITE_BEHIND + 1) * max(p.nbytes for p in pieces) + 2 * compute * max(p.numel for p in pieces)


@dataclass(frozen=True)
class InputReader:
    """Reads a piece's inputs ready for the method: on the device, and for methods that do not upcast
    themselves already in the compute dtype. Run on the reader thread, so the conversion (and the page
    faults of the mapped files) overlap the arithmetic of the previous piece."""

    blocks: TensorBlocks
    cast: torch.dtype | None
    device: torch.device
    factors: TensorBlocks = field(default_factory=TensorBlocks)
    """The LoRA factors of the current tensor's ``BASE+ADAPTER`` sources, loaded once for all its row blocks."""
    check_finite: bool = True
    """Raise NonFiniteError for a source block holding NaN or infinite values (one min/max pass, which also faults the pages in)."""

    def __call__(self, piece: Piece) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        job = piece.job
        sources = [*job.inputs, *([job.base] if job.base else [])]
        tensors = self.blocks.read([(Path(s.file), s.name) for s in sources], piece.rows)
        keys = [(Path(s.lora.file), name) for s in sources if s.lora for name in (s.lora.a, s.lora.b)]
        factors = self.factors.read(keys, None)
        pairs = iter(zip(factors[::2], factors[1::2], strict=True))  # (A, B) of each LoRA source, in order
        direct = self.cast if self.device.type == "cpu" and job.vocabulary is None else None  # adapted weights made in the compute dtype
        tensors = [apply_lora(t, s.lora, next(pairs), piece.rows, direct) if s.lora else t for t, s in zip(tensors, sources, strict=True)]
        if self.check_finite:
            for tensor, source in zip(tensors, sources, strict=True):
                check_finite(tensor, source.name, model=source.model, rows=piece.rows)
        if job.vocabulary is not None:  # in the dtype the inputs are loaded in, before any cast to the compute dtype (as mergekit)
            tensors = line_up(tensors, job.vocabulary)
        tensors = [t if s.lora and direct is not None and t.is_floating_point() else self._prepare(t) for t, s in zip(tensors, sources, strict=True)]
        return (tensors[:-1], tensors[-1]) if job.base else (tensors, None)

    def _prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        cast = self.cast if tensor.is_floating_point() else None
        if cast is None and self.device.type == "cpu":
            tensor.reshape(-1).view(torch.uint8)[::PAGE].sum()  # fault the mapped pages in here, not in the arithmetic
            return tensor
        return tensor.to(device=self.device, dtype=cast, copy=cast is not None)


def merge_tensor(plan: MergePlan, job: TensorJob, inputs: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """Compute one output tensor from inputs prepared by ``InputReader``, cast to the output dtype on the cpu."""
    out_dtype = torch_dtype(job.dtype)
    first = base if base is not None else inputs[0]
    if not first.is_floating_point():
        return first.to(dtype=out_dtype, device="cpu")
    method = get_method(plan.method)
    kwargs = {method.params[name].arg: value for name, value in job.params.items()}
    if method.random:
        kwargs["generator"] = torch.Generator().manual_seed(job.seed)
    if method.upcasts:
        kwargs["dtype"] = torch_dtype(plan.compute_dtype)
    if method.casts_output:
        kwargs["out_dtype"] = out_dtype
    try:
        result: torch.Tensor = method(inputs, base, **kwargs)
    except ValueError as err:
        raise MethodError(f"{plan.method} failed on tensor {job.name}: {err}") from err
    return result.to(dtype=out_dtype, device="cpu")


def _report(progress: Progress, piece: Piece, _: Future[None]) -> None:
    progress(piece)


def merge_shard(
    plan: MergePlan, index: int, out_dir: Path, *, device: str = "cpu", progress: Progress | None = None, allow_nonfinite: bool = False,
) -> str:
    """Write shard ``index`` of ``plan`` into ``out_dir`` atomically and return its sha256.

    Reading the next pieces' inputs and writing finished results overlap the arithmetic.

    Raises:
        NonFiniteError: an input block, or a result, holds NaN or infinite values (unless ``allow_nonfinite``); nothing is left of the shard.
    """
    dev = check_device(device)
    reuse_freed_memory()
    freeze_long_lived_objects()
    shard = plan.shards[index]
    pieces = split_into_pieces(plan, index)
    specs = [(t.name, t.dtype, t.shape) for t in shard.tensors]
    method = get_method(plan.method)
    read = InputReader(TensorBlocks(), None if method.upcasts else torch_dtype(plan.compute_dtype), dev, check_finite=not allow_nonfinite)
    with (  # closed in reverse: the writer thread is done before the file is finished or dropped
        ThreadPoolExecutor(max_workers=1) as reader,
        StreamingSafetensorsWriter(Path(out_dir) / shard.file, specs) as writer,
        ThreadPoolExecutor(max_workers=1) as writer_thread,
    ):
        reads = deque(reader.submit(read, piece) for piece in pieces[:READ_AHEAD])
        writes: deque[Future[None]] = deque()
        for i, piece in enumerate(pieces):
            check_stop()
            inputs, base = reads.popleft().result()
            if i + READ_AHEAD < len(pieces):
                reads.append(reader.submit(read, pieces[i + READ_AHEAD]))
            result = merge_tensor(plan, piece.job, inputs, base)
            del inputs, base
            if not allow_nonfinite:
                check_finite(result, piece.job.name, rows=piece.rows)
            if len(writes) == WRITE_BEHIND:
                writes.popleft().result()
            writes.append(writer_thread.submit(writer.write, piece.job.name, result))
            if progress:
                writes[-1].add_done_callback(partial(_report, progress, piece))
        for pending in writes:
            pending.result()
    return writer.sha256


def finalize(plan: MergePlan, out_dir: Path) -> None:
    """Write everything but the weights: index, config, generation config, tokenizer, model card."""
    missing = [s.file for s in plan.shards if not (Path(out_dir) / s.file).is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: shard(s) not written yet: {', '.join(missing)}; run merge_shard for them first")
    write_model_files(plan, Path(out_dir))


def merge_model(
    plan: MergePlan, out_dir: Path, *, device: str = "cpu", force: bool = False, progress: Progress | None = None, inputs: Iterable[Path] = (),
    allow_nonfinite: bool = False,
) -> dict[str, str]:
    """Merge every shard into a staging folder and move it to ``out_dir`` when complete.

    Returns shard file -> sha256. ``out_dir`` never holds a partial model; ``force`` never replaces a folder that is or
    contains the plan's models or one of ``inputs`` (the recipe, adapters). Errors as ``staged_output``; NonFiniteError as ``merge_shard``.
    """
    sources = [Path(p) for p in plan.sources.values()] + list(inputs)
    with staged_output(out_dir, force=force, inputs=sources) as staging:
        hashes = {s.file: merge_shard(plan, i, staging, device=device, progress=progress, allow_nonfinite=allow_nonfinite) for i, s in enumerate(plan.shards)}
        finalize(plan, staging)
    return hashes
