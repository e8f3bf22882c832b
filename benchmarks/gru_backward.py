"""Would a GRU with its weight gradients as single matmuls train faster on the CPU? (An experiment.)

    python benchmarks/gru_backward.py [--threads 2]

PyTorch's CPU GRU (``aten::gru``) runs autograd through every time step: each step's
``h @ W_hhᵀ`` has its own ``AddmmBackward`` that computes a (3H × H) weight gradient, and the T
gradients are summed one ``add_`` at a time. :class:`GRULayer` below is one direction of a GRU
with a hand-written backward: the recurrence still needs one small matmul per step (``dh @ W_hh``),
but ``dW_hh``, ``dW_ih`` and the input gradient are each one matmul over all T·B rows, and the
packed (variable-length) sequences of our encoder become a mask. The script checks it against
``nn.GRU`` in float64 (plain and packed bidirectional: outputs, final states and every gradient
to ~1e-15) and then times forward + backward in bf16 at the decoder's and the encoder's sizes.

Result on the 2-core EPYC (docs/performance.md, sixth session): no faster than ``nn.GRU``
(steady pair, GRULayer vs nn.GRU: decoder 14.2 vs 13.1 ms, one encoder direction 6.5 vs 6.2 ms)
and, patched into the training step, 7,977 vs 7,853 tok/s at batch 64 and 9,778 vs 10,750 at 128 (the fourth
session's version of the same idea gave the same answer). The step's small matmuls
already run at 730–820 GFLOP/s; what the hand-written backward saves in matmuls it spends in
per-step element-wise ops (each ~10–15 µs on a (64, 512) tensor here). So it is not in the package.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class GRULayer(torch.autograd.Function):
    """One GRU direction over a time-major sequence x (T, B, I) from h0 (B, H); ``mask`` (T, B, 1)
    bool marks real steps (padded steps keep the state, output 0, as packed sequences do);
    ``reverse`` runs from the end. Matmuls in ``dtype``, the state and gates in x's dtype."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse, dtype):
        T, B, _ = x.shape
        H, acc = h0.shape[-1], x.dtype
        wih, whh = w_ih.to(dtype), w_hh.to(dtype)
        xd = x.to(dtype).contiguous()
        gi = torch.mm(xd.view(T * B, -1), wih.t()).view(T, B, 3 * H).to(acc) + b_ih
        gi[..., :2 * H] += b_hh[:2 * H]
        b_hn, whh_t = b_hh[2 * H:], whh.t()
        out, n_all, ghn_all, hprev = (x.new_empty(T, B, H) for _ in range(4))
        rz_all = x.new_empty(T, B, 2 * H)
        h = h0.to(acc)
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            hprev[t] = h
            gh = torch.mm(h.to(dtype), whh_t).to(acc)
            rz = torch.sigmoid_(gi[t, :, :2 * H] + gh[:, :2 * H])
            ghn = gh[:, 2 * H:] + b_hn
            n = torch.tanh_(torch.addcmul(gi[t, :, 2 * H:], rz[:, :H], ghn))
            hn = torch.addcmul(n, rz[:, H:], h - n)
            if mask is not None:
                hn = torch.where(mask[t], hn, h)
            rz_all[t], n_all[t], ghn_all[t], out[t] = rz, n, ghn, hn
            h = hn
        ctx.save_for_backward(xd, wih, whh, hprev, rz_all, n_all, ghn_all, mask)
        ctx.reverse, ctx.dtype = reverse, dtype
        return (out * mask if mask is not None else out), h

    @staticmethod
    def backward(ctx, dout, dh_last):
        xd, wih, whh, hprev, rz_all, n_all, ghn_all, mask = ctx.saved_tensors
        T, B, H = hprev.shape
        acc, dtype = hprev.dtype, ctx.dtype
        dgi = dout.new_empty(T, B, 3 * H)  # gradients of the input-side pre-activations
        dghn = dout.new_empty(T, B, H)  # of W_hn h + b_hn
        dh = dh_last.to(acc).clone() if dh_last is not None else dout.new_zeros(B, H)
        if mask is not None:
            dout = dout * mask
        for t in (range(T) if ctx.reverse else range(T - 1, -1, -1)):
            g = dh + dout[t]
            if mask is not None:
                carry, g = torch.where(mask[t], 0.0, g), torch.where(mask[t], g, 0.0)
            r, z, n = rz_all[t, :, :H], rz_all[t, :, H:], n_all[t]
            dn = g * (1 - z) * (1 - n * n)
            dz = g * (hprev[t] - n) * z * (1 - z)
            dr = dn * ghn_all[t] * r * (1 - r)
            dgi[t, :, :H], dgi[t, :, H:2 * H], dgi[t, :, 2 * H:] = dr, dz, dn
            dghn[t] = dn * r
            dh = g * z + torch.mm(torch.cat([dr, dz, dghn[t]], 1).to(dtype), whh).to(acc)
            if mask is not None:
                dh = dh + carry
        dgh = torch.cat([dgi[..., :2 * H], dghn], -1).view(T * B, 3 * H)
        flat = dgi.view(T * B, 3 * H)
        dw_hh = torch.mm(dgh.t().to(dtype), hprev.view(T * B, H).to(dtype)).to(acc)
        dw_ih = torch.mm(flat.t().to(dtype), xd.view(T * B, -1)).to(acc)
        dx = torch.mm(flat.to(dtype), wih).to(acc).view(T, B, -1)
        return dx, dh, dw_ih, dw_hh, flat.sum(0), dgh.sum(0), None, None, None


