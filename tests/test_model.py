"""Shapes and invariants of the attention mechanisms and the seq2seq model (tiny sizes, fixed seed)."""
from __future__ import annotations

import pytest
import torch

from chatbot.attention import AdditiveAttention, DotAttention, GeneralAttention
from chatbot.config import BOS_ID, PAD_ID, ModelConfig
from chatbot.model import build_model, count_parameters

ATTENTIONS = ["none", "dot", "general", "additive"]


def make_batch(V=40, B=3, S=7, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    src_len = torch.tensor([S, S - 2, 2])[:B]
    for b in range(B):
        src[b, src_len[b]:] = PAD_ID
    tgt_in = torch.randint(4, V, (B, T), generator=g)
    tgt_in[:, 0] = BOS_ID
    return src, src_len, tgt_in


def tiny(attention="general", rnn="gru", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, emb_dim=8, hidden_dim=12, attention=attention, rnn=rnn, dropout=0.0, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("cls", [DotAttention, GeneralAttention, AdditiveAttention])
def test_attention_weights_sum_to_one_and_are_zero_on_padding(cls):
    torch.manual_seed(0)
    att = cls() if cls is DotAttention else cls(6, 6)
    memory = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    keys = att.project_keys(memory)
    context, weights = att(torch.randn(2, 3, 6), keys, memory, mask)
    assert context.shape == (2, 3, 6) and weights.shape == (2, 3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert torch.all(weights[1, :, 2:] == 0)
    # the context is the weighted sum of the values
    torch.testing.assert_close(context, weights @ memory)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_forward_shapes_and_masks(attention, rnn):
    model = tiny(attention, rnn, enc_layers=2, dec_layers=2)
    src, src_len, tgt_in = make_batch()
    logits, weights = model(src, src_len, tgt_in)
    assert logits.shape == (3, 5, 40)
    if attention == "none":
        assert weights is None
    else:
        assert weights.shape == (3, 5, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
        assert torch.all(weights[2, :, 2:] == 0)  # padding gets exactly zero weight


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_whole_sequence_decoder_equals_step_loop(attention):
    """The teacher-forced pass (one RNN call for Luong) must equal decoding step by step."""
    model = tiny(attention)
    src, src_len, tgt_in = make_batch()
    logits, weights = model(src, src_len, tgt_in)
    loop_features, loop_weights = model._step_loop(tgt_in, model.encode(src, src_len), 1.0)
    torch.testing.assert_close(logits, model.out(loop_features), atol=1e-5, rtol=1e-5)
    if weights is not None:
        torch.testing.assert_close(weights, loop_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ["dot", "general", "additive"])
def test_attention_depends_on_encoder_outputs(attention):
    model = tiny(attention)
    src, src_len, tgt_in = make_batch()
    _, w1 = model(src, src_len, tgt_in)
    src2 = src.clone()
    src2[0, 0] = (src2[0, 0] + 1 - 4) % 36 + 4  # change one source token
    _, w2 = model(src2, src_len, tgt_in)
    assert not torch.allclose(w1[0], w2[0])
    torch.testing.assert_close(w1[1:], w2[1:])  # other rows of the batch are untouched


def test_padding_does_not_change_outputs():
    model = tiny("general")
    src, src_len, tgt_in = make_batch()
    padded = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    a, wa = model(src, src_len, tgt_in)
    b, wb = model(padded, src_len, tgt_in)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wa, wb[:, :, :7])
    assert torch.all(wb[:, :, 7:] == 0)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.out.weight.data_ptr() == tied.embedding.weight.data_ptr()
    assert count_parameters(untied) - count_parameters(tied) == 40 * 8


def test_scheduled_sampling_uses_the_step_loop_and_backpropagates():
    torch.manual_seed(0)
    model = tiny("general").train()
    src, src_len, tgt_in = make_batch()
    logits, weights = model(src, src_len, tgt_in, teacher_forcing=0.5)
    assert logits.shape == (3, 5, 40) and weights.shape == (3, 5, 7)
    logits.sum().backward()
    assert model.embedding.weight.grad is not None


def test_topic_embedding_changes_the_output():
    model = tiny("general", num_topics=3)
    src, src_len, tgt_in = make_batch()
    a, _ = model(src, src_len, tgt_in, torch.tensor([0, 0, 0]))
    b, _ = model(src, src_len, tgt_in, torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)


def test_topic_vectors_start_at_the_scale_of_piece_vectors():
    """The label is added to every piece's embedding: at nn.Embedding's N(0, 1) it would drown them."""
    cfg = ModelConfig(vocab_size=8000, emb_dim=256, hidden_dim=64, num_topics=3)
    torch.manual_seed(0)
    model = build_model(cfg)
    piece_norm = model.embedding.weight[4:].norm(dim=1).mean()
    label_norm = model.encoder.topic_embedding.weight.norm(dim=1).mean()
    assert 0.5 < float(label_norm / piece_norm) < 2.0


def test_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="luong")


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_unpadded_batches_skip_packing_with_the_same_result(rnn):
    """One message (nothing padded) runs the RNN on the plain tensor; a padded copy goes through
    pack_padded_sequence: outputs and final states agree."""
    model = tiny(rnn=rnn)
    src = torch.randint(4, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 6])
    padded = torch.cat([src, torch.full((2, 3), PAD_ID)], dim=1)  # packed path: lengths < width
    with torch.no_grad():
        out, final = model.encoder(src, lengths)
        out_p, final_p = model.encoder(padded, lengths)
    torch.testing.assert_close(out, out_p[:, :6])
    assert (out_p[:, 6:] == 0).all()
    for a, b in zip(final if rnn == "lstm" else [final], final_p if rnn == "lstm" else [final_p]):
        torch.testing.assert_close(a, b)
