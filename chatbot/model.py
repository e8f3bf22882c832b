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

Recall (``model.recall_k = K > 0``, Luong attention only): the decoder also reads K training pairs
recalled for the message (:mod:`chatbot.recall`), each slot its question, ``</s>``, its answer,
encoded by the same encoder with a rank vector and its recall score added to every piece (message
and slots in one packed encoder call). The
attention runs over [message ; recall 1 ; … ; recall K] with **one** softmax, and a copy gate
(See et al., 2017) mixes generating with copying the attended pieces:

    p(y_t) = g_t · softmax(W_s h̃_t)[y_t] + (1 − g_t) · Σ_{s: x_s = y_t} a_t(s),
    g_t = σ(w_g · [c_t; h_t; e(y_{t−1})] + b_g)

Before that softmax each position's score gets a continuation bias c + u[y_{t−1}] where the position
follows the piece just written in its own text (x_{s−1} = y_{t−1}): c shared, u one learned weight per
piece, so a copy that has begun can go on in the same recall instead of splicing pieces from several.
c starts at CONTINUATION_INIT, not 0: teacher forcing always feeds the reference's previous piece, so
training never shows the splices that a weak bias lets through at decoding, and c learned from 0
only reaches about 0.25 (docs/experiments.md, ninth session).

Message and recalls share one sentencepiece vocabulary, so copying is a ``scatter_add`` of the
attention weights onto the piece ids (no extended vocabulary). Such a model returns ``log p`` where
others return logits: ``softmax(log p) = p``, so decoding and the loss treat both alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .attention import build_attention
from .config import EOS_ID, PAD_ID, ModelConfig

CONTINUATION_INIT = 2.0  # c's start; measured against 0 and 4 (docs/experiments.md, ninth session)

State = Tensor | tuple[Tensor, Tensor]  # GRU: h (L, B, H); LSTM: (h, c)


