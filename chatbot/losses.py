"""Cross-entropy on logits, shared by training and evaluation."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batching import EncodedPairs, RecallSlots, batch_order, collate
from .config import PAD_ID
from .model import Seq2Seq


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over non-pad target positions: their mean (or ``reduction="sum"``).

    logits (B, T, V) with target (B, T), or logits (N, V) with target (N,) (positions already picked).
    Equal to ``F.cross_entropy(..., ignore_index=PAD_ID, label_smoothing=...)``, computed in fp32
    whatever the logits' dtype: ``log_softmax(dtype=float32)`` upcasts inside the kernel, which on
    the CPU is ~3x faster for bf16 logits than ``logits.float()`` followed by ``cross_entropy``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    logp = torch.log_softmax(logits.reshape(-1, logits.size(-1)), dim=-1, dtype=torch.float32)  # (N, V)
    target = target.reshape(-1)  # (N,)
    total = _token_losses(logp, target, label_smoothing).sum()
    return total if reduction == "sum" else total / (target != PAD_ID).sum().clamp(min=1)


def _token_losses(logp: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy per row from log-probabilities logp (N, V) and target (N,): (N,), 0 on padding.

    PyTorch's label smoothing: (1 - ε)·NLL + ε·mean over the vocabulary of -log p.
    """
    loss = F.nll_loss(logp, target, ignore_index=PAD_ID, reduction="none")
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(-1).masked_fill(target == PAD_ID, 0.0)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """``sequence_loss(F.linear(x, weight, bias), target, ε, "sum")`` without the (N, V) logits in memory.

    The rows go through the output layer and the softmax a chunk at a time (chunk × V fp32 stays in
    cache), and each chunk's gradient with respect to its logits, ``softmax − (1 − ε)·onehot − ε/V``,
    is written straight away into one (N, V) buffer in the compute dtype. Backward is then two large
    matmuls (``G @ W`` and ``Gᵀ @ x``) times the incoming scalar. The idea of Liger-Kernel's fused
    linear cross-entropy (Hsu et al., 2024), in plain PyTorch ops.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, label_smoothing, dtype, chunk):
        n, vocab = x.size(0), weight.size(0)
        xc, w = x.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad = torch.empty(n, vocab, dtype=dtype, device=x.device)  # d(loss)/d(logits), (N, V)
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        eps = label_smoothing
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logp = torch.log_softmax(F.linear(xc[s:e], w, b), dim=-1, dtype=torch.float32)  # (C, V)
            total += _token_losses(logp, target[s:e], eps).sum()
            t = target[s:e, None]  # (C, 1)
            real = (t != PAD_ID).float()  # (C, 1)
            p = logp.exp_()  # softmax, in place
            if eps > 0:
                p.sub_(eps / vocab)
            p.scatter_add_(1, t, real.new_full(t.shape, -(1 - eps))).mul_(real)  # 0 on padding rows
            grad_bias += p.sum(0)
            grad[s:e].copy_(p)
        ctx.save_for_backward(xc, w, grad, grad_bias)
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, g):
        xc, w, grad, grad_bias = ctx.saved_tensors
        gx = torch.mm(grad, w).to(ctx.dtypes[0]).mul_(g) if ctx.needs_input_grad[0] else None
        gw = torch.mm(grad.t(), xc).to(ctx.dtypes[1]).mul_(g) if ctx.needs_input_grad[1] else None
        gb = (grad_bias * g).to(ctx.dtypes[2]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         label_smoothing: float = 0.0, dtype: torch.dtype | None = None,
                         chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """Summed cross-entropy of the output layer ``F.linear(x, weight, bias)`` on ``target``; pad rows give 0.

    x (N, E), weight (V, E), target (N,). Equal to ``sequence_loss(F.linear(x, weight, bias), target,
    label_smoothing, reduction="sum")`` (the softmax in fp32 whatever ``dtype``, the matmuls in
    ``dtype``, default x's), but the (N, V) logits, log-probabilities and their fp32 gradient are
    never materialised; only the (N, V) gradient in ``dtype``. ``chunk_bytes`` of fp32 softmax per
    chunk: 16 MB stays under glibc's largest mmap threshold, so no fresh pages per step.
    Measured on the 2-core EPYC, bf16, 2 threads, E 256, V 8000, forward + backward: N 640 rows
    18.2–18.6 → 15.9–17.8 ms; N 1400 rows 65–66 → 35–36 ms (the (N, V) fp32 tensors of the
    unfused path pass 32 MB there and page-fault on every step). Training only: backward runs once.
    """
    dtype = dtype or x.dtype
    chunk = max(1, chunk_bytes // (4 * weight.size(0)))
    return _LinearCrossEntropy.apply(x, weight, bias, target.reshape(-1), label_smoothing, dtype, chunk)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.inference_mode()
def corpus_cross_entropy(model: Seq2Seq, pairs: EncodedPairs, device: torch.device | str,
                         batch_size: int = 128, amp: torch.dtype | None = None,
                         slots: RecallSlots | None = None) -> float:
    """Mean per-token cross-entropy (no label smoothing) of the reference answers; exp() = perplexity.

    Under torch.distributed each rank scores every world_size-th batch and the sums are
    all-reduced, so every rank returns the same value (the same early-stopping decision).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    for idx in batch_order(pairs, batch_size, seed=0, epoch=0, shuffle=False)[rank::world]:
        b = collate(pairs, idx, slots).to(device)
        positions = b.tgt_out != PAD_ID
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits, _ = model(b.src, b.src_len, b.tgt_in, b.topic, positions=positions, recall=b.recall)
        sums[0] += sequence_loss(logits, b.tgt_out[positions], reduction="sum").double()
        sums[1] += positions.sum()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return float(sums[0] / sums[1].clamp(min=1))
