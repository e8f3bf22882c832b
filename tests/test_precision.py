"""The loss in fp32 whatever the logits' dtype, the fused output layer + loss, the dropout mask,
and bf16 autocast training on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatbot.batching import Batch
from chatbot.config import PAD_ID
from chatbot.losses import linear_cross_entropy, sequence_loss
from chatbot.model import Dropout
from chatbot.train import autocast_dtype, cpu_has_native_bf16, keep_freed_memory, train_step
from test_model import make_batch, tiny


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_loss_equals_pytorch_cross_entropy_with_padding_ignored(smoothing, reduction):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(4, 50, (3, 6))
    target[0, 2:] = PAD_ID
    target[2, 4:] = PAD_ID
    ours = sequence_loss(logits, target, smoothing, reduction)
    ref = F.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), ignore_index=PAD_ID,
                          label_smoothing=smoothing, reduction=reduction)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-5, atol=1e-6)
    assert float(g_ours[0, 2:].abs().sum()) == 0.0  # no gradient from padding


def test_sequence_loss_of_bf16_logits_is_computed_in_fp32():
    torch.manual_seed(0)
    logits = (3 * torch.randn(40, 8000)).bfloat16()
    target = torch.randint(4, 8000, (40,))
    loss = sequence_loss(logits, target, 0.1, "sum")
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_bytes", [4 * 50 * 3, 1 << 20])  # 3 rows per chunk (uneven), one chunk
def test_linear_cross_entropy_equals_the_output_layer_then_sequence_loss(smoothing, chunk_bytes):
    torch.manual_seed(0)
    x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(4, 50, (11,))
    target[[2, 7, 8]] = PAD_ID
    ref = sequence_loss(F.linear(x, weight, bias), target, smoothing, "sum")
    ours = linear_cross_entropy(x, weight, bias, target, smoothing, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-6)  # softmax in fp32
    scale = 0.37  # the incoming gradient (train_step divides the sum by the token count)
    g_ref = torch.autograd.grad(ref * scale, [x, weight, bias])
    g_ours = torch.autograd.grad(ours * scale, [x, weight, bias])
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(g_ours[0][[2, 7, 8]].abs().sum()) == 0.0  # no gradient from padding


def test_linear_cross_entropy_in_bf16_matches_autocast_logits():
    """The training path under bf16: matmuls in bf16, softmax in fp32, fp32 gradients for fp32 weights."""
    torch.manual_seed(0)
    x = torch.randn(300, 64).bfloat16().requires_grad_()
    weight = (torch.randn(2000, 64) * 0.125).requires_grad_()
    bias = torch.zeros(2000, requires_grad=True)
    target = torch.randint(4, 2000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(x, weight, bias)
    ref = sequence_loss(logits, target, 0.1, "sum")
    ours = linear_cross_entropy(x, weight, bias, target, 0.1, dtype=torch.bfloat16, chunk_bytes=64 * 2000 * 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-2)
    g_ref = torch.autograd.grad(ref, [x, weight, bias])
    g_ours = torch.autograd.grad(ours, [x, weight, bias])
    assert [g.dtype for g in g_ours] == [torch.bfloat16, torch.float32, torch.float32]
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))


@pytest.mark.parametrize("attention", ["none", "general", "additive"])
@pytest.mark.parametrize("teacher_forcing", [1.0, 0.5])
def test_features_then_the_output_layer_are_the_logits(attention, teacher_forcing):
    """``features=True`` stops before the output layer on every decoder path (whole-sequence and step loop)."""
    model = tiny(attention)
    src, src_len, tgt_in = make_batch()
    positions = tgt_in != PAD_ID
    positions[1, 3:] = False
    torch.manual_seed(1)
    logits, _ = model(src, src_len, tgt_in, positions=positions, teacher_forcing=teacher_forcing)
    torch.manual_seed(1)
    x, _ = model(src, src_len, tgt_in, positions=positions, teacher_forcing=teacher_forcing, features=True)
    assert x.shape == (int(positions.sum()), model.cfg.emb_dim)
    torch.testing.assert_close(model.out(x), logits)


def test_dropout_keeps_units_with_probability_1_minus_p_and_rescales():
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert float(kept.float().mean()) == pytest.approx(0.7, abs=0.005)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, y.detach())  # gradient flows through kept units only, same scale
    assert drop(x.bfloat16()).dtype == torch.bfloat16
    drop.eval()
    assert drop(x) is x
    assert Dropout(0.0).train()(x) is x
    assert float(Dropout(1.0).train()(x).detach().abs().sum()) == 0.0


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert isinstance(keep_freed_memory(), bool)


def test_a_bf16_autocast_step_on_the_cpu_learns_like_fp32():
    """The CUDA-style autocast path, run on the CPU: same first loss (to bf16 precision), loss falls."""
    src, src_len, tgt_in = make_batch(V=40, B=3, S=7, T=5)
    tgt_out = torch.cat([tgt_in[:, 1:], torch.full((3, 1), 3)], 1)

    b = Batch(src, src_len, tgt_in, tgt_out, torch.zeros(3, dtype=torch.long))
    losses = {}
    for amp in (None, torch.bfloat16):
        model = tiny("general").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        losses[amp] = [train_step(model, b, opt, scaler, amp=amp)[0] for _ in range(20)]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[torch.bfloat16][0] == pytest.approx(losses[None][0], rel=2e-2)
    assert losses[torch.bfloat16][-1] < 0.7 * losses[torch.bfloat16][0]
    assert losses[torch.bfloat16][-1] == pytest.approx(losses[None][-1], rel=2e-2)
