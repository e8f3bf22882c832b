"""RNN encoder-decoder with attention. The model returns logits; loss and softmax live outside.

Shapes: B batch, S source length, T reply length, E embedding size, H hidden size, V vocab.

Decoders, chosen by ``ModelConfig.attention``:

* ``dot`` / ``general`` (Luong et al., 2015): the RNN runs first, attention is applied to
  its output ``h_t``: ``c_t = Σ_s a_ts h̄_s``, ``h̃_t = tanh(W_c [c_t; h_t])``. Teacher-forced
  training needs no Python loop over time: one RNN call over the whole reply, one batched
  attention.
* ``additive`` (Bahdanau et al., 2015): attention uses the previous state ``s_{t-1}`` and its
  context is an RNN input, so it runs step by step.
* ``none``: the original fixed-context seq2seq: the encoder's final state starts the decoder
  and no attention is computed (a baseline that shows what attention buys).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .attention import build_attention
from .config import PAD_ID, ModelConfig

State = Tensor | tuple[Tensor, Tensor]  # GRU: h (L, B, H); LSTM: (h, c)


@dataclass
class Memory:
    """What the decoder needs from the encoder, computed once per source."""

    values: Tensor  # (B, S, H) encoder outputs
    keys: Tensor  # (B, S, Hk) keys projected for the attention score
    mask: Tensor  # (B, S) bool, True on real tokens
    state: State  # decoder's initial state

    def select(self, index: Tensor) -> "Memory":
        """Reorder / repeat the batch (beam search)."""
        return Memory(self.values.index_select(0, index), self.keys.index_select(0, index),
                      self.mask.index_select(0, index), select_state(self.state, index))


def select_state(state: State, index: Tensor) -> State:
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


def _noisy(x: State, scale: float) -> State:
    """x plus Gaussian noise of std ``scale`` x x's root mean square (not differentiated through)."""
    if isinstance(x, tuple):
        return tuple(_noisy(s, scale) for s in x)
    return x + (scale * x.detach().float().pow(2).mean().sqrt()).to(x.dtype) * torch.randn_like(x)


def _top_hidden(state: State) -> Tensor:
    """The last layer's hidden state, (B, H)."""
    h = state[0] if isinstance(state, tuple) else state
    return h[-1]


