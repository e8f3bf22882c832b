"""The naive reference: attention seq2seq the way the classic tutorials write it.

Kept only as a yardstick for ``python -m chatbot bench``; nothing in ``chatbot/`` imports it.
It follows the PyTorch "chatbot" / "seq2seq translation" tutorials and the Korean
ChatbotData tutorials that copy them, including the habits STYLE.md rejects:

* the decoder is a Python loop over a fixed maximum length (``max_len``), one step per
  position, whatever the batch's real lengths;
* the Luong "general" score re-projects every encoder output at every step
  (``energy = self.attn(encoder_outputs)`` inside the step);
* no source padding mask;
* softmax inside the decoder, then NLL on ``log`` of those probabilities;
* a ``zeros(batch, max_len, vocab)`` output buffer allocated for every batch.

The sizes are the same as ours (embedding E, decoder hidden H, bidirectional encoder of H/2
per direction, vocabulary V), so the FLOPs per real token differ only by the waste above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_ID, BOS_ID = 0, 2


class NaiveEncoder(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden // 2, bidirectional=True, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        out, h = self.gru(self.dropout(self.embedding(src)))  # padded, not packed: (B, S, H)
        return out, torch.cat([h[0], h[1]], dim=-1).unsqueeze(0)  # (1, B, H)


class NaiveAttnDecoder(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.attn = nn.Linear(hidden, hidden)
        self.concat = nn.Linear(2 * hidden, emb)
        self.out = nn.Linear(emb, vocab)
        self.dropout = nn.Dropout(dropout)

    def forward(self, token: Tensor, hidden: Tensor, enc_out: Tensor) -> tuple[Tensor, Tensor]:
        """token (B,), hidden (1, B, H), enc_out (B, S, H) -> probabilities (B, V), hidden."""
        emb = self.dropout(self.embedding(token).unsqueeze(1))  # (B, 1, E)
        rnn_out, hidden = self.gru(emb, hidden)  # (B, 1, H)
        energy = self.attn(enc_out)  # recomputed at every step, as in the tutorial
        scores = torch.sum(rnn_out * energy, dim=2)  # (B, S), no padding mask
        weights = F.softmax(scores, dim=1).unsqueeze(1)  # (B, 1, S)
        context = weights.bmm(enc_out).squeeze(1)  # (B, H)
        concat = torch.tanh(self.concat(torch.cat([rnn_out.squeeze(1), context], dim=1)))
        return F.softmax(self.out(self.dropout(concat)), dim=1), hidden  # softmax inside the decoder


class NaiveSeq2Seq(nn.Module):
    def __init__(self, vocab: int = 8000, emb: int = 256, hidden: int = 512, dropout: float = 0.3,
                 max_len: int = 48):
        super().__init__()
        self.max_len = max_len
        self.encoder = NaiveEncoder(vocab, emb, hidden, dropout)
        self.decoder = NaiveAttnDecoder(vocab, emb, hidden, dropout)
        self.vocab = vocab

    def forward(self, src: Tensor, tgt_out: Tensor) -> Tensor:
        """Teacher-forced pass over ``max_len`` steps -> probabilities (B, max_len, V)."""
        B = src.size(0)
        enc_out, hidden = self.encoder(src)
        outputs = torch.zeros(B, self.max_len, self.vocab)  # the per-batch output buffer
        token = torch.full((B,), BOS_ID, dtype=torch.long)
        target = F.pad(tgt_out, (0, self.max_len - tgt_out.size(1)), value=PAD_ID)
        for t in range(self.max_len):
            probs, hidden = self.decoder(token, hidden, enc_out)
            outputs[:, t] = probs
            token = target[:, t]
        return outputs

    def loss(self, src: Tensor, tgt_out: Tensor) -> Tensor:
        probs = self.forward(src, tgt_out)
        target = F.pad(tgt_out, (0, self.max_len - tgt_out.size(1)), value=PAD_ID)
        return F.nll_loss(torch.log(probs).view(-1, self.vocab), target.view(-1), ignore_index=PAD_ID)


def naive_train_step(model: NaiveSeq2Seq, optimizer: torch.optim.Optimizer, src: Tensor, tgt_out: Tensor,
                     clip: float = 1.0) -> float:
    """One tutorial-style step: forward, NLL(log(softmax)), backward, clip, Adam."""
    optimizer.zero_grad()
    loss = model.loss(src, tgt_out)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()