def _params(rnn: nn.GRU, suffix: str = "") -> list[torch.Tensor]:
    return [getattr(rnn, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def check() -> None:
    """Float64 agreement with nn.GRU: one direction from a given state, and packed bidirectional."""
    torch.manual_seed(0)
    T, B, I, H = 7, 5, 6, 4
    gru = nn.GRU(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, B, H, dtype=torch.double, requires_grad=True)
    y, hT = gru(x, h0)
    (y.pow(2).sum() + 3 * hT.sum()).backward()
    ref = [x.grad.clone(), h0.grad.clone()] + [p.grad.clone() for p in gru.parameters()]
    x.grad = h0.grad = None
    gru.zero_grad()
    y2, h2 = GRULayer.apply(x, h0[0], *_params(gru), None, False, torch.double)
    (y2.pow(2).sum() + 3 * h2.sum()).backward()
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)
    for a, b in zip(ref, [x.grad, h0.grad] + [p.grad for p in gru.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    S, lengths = 6, torch.tensor([6, 3, 1, 4])
    bi = nn.GRU(I, H, batch_first=True, bidirectional=True).double()
    xb = torch.randn(4, S, I, dtype=torch.double, requires_grad=True)
    out, final = bi(pack_padded_sequence(xb, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=S)
    w = torch.randn_like(out)
    ((out * w).sum() + final.sum()).backward()
    ref = [xb.grad.clone()] + [p.grad.clone() for p in bi.parameters()]
    xb.grad = None
    bi.zero_grad()
    mask = (torch.arange(S)[:, None] < lengths[None, :]).unsqueeze(-1)  # (S, B, 1)
    xt, zero = xb.transpose(0, 1), xb.new_zeros(4, H)
    of, hf = GRULayer.apply(xt, zero, *_params(bi), mask, False, torch.double)
    ob, hb = GRULayer.apply(xt, zero, *_params(bi, "_reverse"), mask, True, torch.double)
    out2 = torch.cat([of, ob], -1).transpose(0, 1)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.stack([hf, hb]), final, rtol=0, atol=1e-12)
    ((out2 * w).sum() + hf.sum() + hb.sum()).backward()
    for a, b in zip(ref, [xb.grad] + [p.grad for p in bi.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    print("GRULayer == nn.GRU in float64 (one direction; packed bidirectional): outputs, states, gradients")


def timing(T: int, B: int, I: int, H: int, reps: int = 30) -> None:
    gru = nn.GRU(I, H, batch_first=True)
    x = torch.randn(B, T, I, requires_grad=True)
    h0 = torch.randn(1, B, H)

    def reference() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = gru(x, h0)
        y.float().sum().backward()

    def ours() -> None:
        y, _ = GRULayer.apply(x.transpose(0, 1), h0[0], *_params(gru), None, False, torch.bfloat16)
        y.sum().backward()

    for name, fn in (("nn.GRU (autocast bf16)", reference), ("GRULayer (bf16 matmuls)", ours)) * 2:
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        print(f"  T {T} B {B} in {I} hidden {H}  {name:24s} {(time.perf_counter() - t) / reps * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from chatbot.train import keep_freed_memory
    keep_freed_memory()  # freed buffers stay mapped: no page faults in the timed loop
    check()
    print("forward + backward, mean of 30 (each pair run twice: the second is the steady one):")
    timing(12, 64, 256, 512)  # the decoder of configs/default.yaml
    timing(12, 64, 256, 256)  # one encoder direction


if __name__ == "__main__":
    main()
