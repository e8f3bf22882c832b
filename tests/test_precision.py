"""The loss in fp32 whatever the logits' dtype, and bf16 autocast training on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatbot.batching import Batch
from chatbot.config import PAD_ID
from chatbot.losses import sequence_loss
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