@dataclass
class Memory:
    """What the decoder needs from the encoder, computed once per source."""

    values: Tensor  # (B, S, H) encoder outputs
    keys: Tensor  # (B, S, Hk) keys projected for the attention score
    mask: Tensor  # (B, S) bool, True on real tokens
    state: State  # decoder's initial state
    copy_ids: Tensor | None = None  # (B, S) the piece each position copies (recall models; PAD: none)
    follows: Tensor | None = None  # (B, S) the piece just before each position in its text (recall models; PAD: none)

    def select(self, index: Tensor) -> "Memory":
        """Reorder / repeat the batch (beam search)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return Memory(pick(self.values), pick(self.keys), pick(self.mask), select_state(self.state, index),
                      pick(self.copy_ids), pick(self.follows))


@dataclass
class RecallInput:
    """The K training pairs recalled for each message, as the encoder reads them."""

    ids: Tensor  # (B, K, L) each slot: question pieces, </s>, answer pieces; PAD after (an empty slot: one </s>)
    lengths: Tensor  # (B, K) real pieces per slot (>= 1)
    scores: Tensor  # (B, K) the recall's similarity in [0, 1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RecallInput":
        return RecallInput(*(t.to(device, non_blocking=non_blocking) for t in (self.ids, self.lengths, self.scores)))

    def select(self, i: int) -> "RecallInput":
        """The recall of source ``i`` alone (batch of one)."""
        return RecallInput(self.ids[i: i + 1], self.lengths[i: i + 1], self.scores[i: i + 1])


def _follows(ids: Tensor) -> Tensor:
    """ids (..., L) -> the piece just before each position (..., L); PAD at the first."""
    return F.pad(ids[..., :-1], (1, 0), value=PAD_ID)


def select_state(state: State, index: Tensor) -> State:
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


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


class Encoder(nn.Module):
    """Embedding (+ topic vector) -> bidirectional RNN over packed sequences -> outputs (B, S, H)."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        self.topic_embedding = nn.Embedding(cfg.num_topics, cfg.emb_dim) if cfg.num_topics > 0 else None
        self.dropout = Dropout(cfg.dropout)
        self.rnn = _rnn(cfg.rnn, cfg.emb_dim, cfg.hidden_dim // 2, num_layers=cfg.enc_layers,
                        bidirectional=True, dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0)

    def forward(self, src: Tensor, src_len: Tensor, topic: Tensor | None = None,
                extra: Tensor | None = None) -> tuple[Tensor, State]:
        """src (B, S), src_len (B,), topic (B,) or None, extra (B, E) or None (a vector added to every
        piece: a recall slot's rank and score) -> outputs (B, S, H), final states."""
        return self.run(self.embed(src, topic, extra), src_len)

    def embed(self, src: Tensor, topic: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        """The RNN's input (B, S, E): piece vectors (+ topic vector) (+ ``extra``), dropout."""
        x = self.embedding(src)  # (B, S, E)
        if self.topic_embedding is not None and topic is not None:
            x = x + self.topic_embedding(topic).unsqueeze(1)
        if extra is not None:
            x = x + extra.unsqueeze(1)
        return self.dropout(x)

    def run(self, x: Tensor, src_len: Tensor) -> tuple[Tensor, State]:
        """x (B, S, E) from :meth:`embed`, src_len (B,) -> outputs (B, S, H), final states."""
        lengths = src_len.cpu()
        if bool((lengths == x.size(1)).all()):  # no padding (e.g. one message): packing buys nothing
            return self.rnn(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (B, S, H)
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
        self.copies = cfg.recall_k > 0
        if self.copies:
            self.rank_embedding = nn.Embedding(cfg.recall_k, E)  # which recall slot (1st, 2nd, ...)
            self.score_proj = nn.Linear(1, E, bias=False)  # how similar its question is to the message
            self.copy_gate = nn.Linear(2 * H + E, 1)  # g_t = σ(w_g · [c_t; h_t; e(y_{t-1})] + b_g)
            # Continuation: score(t, s) += c + u[y_{t-1}] where position s follows the piece y_{t-1} in its
            # text, so a copy, once begun, can go on in the same recall (c shared, u one weight per piece).
            self.continuation = nn.Embedding(cfg.vocab_size, 1)
            self.continuation_all = nn.Parameter(torch.zeros(()))  # c
        self._init()

    def _init(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.cfg.emb_dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()
        nn.init.zeros_(self.out.bias)
        if self.encoder.topic_embedding is not None:  # one more input vector of a piece's size
            # (nn.Embedding's N(0, 1) made it 16x a piece's vector at E = 256: the topic drowned the
            # question and the run's validation chrF stayed near 5 while the plain recipe reached 20)
            nn.init.normal_(self.encoder.topic_embedding.weight, std=self.cfg.emb_dim ** -0.5)
        if self.copies:  # slot vectors at a piece vector's scale, for the same reason
            nn.init.normal_(self.rank_embedding.weight, std=self.cfg.emb_dim ** -0.5)
            nn.init.zeros_(self.continuation.weight)  # no preference of its own until learned
            nn.init.constant_(self.continuation_all, CONTINUATION_INIT)

    # ------------------------------------------------------------------ encoder
    def encode(self, src: Tensor, src_len: Tensor, topic: Tensor | None = None,
               recall: RecallInput | None = None) -> Memory:
        """src (B, S) token ids, src_len (B,), topic (B,) or None, recall (recall models) -> Memory.

        With recall, the memory is [message ; recall 1 ; … ; recall K]: (B, S + K·L) positions; the
        decoder's first state comes from the message alone.
        """
        if not self.copies:
            return self.encode_message(src, src_len, topic)
        if recall is None:
            raise ValueError("this model reads recalled training pairs (model.recall_k > 0): pass recall")
        # Message and slots through the shared encoder in one RNN call (B + B·K sequences, packed).
        B, K, L = recall.ids.shape
        S = src.size(1)
        M = max(S, L)
        x = torch.cat([F.pad(self.encoder.embed(src, topic), (0, 0, 0, M - S)),
                       F.pad(self.encoder.embed(recall.ids.reshape(B * K, L), extra=self._slot_vectors(recall)),
                             (0, 0, 0, M - L))])  # (B + B·K, M, E)
        out, final = self.encoder.run(x, torch.cat([src_len, recall.lengths.reshape(B * K)]))
        values = torch.cat([out[:B, :S], out[B:, :L].reshape(B, K * L, -1)], 1)  # (B, S + K·L, H)
        keys = self.attention.project_keys(values)
        rec_ids = recall.ids.reshape(B, K * L)
        # The separator </s> is read, never copied (copying it would end the reply): PAD is banned anyway.
        copy_ids = torch.cat([src, rec_ids.masked_fill(rec_ids == EOS_ID, PAD_ID)], 1)
        follows = torch.cat([_follows(src), _follows(recall.ids).flatten(1)], 1)  # within each text
        return Memory(values, keys, torch.cat([src, rec_ids], 1) != PAD_ID,
                      self.bridge(select_state(final, torch.arange(B, device=src.device))), copy_ids, follows)

    def encode_message(self, src: Tensor, src_len: Tensor, topic: Tensor | None = None) -> Memory:
        """The message alone -> Memory (B, S): all a model without recall reads; for a recall model, what
        its encoder makes of the message (probes), not what its decoder attends over (:meth:`encode`)."""
        values, final = self.encoder(src, src_len, topic)
        keys = self.attention.project_keys(values) if self.attention is not None else values
        return Memory(values, keys, src != PAD_ID, self.bridge(final))

    def _slot_vectors(self, recall: RecallInput) -> Tensor:
        """What marks each recall slot, added to every piece it holds: rank vector + projected score (B·K, E)."""
        B, K, _ = recall.ids.shape
        rank = self.rank_embedding(torch.arange(K, device=recall.ids.device)).unsqueeze(0)  # (1, K, E)
        return (rank + self.score_proj(recall.scores.unsqueeze(-1).to(rank.dtype))).reshape(B * K, -1)

    def _mixture(self, x: Tensor, gate_in: Tensor, weights: Tensor, copy_ids: Tensor, smoothing: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (N, E) output-layer input, gate_in (N, 2H + E) = [c; h; e], weights (N, S) attention,
        copy_ids (N, S) -> log p (N, V) of the mixture (fp32), gate g (N,) in [0, 1], and the mean over
        the vocabulary of the generator's log q (N,) (label smoothing's term, see :meth:`forward`; None
        unless ``smoothing``)."""
        gate = torch.sigmoid(self.copy_gate(gate_in).float()).squeeze(-1)  # (N,)
        g = gate.unsqueeze(-1)
        if not torch.is_grad_enabled() and not smoothing:
            # Decoding: the same sum in place, copy mass added where it lands (no (N, V) copy tensor).
            p = torch.softmax(self.out(x).float(), dim=-1).mul_(g)
            p.scatter_add_(1, copy_ids, weights.float() * (1 - g))
            return p.clamp_min_(1e-12).log_(), gate, None
        log_vocab = torch.log_softmax(self.out(x).float(), dim=-1)  # (N, V)
        copy = torch.zeros_like(log_vocab).scatter_add_(1, copy_ids, weights.float())  # (N, V)
        mean_log_vocab = log_vocab.mean(-1) if smoothing else None
        p = g * log_vocab.exp() + (1 - g) * copy
        return torch.log(p.clamp_min(1e-12)), gate, mean_log_vocab

    # ------------------------------------------------------------------ decoder
    def _attend(self, query: Tensor, memory: Memory, prev: Tensor) -> tuple[Tensor, Tensor]:
        """The attention over ``memory`` for decoder queries (B, T, H) that read the pieces ``prev`` (B, T).

        A recall model adds the continuation bias c + u[y_{t-1}] to the score of every position that follows
        y_{t-1} in its own text (message or recall slot): a copy, once begun, may go on where it is.
        """
        bias = None
        if self.copies:
            follows = (prev.unsqueeze(-1) == memory.follows.unsqueeze(1)) & (prev != PAD_ID).unsqueeze(-1)
            bias = follows * (self.continuation(prev) + self.continuation_all)  # (B, T, S); PAD follows nothing
        return self.attention(query, memory.keys, memory.values, memory.mask, bias)

    def _features(self, h: Tensor, context: Tensor | None, positions: Tensor | None = None) -> Tensor:
        """h (B, T, H) RNN outputs, context (B, T, H) or None -> the output layer's input (B, T, E).

        ``positions`` (B, T) bool: only those positions -> (N, E).
        """
        x = h if context is None else torch.cat([context, h], dim=-1)
        if positions is not None:
            x = x[positions]  # (N, 2H): the vocabulary projection is most of the FLOPs; skip padding
        return self.dropout(torch.tanh(self.combine(x)))

    def step(self, prev: Tensor, state: State, memory: Memory
             ) -> tuple[Tensor, Tensor | None, State, Tensor | None]:
        """One decoder step. prev (B,) previous tokens -> logits (B, V) (log p for a recall model),
        attention (B, S) or None, state, copy gate g (B,) or None (models without recall)."""
        features, weights, state, gate_in = self._step_features(prev, state, memory)
        if self.copies:
            logp, gate, _ = self._mixture(features, gate_in, weights, memory.copy_ids, smoothing=False)
            return logp, weights, state, gate
        return self.out(features), weights, state, None

    def _step_features(self, prev: Tensor, state: State, memory: Memory
                       ) -> tuple[Tensor, Tensor | None, State, Tensor | None]:
        """:meth:`step` up to the output layer: features (B, E), attention (B, S) or None, state, and for a
        recall model the copy gate's input [c_t; h_t; e(y_{t-1})] (B, 2H + E)."""
        emb = self.dropout(self.embedding(prev)).unsqueeze(1)  # (B, 1, E)
        if self.feeds_context:
            query = _top_hidden(state).unsqueeze(1)  # s_{t-1}: (B, 1, H)
            context, weights = self._attend(query, memory, prev.unsqueeze(1))
            h, state = self.decoder_rnn(torch.cat([emb, context], dim=-1), state)  # (B, 1, H)
        else:
            h, state = self.decoder_rnn(emb, state)  # (B, 1, H)
            context = weights = None
            if self.attention is not None:
                context, weights = self._attend(h, memory, prev.unsqueeze(1))
        features = self._features(h, context).squeeze(1)  # (B, E)
        gate_in = torch.cat([context, h, emb], -1).squeeze(1) if self.copies else None
        return features, (weights.squeeze(1) if weights is not None else None), state, gate_in

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, topic: Tensor | None = None,
                teacher_forcing: float = 1.0, positions: Tensor | None = None,
                features: bool = False, recall: RecallInput | None = None) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced pass. tgt_in (B, T) starts with <s> -> logits (B, T, V), attention (B, T, S) or None.

        ``teacher_forcing < 1`` is scheduled sampling: with that probability each step reads the
        reference token, otherwise the model's own previous prediction (step loop).
        ``positions`` (B, T) bool, e.g. ``tgt_out != PAD_ID``: return only those positions'
        logits, (N, V) in row-major order (training: no output layer or loss on padding).
        ``features=True``: return the output layer's input instead of logits, (B, T, E) or (N, E),
        for :func:`chatbot.losses.linear_cross_entropy` (training). A recall model returns the mixture's
        log p, (B, T, V) or (N, V), and with ``features=True`` the pair (log p, mean over the vocabulary
        of the generator's log q): label smoothing is taken on the generator alone (on the mixture it
        would charge the copy gate ε·log g at every piece and push it towards generating).
        """
        memory = self.encode(src, src_len, topic, recall)
        if self.copies and teacher_forcing < 1.0:
            raise ValueError("a recall model trains teacher-forced (no scheduled sampling)")
        if self.feeds_context or teacher_forcing < 1.0:
            x, weights = self._step_loop(tgt_in, memory, teacher_forcing)  # (B, T, E)
            x = x if positions is None else x[positions]
            return (x if features else self.out(x)), weights
        emb = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        h, _ = self.decoder_rnn(emb, memory.state)  # (B, T, H): one call over the whole reply
        context = weights = None
        if self.attention is not None:
            context, weights = self._attend(h, memory, tgt_in)
        x = self._features(h, context, positions)
        if self.copies:
            logp, mean_log_vocab = self._teacher_forced_mixture(x, torch.cat([context, h, emb], -1), weights,
                                                                memory.copy_ids, positions)
            return ((logp, mean_log_vocab) if features else logp), weights
        return (x if features else self.out(x)), weights

    def _teacher_forced_mixture(self, x: Tensor, gate_in: Tensor, weights: Tensor, copy_ids: Tensor,
                                positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`_mixture` over a whole reply: gate_in (B, T, 2H + E), weights (B, T, S), copy_ids (B, S);
        x (N, E) at ``positions`` or (B, T, E) -> log p (N, V) or (B, T, V), mean log q (N,) or (B, T)."""
        B, T, S = weights.shape
        ids = copy_ids.unsqueeze(1).expand(B, T, S)
        if positions is not None:
            logp, _, mean_log_vocab = self._mixture(x, gate_in[positions], weights[positions], ids[positions])
            return logp, mean_log_vocab
        logp, _, mean_log_vocab = self._mixture(x.reshape(B * T, -1), gate_in.reshape(B * T, -1),
                                                weights.reshape(B * T, S), ids.reshape(B * T, S))
        return logp.view(B, T, -1), mean_log_vocab.view(B, T)

    def _step_loop(self, tgt_in: Tensor, memory: Memory, teacher_forcing: float) -> tuple[Tensor, Tensor | None]:
        """Step by step over tgt_in -> output-layer inputs (B, T, E), attention (B, T, S) or None."""
        state, prev = memory.state, tgt_in[:, 0]
        feature_steps, weight_steps = [], []
        for t in range(tgt_in.size(1)):
            x, weights, state, _ = self._step_features(prev, state, memory)
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


def build_model(cfg: ModelConfig) -> Seq2Seq:
    """The model for ``cfg`` (JoeyNMT's ``build_model``: one place that builds the parts)."""
    return Seq2Seq(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