def _rnn(kind: str, *args, **kwargs) -> nn.RNNBase:
    return (nn.GRU if kind == "gru" else nn.LSTM)(*args, batch_first=True, **kwargs)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn by ``uniform_`` and a comparison instead of ``bernoulli_``.

    Same distribution and scaling (kept units × 1 / (1 − p)); no parameters, so checkpoints are
    unchanged. PyTorch's CPU ``bernoulli_`` draws ~130 M values/s against ~500 M for ``uniform_``
    (2-core EPYC): a dropout forward + backward on (64, 12, 256) went 1.6 → 0.7 ms, and a
    training step has three of them.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        keep = torch.empty_like(x, dtype=torch.float32).uniform_() >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class CharacterBag(nn.Module):
    """A piece's characters as a bag: the mean of their embeddings, projected to the embedding size.

    fastText's subword vectors (Bojanowski et al., 2017) turned around: pieces that share Hangul
    syllables ("헤어졌", "헤어진") share part of their input vector, so the encoder can relate
    questions that sentencepiece cut differently. ``piece_chars`` (V, K) holds each piece's
    character ids (0 = none; from :meth:`Tokenizer.character_table`), saved with the weights.
    """

    def __init__(self, vocab_size: int, char_vocab_size: int, max_chars: int, char_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("piece_chars", torch.zeros(vocab_size, max_chars, dtype=torch.int16))
        self.embedding = nn.Embedding(char_vocab_size, char_dim, padding_idx=0)
        self.proj = nn.Linear(char_dim, out_dim, bias=False)

    def forward(self, src: Tensor) -> Tensor:
        """src (B, S) piece ids -> (B, S, E)."""
        chars = self.piece_chars[src].int()  # (B, S, K)
        count = (chars != 0).sum(-1, keepdim=True).clamp(min=1)  # (B, S, 1)
        return self.proj(self.embedding(chars).sum(2) / count)  # (B, S, D) -> (B, S, E)


class Encoder(nn.Module):
    """Embedding (+ character bag) -> bidirectional RNN over packed sequences -> outputs (B, S, H)."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        self.char_bag = (CharacterBag(cfg.vocab_size, cfg.char_vocab_size, cfg.max_piece_chars, cfg.char_dim,
                                      cfg.emb_dim) if cfg.char_dim > 0 else None)
        self.label_embedding = (nn.Embedding(cfg.num_labels + int(cfg.unknown_topic), cfg.emb_dim)
                                if cfg.num_labels > 0 else None)  # row num_labels: "unknown topic" (if any)
        self.dropout = Dropout(cfg.dropout)
        self.rnn = _rnn(cfg.rnn, cfg.emb_dim, cfg.hidden_dim // 2, num_layers=cfg.enc_layers,
                        bidirectional=True, dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0)

    def forward(self, src: Tensor, src_len: Tensor, label: Tensor | None = None) -> tuple[Tensor, State]:
        x = self.embedding(src)  # (B, S, E)
        if self.char_bag is not None:
            x = x + self.char_bag(src)
        if self.label_embedding is not None and label is not None:
            x = x + self.label_embedding(label).unsqueeze(1)
        x = self.dropout(x)
        lengths = src_len.cpu()
        if bool((lengths == src.size(1)).all()):  # no padding (e.g. one message): packing buys nothing
            return self.rnn(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # (B, S, H)
        return out, final


class Bridge(nn.Module):
    """Encoder final states (2·L_enc, B, H/2) -> decoder initial state (L_dec, B, H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = cfg.dec_layers
        self.hidden = cfg.hidden_dim
        self.proj = nn.Linear(cfg.hidden_dim, cfg.dec_layers * cfg.hidden_dim)

    def _one(self, h: Tensor) -> Tensor:
        top = torch.cat([h[-2], h[-1]], dim=-1)  # last layer, forward and backward: (B, H)
        s = torch.tanh(self.proj(top))  # (B, L·H)
        return s.view(-1, self.layers, self.hidden).transpose(0, 1).contiguous()  # (L, B, H)

    def forward(self, final: State) -> State:
        if isinstance(final, tuple):
            return tuple(self._one(f) for f in final)
        return self._one(final)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, E = cfg.hidden_dim, cfg.emb_dim
        self.embedding = nn.Embedding(cfg.vocab_size, E, padding_idx=PAD_ID)
        self.encoder = Encoder(cfg, self.embedding)
        self.bridge = Bridge(cfg)
        self.attention = build_attention(cfg.attention, H, H)
        self.feeds_context = cfg.attention == "additive"
        dec_in = E + H if self.feeds_context else E
        self.decoder_rnn = _rnn(cfg.rnn, dec_in, H, num_layers=cfg.dec_layers,
                                dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0)
        self.dropout = Dropout(cfg.dropout)
        # Attentional hidden state h̃_t = tanh(W_c [c_t; h_t]), sized E so the output layer can be tied.
        self.combine = nn.Linear(H if self.attention is None else 2 * H, E)
        self.out = nn.Linear(E, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.out.weight = self.embedding.weight
        self._init()

    def _init(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.cfg.emb_dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()
        nn.init.zeros_(self.out.bias)
        if self.encoder.label_embedding is not None:  # one more input vector of a piece's size
            # (nn.Embedding's N(0, 1) made it 16x a piece's vector at E = 256: the label drowned the
            # question and the run's validation chrF stayed near 5 while the plain recipe reached 20)
            nn.init.normal_(self.encoder.label_embedding.weight, std=self.cfg.emb_dim ** -0.5)
        if self.encoder.char_bag is not None:
            bag = self.encoder.char_bag.embedding
            nn.init.normal_(bag.weight, std=bag.embedding_dim ** -0.5)
            with torch.no_grad():
                bag.weight[0].zero_()

    # ------------------------------------------------------------------ encoder
    def encode(self, src: Tensor, src_len: Tensor, label: Tensor | None = None) -> Memory:
        """src (B, S) token ids, src_len (B,) -> Memory."""
        values, final = self.encoder(src, src_len, label)
        state = self.bridge(final)
        if self.training and self.cfg.memory_noise > 0:
            # Blur each training question's point in state space, so that a paraphrase that lands
            # near it decodes its answer (the encoder's nearest training question is right as often
            # as TF-IDF's, the greedy reply much less: docs/experiments.md).
            values = _noisy(values, self.cfg.memory_noise)
            state = _noisy(state, self.cfg.memory_noise)
        keys = self.attention.project_keys(values) if self.attention is not None else values
        mask = src != PAD_ID  # (B, S)
        return Memory(values, keys, mask, state)

    # ------------------------------------------------------------------ decoder
    def _features(self, h: Tensor, context: Tensor | None, positions: Tensor | None = None) -> Tensor:
        """h (B, T, H) RNN outputs, context (B, T, H) or None -> the output layer's input (B, T, E).

        ``positions`` (B, T) bool: only those positions -> (N, E).
        """
        x = h if context is None else torch.cat([context, h], dim=-1)
        if positions is not None:
            x = x[positions]  # (N, 2H): the vocabulary projection is most of the FLOPs; skip padding
        return self.dropout(torch.tanh(self.combine(x)))

    def step(self, prev: Tensor, state: State, memory: Memory) -> tuple[Tensor, Tensor | None, State]:
        """One decoder step. prev (B,) previous tokens -> logits (B, V), attention (B, S) or None, state."""
        features, weights, state = self._step_features(prev, state, memory)
        return self.out(features), weights, state

    def _step_features(self, prev: Tensor, state: State, memory: Memory) -> tuple[Tensor, Tensor | None, State]:
        """:meth:`step` up to the output layer: features (B, E), attention (B, S) or None, state."""
        emb = self.dropout(self.embedding(prev)).unsqueeze(1)  # (B, 1, E)
        if self.feeds_context:
            query = _top_hidden(state).unsqueeze(1)  # s_{t-1}: (B, 1, H)
            context, weights = self.attention(query, memory.keys, memory.values, memory.mask)
            h, state = self.decoder_rnn(torch.cat([emb, context], dim=-1), state)  # (B, 1, H)
        else:
            h, state = self.decoder_rnn(emb, state)  # (B, 1, H)
            context = weights = None
            if self.attention is not None:
                context, weights = self.attention(h, memory.keys, memory.values, memory.mask)
        features = self._features(h, context).squeeze(1)  # (B, E)
        return features, (weights.squeeze(1) if weights is not None else None), state

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, label: Tensor | None = None,
                teacher_forcing: float = 1.0, positions: Tensor | None = None,
                features: bool = False) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced pass. tgt_in (B, T) starts with <s> -> logits (B, T, V), attention (B, T, S) or None.

        ``teacher_forcing < 1`` is scheduled sampling: with that probability each step reads the
        reference token, otherwise the model's own previous prediction (step loop).
        ``positions`` (B, T) bool, e.g. ``tgt_out != PAD_ID``: return only those positions'
        logits, (N, V) in row-major order (training: no output layer or loss on padding).
        ``features=True``: return the output layer's input instead of logits, (B, T, E) or (N, E),
        for :func:`chatbot.losses.linear_cross_entropy` (training).
        """
        memory = self.encode(src, src_len, label)
        if self.feeds_context or teacher_forcing < 1.0:
            x, weights = self._step_loop(tgt_in, memory, teacher_forcing)  # (B, T, E)
            x = x if positions is None else x[positions]
            return (x if features else self.out(x)), weights
        emb = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        h, _ = self.decoder_rnn(emb, memory.state)  # (B, T, H): one call over the whole reply
        context = weights = None
        if self.attention is not None:
            context, weights = self.attention(h, memory.keys, memory.values, memory.mask)
        x = self._features(h, context, positions)
        return (x if features else self.out(x)), weights

    def _step_loop(self, tgt_in: Tensor, memory: Memory, teacher_forcing: float) -> tuple[Tensor, Tensor | None]:
        """Step by step over tgt_in -> output-layer inputs (B, T, E), attention (B, T, S) or None."""
        state, prev = memory.state, tgt_in[:, 0]
        feature_steps, weight_steps = [], []
        for t in range(tgt_in.size(1)):
            x, weights, state = self._step_features(prev, state, memory)
            feature_steps.append(x)
            if weights is not None:
                weight_steps.append(weights)
            if t + 1 < tgt_in.size(1):
                prev = tgt_in[:, t + 1]
                if teacher_forcing < 1.0:
                    use_model = torch.rand(prev.shape, device=prev.device) >= teacher_forcing
                    prev = torch.where(use_model & (prev != PAD_ID), self.out(x).argmax(-1), prev)
        weights = torch.stack(weight_steps, 1) if weight_steps else None
        return torch.stack(feature_steps, 1), weights


def build_model(cfg: ModelConfig, tokenizer=None) -> Seq2Seq:
    """The model for ``cfg``. With a ``tokenizer`` (a new model, not a checkpoint being loaded) and
    ``cfg.char_dim > 0``, the character bag's table comes from it and ``cfg.char_vocab_size`` is set."""
    table = None
    if tokenizer is not None and cfg.char_dim > 0:
        table, cfg.char_vocab_size = tokenizer.character_table(cfg.max_piece_chars)
    model = Seq2Seq(cfg)
    if table is not None:
        model.encoder.char_bag.piece_chars.copy_(torch.from_numpy(table))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
