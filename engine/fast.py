"""Fast paths for training on a GPU that compute the same step as the plain path of ``engine.train``.

Every switch here changes how a step runs, never what it computes (docs/method.md is unchanged):

- ``channels_last``: NHWC memory layout for the student, the teacher and the images, which tensor-core
  convolutions want; the values are the same, only strides change.
- ``bf16_autocast``: bfloat16 autocast on the CPU too (CUDA autocasts whenever ``train.amp`` is on, in
  bfloat16 where the GPU has it); loss terms stay in float32, so results agree within bf16 tolerance.
- ``compile``: ``torch.compile`` of the student (``StepModel``, inside DDP if any) and of the teacher.
- ``separable_upsample``: bilinear upsampling (align_corners=False) as two matrix products
  ``A_H @ X @ A_W^T``. It is linear and separable, so this is exact; its backward is two matrix products
  as well, instead of the scatter kernel of ``upsample_bilinear2d_backward`` that took 22% of the GPU
  time of the reference step's student in the project's H100 profile (docs/benchmarks.md, "GPU throughput").
- ``teacher_inference_mode``: the teacher runs under ``torch.inference_mode`` rather than ``no_grad``
  (no view or version-counter bookkeeping; no difference measurable on a CPU).
- ``prefetch``: the next batch is copied to the GPU on a side stream while the current one trains.
- ``cudnn_benchmark``: cuDNN picks the fastest convolution algorithms for the fixed crop size.
- ``oom_fallback``: on CUDA out-of-memory in the first iterations, halve the micro-batch and accumulate
  gradients so the effective batch and the loss (a mean over the whole batch) stay the same.

``default_fast_paths(device)`` turns them all on for CUDA and off (but ``oom_fallback``) on the CPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("ciss.engine.fast")
T = TypeVar("T")
M = TypeVar("M", bound="torch.nn.Module | None")


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths a training step uses; each keeps the math of docs/method.md (see the module doc)."""

    channels_last: bool = False
    bf16_autocast: bool = False  # with train.amp, the CPU autocasts to bfloat16 too (CUDA always does)
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    compile_backend: str = "inductor"  # "aot_eager" traces the same graphs without code generation (tests)
    separable_upsample: bool = False
    teacher_inference_mode: bool = False
    prefetch: bool = False
    cudnn_benchmark: bool = False  # cuDNN autotuning during training steps (fixed crop size), restored after
    oom_fallback: bool = True
    oom_window: int = 3  # OOM in the first this-many iterations (since start, resume or a halving) falls back

    def upsample(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """(N, C, h, w) -> (N, C, *size): the bilinear upsampling these settings choose."""
        if self.separable_upsample:
            return upsample_separable(logits, size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def teacher_context(self) -> AbstractContextManager:
        """The grad mode the teacher runs in: inference mode, or plain no_grad."""
        return torch.inference_mode() if self.teacher_inference_mode else torch.no_grad()

    @contextmanager
    def step_context(self) -> Iterator[None]:
        """Backend settings for one training step's forward and backward: cuDNN autotuning when asked.

        Scoped to the step rather than set for the process, because evaluation sees images of many sizes
        and would autotune for each of them.
        """
        if not self.cudnn_benchmark:
            yield
            return
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous

    def apply_memory_format(self, *modules: torch.nn.Module | None) -> None:
        """Convert ``modules`` to channels_last in place when asked (None entries are skipped).

        Call it before wrapping in DDP, whose gradient buckets take the parameters' strides.
        """
        if self.channels_last:
            for module in modules:
                if module is not None:
                    module.to(memory_format=torch.channels_last)

    def compiled(self, module: M) -> M:
        """``torch.compile(module)`` when asked, else ``module`` itself.

        The compiled wrapper forwards attribute access (e.g. ``teacher.reasoning_scores``) to the module.
        """
        if not self.compile or module is None:
            return module
        return torch.compile(  # type: ignore[return-value]
            module, mode=self.compile_mode, backend=self.compile_backend
        )


def default_fast_paths(device: torch.device | str) -> FastPaths:
    """Everything on for CUDA; on the CPU only the OOM fallback (which never triggers there)."""
    if torch.device(device).type == "cuda":
        return FastPaths(
            channels_last=True,
            bf16_autocast=True,
            compile=True,
            separable_upsample=True,
            teacher_inference_mode=True,
            prefetch=True,
            cudnn_benchmark=True,
        )
    return FastPaths()


# --------------------------------------------------------------------------------------------------
# Separable bilinear upsampling
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (out_size, in_size) matrix A with ``A @ x`` = 1-D bilinear resize of x, align_corners=False.

    Row o holds the two weights PyTorch's ``upsample_bilinear2d`` gives output o: source coordinate
    ``s = (o + 0.5) * in / out - 0.5`` clamped at 0, ``i0 = min(floor(s), in - 1)``, ``i1 = i0 + 1`` except
    at the last input (then i0), weights ``1 - l`` and ``l`` with ``l = s - i0`` clamped to [0, 1]. At an edge
    both weights fall on one column, which then holds their sum. Computed in float64, then cast.

    Cached per (sizes, device, dtype): callers must not modify the result. It is built outside inference
    mode even when called inside it, because an inference tensor cannot be saved for the student's backward.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear_matrix: sizes must be >= 1, got in {in_size}, out {out_size}")
    with torch.inference_mode(False), torch.no_grad():
        out_index = torch.arange(out_size, dtype=torch.float64)  # (out,)
        source = ((out_index + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
        first = source.floor().to(torch.int64).clamp(max=in_size - 1)  # i0, (out,)
        second = torch.where(first < in_size - 1, first + 1, first)  # i1, (out,)
        weight_second = (source - first).clamp(0.0, 1.0)  # l, (out,)
        matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
        rows = torch.arange(out_size)
        matrix.index_put_((rows, first), 1.0 - weight_second, accumulate=True)
        matrix.index_put_((rows, second), weight_second, accumulate=True)
        return matrix.to(device=device, dtype=dtype)


def upsample_separable(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (align_corners=False) of x (N, C, h, w) to (N, C, H, W) as A_H @ x @ A_W^T.

    Equal to ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` up to rounding; backward is
    ``A_H^T @ grad @ A_W``, two matrix products. The matrices take x's dtype (under autocast the products
    run in the autocast dtype anyway). The cheaper order of the two products is used.
    """
    if x.dim() != 4:
        raise ValueError(f"upsample_separable: x {tuple(x.shape)} must be (N, C, h, w)")
    _, _, h, w = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    a_h = bilinear_matrix(h, out_h, x.device, x.dtype)  # (H, h)
    a_w = bilinear_matrix(w, out_w, x.device, x.dtype)  # (W, w)
    # Multiply-adds per (n, c): width first h*w*W + H*h*W, height first H*h*w + H*w*W.
    if h * out_w * (w + out_h) <= out_h * w * (h + out_w):
        return torch.matmul(a_h, torch.matmul(x, a_w.t()))  # (N, C, h, W), then (N, C, H, W)
    return torch.matmul(torch.matmul(a_h, x), a_w.t())  # (N, C, H, w), then (N, C, H, W)


# --------------------------------------------------------------------------------------------------
# Micro-batches, gradient accumulation and the out-of-memory fallback
# --------------------------------------------------------------------------------------------------


def accumulate_gradients(
    images: Tensor,
    labels: Tensor,
    micro_batch: int,
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]],
    backward: Callable[[Tensor], None],
    *,
    between: Callable[[], None] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward of one batch in micro-batches of at most ``micro_batch`` images.

    images (N, 3, H, W), labels (N, H, W). ``loss_fn(images, labels)`` returns the (total, terms) of a
    micro-batch, each a mean over its own n_i * H * W pixels; ``backward(loss)`` back-propagates (e.g.
    through a GradScaler). Micro-batch i's loss is scaled by n_i / N before its backward, so the summed
    gradient, and the returned detached total and terms, are those of the mean over the whole batch
    (exactly so when no BatchNorm uses batch statistics, i.e. at t >= 1). One micro-batch of N images is
    the plain step. Single-process only: under DDP every micro-batch's backward would all-reduce.
    ``between()`` runs before every micro-batch but the first; it may raise to abandon the batch.
    """
    n = images.shape[0]
    total = images.new_zeros((), dtype=torch.float32)
    terms_sum: dict[str, Tensor] = {}
    for start in range(0, n, max(1, micro_batch)):
        if start > 0 and between is not None:
            between()
        part = slice(start, min(start + micro_batch, n))
        share = (part.stop - part.start) / n
        loss, terms = loss_fn(images[part], labels[part])
        backward(loss if share == 1.0 else loss * share)
        total = total + loss.detach().float() * share
        for name, term in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + term.detach().float() * share
    return total, terms_sum


class MicroBatchFallback:
    """Runs a batch function and, on CUDA out-of-memory early on, retries it with half the micro-batch.

    ``run(images, labels, step)`` calls ``step(images, labels, micro_batch)``. A
    ``torch.cuda.OutOfMemoryError`` within the first ``window`` calls since the start or the last halving
    calls ``reset()`` (drop the partial gradients), empties the CUDA cache, halves the micro-batch (not
    below ``min_size``) and retries the same batch; later, or at ``min_size``, the error propagates.
    ``micro_batch`` is the current size, recorded in the training result and progress.
    """

    def __init__(self, batch_size: int, *, min_size: int = 1, window: int = 3, enabled: bool = True) -> None:
        self.micro_batch = batch_size
        self.min_size = min_size
        self.window = window
        self.enabled = enabled
        self._calls_since_change = 0

    def run(
        self,
        images: Tensor,
        labels: Tensor,
        step: Callable[[Tensor, Tensor, int], T],
        reset: Callable[[], None],
    ) -> T:
        while True:
            try:
                result = step(images, labels, min(self.micro_batch, images.shape[0]))
            except torch.cuda.OutOfMemoryError:
                smaller = self.micro_batch // 2
                if not self.enabled or self._calls_since_change >= self.window or smaller < self.min_size:
                    raise
                # Leaving the except block first frees the failed attempt's tensors (held by the traceback).
            else:
                self._calls_since_change += 1
                return result
            reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning(
                "CUDA out of memory with micro-batch %d; retrying with micro-batch %d and gradient "
                "accumulation (the effective batch and the loss are unchanged)",
                self.micro_batch,
                smaller,
            )
            self.micro_batch = smaller
            self._calls_since_change = 0


# --------------------------------------------------------------------------------------------------
# Host-to-device prefetch
# --------------------------------------------------------------------------------------------------


def device_batches(
    batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, fast: FastPaths | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) moved to ``device`` (images channels_last if asked), the next one in advance.

    With ``fast.prefetch`` on CUDA, batch i + 1 is copied on a side stream while batch i trains (the
    loader pins memory, so the copy is asynchronous); the compute stream waits for that copy before using
    it, and ``record_stream`` keeps the caching allocator from reusing its memory too early. Elsewhere
    this is a plain ``.to(device)`` per batch.
    """
    channels_last = fast is not None and fast.channels_last

    def move(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(device, non_blocking=True)  # (N, 3, H, W)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(device, non_blocking=True)

    if fast is None or not fast.prefetch or device.type != "cuda":
        for images, labels in batches:
            yield move(images, labels)
        return
    stream = torch.cuda.Stream(device)
    pending: tuple[Tensor, Tensor] | None = None
    for images, labels in batches:
        with torch.cuda.stream(stream):
            ready = move(images, labels)
        if pending is not None:
            yield pending
        torch.cuda.current_stream(device).wait_stream(stream)
        for tensor in ready:
            tensor.record_stream(torch.cuda.current_stream(device))
        pending = ready
    if pending is not None:
        yield pending
