"""Cross-entropy on logits, shared by training and evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import EncodedPairs, batch_order, collate
from .config import PAD_ID
from .model import Seq2Seq


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over non-pad target positions. logits (B, T, V), target (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=PAD_ID, label_smoothing=label_smoothing)


@torch.inference_mode()
def corpus_cross_entropy(model: Seq2Seq, pairs: EncodedPairs, device: torch.device | str,
                         batch_size: int = 128, amp: torch.dtype | None = None) -> float:
    """Mean per-token cross-entropy (no label smoothing) of the reference answers; exp() = perplexity."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for idx in batch_order(pairs, batch_size, seed=0, epoch=0, shuffle=False):
        b = collate(pairs, idx).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits, _ = model(b.src, b.src_len, b.tgt_in, b.label)
        n = b.num_target_tokens
        total += float(sequence_loss(logits, b.tgt_out)) * n
        tokens += n
    model.train(was_training)
    return total / max(1, tokens)
