"""Fast paths for training on a GPU that compute the same step as the plain path of ``engine.train``.

Every switch here changes how a step runs, never what it computes (method.md is unchanged):

- ``channels_last``: NHWC memory layout for the student, the teacher and the images, which tensor-core
  convolutions want; the values are the same, only strides change.
- ``bf16_autocast``: bfloat16 autocast, also on the CPU (CUDA already autocasts with ``train.amp``);
  loss terms stay in float32 (``engine.losses``), so results agree within bf16 tolerance.
- ``compile``: ``torch.compile`` of the student (``StepModel``, inside DDP if any) and of the teacher.
- ``separable_upsample``: bilinear upsampling (align_corners=False) as two matrix products
  ``A_H @ X @ A_W^T``. It is linear and separable, so this is exact; its backward is two matrix products
  as well, instead of the scatter kernel of ``upsample_bilinear2d_backward`` that takes about a fifth of
  a step on an H100 (docs: /work/shared/notes/gpu-profile.md).
- ``fused_loss``: mBCE, KD and AC in one autograd node over the full-resolution logits (they cover
  disjoint channels of the same big tensor), which saves the target tensors, the per-term slices and
  copies, and the zero-filled gradient buffers that the separate terms need in backward.
- ``teacher_inference_mode``: the teacher runs under ``torch.inference_mode`` rather than ``no_grad``.
- ``prefetch``: the next batch is copied to the GPU on a side stream while the current one trains.
- ``oom_fallback``: on CUDA out-of-memory in the first iterations, halve the micro-batch and accumulate
  gradients so the effective batch and the loss (a mean over the whole batch) stay the same.

``default_fast_paths(device)`` turns them all on for CUDA and off (but ``oom_fallback``) on the CPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
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
    """Which fast paths a training step uses; each keeps the math of method.md (see the module doc)."""

    channels_last: bool = False
    bf16_autocast: bool = False  # with train.amp: autocast to bfloat16 on any device, the CPU included
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    compile_backend: str = "inductor"  # "aot_eager" traces the same graphs without code generation (tests)
    separable_upsample: bool = False
    fused_loss: bool = False
    teacher_inference_mode: bool = False
    prefetch: bool = False
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
            fused_loss=True,
            teacher_inference_mode=True,
            prefetch=True,
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
# Fused mBCE + KD + AC
# --------------------------------------------------------------------------------------------------


class _FusedBCE(torch.autograd.Function):
    """mBCE, KD and AC sums over the full-resolution logits in one node; see :func:`fused_bce_terms`.

    Forward computes, in float32, the three BCE sums divided by N*H*W and the gradient of each term with
    respect to its own channels: G (N, 1 + K, H, W). The terms cover disjoint channels (0: AC,
    1..num_old: KD, num_old+1..K: mBCE), so backward is G times a per-channel factor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None,
        num_old: int,
        pos_weight: float,
    ) -> Tensor:
        x = logits.float()  # (N, 1 + K, H, W)
        n, channels, h, w = x.shape
        first_new = num_old + 1
        # PyTorch's BCE with logits is (1 - y) x - (1 + (p - 1) y) log sigmoid(x); its gradient is
        # sigmoid(x) (1 + (p - 1) y) - p y. Both need log sigmoid(x) and sigmoid(x) of every channel.
        log_sig = F.logsigmoid(x)  # (N, 1 + K, H, W)
        grad = torch.sigmoid(x)  # becomes G, in place, channel group by channel group
        sums = x.new_zeros(3)  # mbce, kd, ac

        # AC, channel 0, target 0: x - log sigmoid(x); gradient sigmoid(x) as is.
        sums[2] = (x[:, :1] - log_sig[:, :1]).sum()

        # KD, channels 1..num_old, target sigmoid(teacher); gradient sigmoid(x) - y.
        if teacher_logits is not None and num_old > 0:
            target = torch.sigmoid(teacher_logits[:, 1:first_new].float())  # (N, num_old, H, W)
            x_old = x[:, 1:first_new]
            sums[1] = ((1.0 - target) * x_old - log_sig[:, 1:first_new]).sum()
            grad[:, 1:first_new].sub_(target)
        elif num_old > 0:
            grad[:, 1:first_new].zero_()  # no KD term: old channels get no gradient from these terms

        # mBCE, channels num_old+1..K, target 1 where the label is the channel's class.
        class_ids = torch.arange(first_new, channels, device=x.device).view(1, -1, 1, 1)
        positive = (labels.unsqueeze(1) == class_ids).float()  # (N, C_t, H, W)
        x_new, log_sig_new, grad_new = x[:, first_new:], log_sig[:, first_new:], grad[:, first_new:]
        if pos_weight == 1.0:
            sums[0] = ((1.0 - positive) * x_new - log_sig_new).sum()
            grad_new.sub_(positive)
        else:
            log_weight = 1.0 + (pos_weight - 1.0) * positive
            sums[0] = ((1.0 - positive) * x_new - log_weight * log_sig_new).sum()
            grad_new.mul_(log_weight).sub_(pos_weight * positive)

        ctx.save_for_backward(grad)
        ctx.split = (1, num_old, channels - first_new)  # channels of AC, KD, mBCE
        ctx.logits_dtype = logits.dtype
        return sums / (n * h * w)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_sums: Tensor
    ) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors  # (N, 1 + K, H, W)
        n, _, h, w = grad.shape
        ac, kd, mbce = ctx.split
        per_channel = torch.cat(  # (1 + K,): d(term)/d(sum) of the term that owns the channel
            [grad_sums[2].expand(ac), grad_sums[1].expand(kd), grad_sums[0].expand(mbce)]
        ) / (n * h * w)
        grad_logits = (grad * per_channel.view(1, -1, 1, 1)).to(ctx.logits_dtype)
        return grad_logits, None, None, None, None


def fused_bce_terms(
    logits: Tensor,
    labels: Tensor,
    *,
    num_old: int,
    pos_weight: float,
    teacher_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """mBCE, AC and (with ``teacher_logits``) KD of ``engine.losses``, in one pass over the logits.

    logits (N, 1 + K, H, W) at full resolution; labels (N, H, W) int64; channels 1..num_old are the old
    classes and num_old+1..K the new ones (C_t, the last step's contiguous ids, as in training);
    teacher_logits (N, 1 + num_old, H, W) at full resolution, or None for no KD term. Returns
    ``{"mbce", "ac"}`` and ``"kd"`` when a teacher is given, each equal to the matching function of
    ``engine.losses`` up to float32 summation order.
    """
    n, channels, h, w = logits.shape
    if logits.dim() != 4 or labels.shape != (n, h, w) or not 0 <= num_old < channels - 1:
        raise ValueError(
            f"fused_bce_terms: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
            f"(N, 1 + K, H, W) and (N, H, W) with 0 <= num_old ({num_old}) < K"
        )
    if teacher_logits is not None and teacher_logits.shape != (n, num_old + 1, h, w):
        raise ValueError(
            f"fused_bce_terms: teacher_logits {tuple(teacher_logits.shape)} must be {(n, num_old + 1, h, w)}"
        )
    teacher = teacher_logits.detach() if teacher_logits is not None else None
    sums = _FusedBCE.apply(logits, labels, teacher, num_old, float(pos_weight))  # (3,)
    terms = {"mbce": sums[0], "ac": sums[2]}
    if teacher is not None:
        terms["kd"] = sums[1]
    return terms


# --------------------------------------------------------------------------------------------------
# Micro-batches, gradient accumulation and the out-of-memory fallback
# --------------------------------------------------------------------------------------------------


def accumulate_gradients(
    images: Tensor,
    labels: Tensor,
    micro_batch: int,
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]],
    backward: Callable[[Tensor], None],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward of one batch in micro-batches of at most ``micro_batch`` images.

    images (N, 3, H, W), labels (N, H, W). ``loss_fn(images, labels)`` returns the (total, terms) of a
    micro-batch, each a mean over its own n_i * H * W pixels; ``backward(loss)`` back-propagates (e.g.
    through a GradScaler). Micro-batch i's loss is scaled by n_i / N before its backward, so the summed
    gradient, and the returned detached total and terms, are those of the mean over the whole batch
    (exactly so when no BatchNorm uses batch statistics, i.e. at t >= 1). One micro-batch of N images is
    the plain step. Single-process only: under DDP every micro-batch's backward would all-reduce.
    """
    n = images.shape[0]
    total = images.new_zeros((), dtype=torch.float32)
    terms_sum: dict[str, Tensor] = {}
    for start in range(0, n, max(1, micro_batch)):
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
    memory_format = torch.channels_last if fast is not None and fast.channels_last else torch.preserve_format

    def move(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
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
