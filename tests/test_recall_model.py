"""The recall model (model.recall_k > 0): one softmax over message + recalls, the copy gate, decoding,
training, saving and serving it (tiny sizes, fixed seeds, a tiny corpus)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from chatbot.config import BOS_ID, EOS_ID, PAD_ID, ModelConfig
from chatbot.model import RecallInput, build_model
from chatbot.search import DecodeOptions, beam_search, greedy, sample
from conftest import ROOT, train_tiny

V = 40


def tiny(k=2, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, emb_dim=8, hidden_dim=12, dropout=0.0, recall_k=k)).eval()


def batch():
    """Two messages (the second padded) and their two recall slots each (padded, one slot empty)."""
    src = torch.tensor([[5, 6, 7, 8], [9, 10, PAD_ID, PAD_ID]])
    src_len = torch.tensor([4, 2])
    ids = torch.full((2, 2, 6), PAD_ID)
    ids[0, 0, :5] = torch.tensor([11, 12, EOS_ID, 13, 14])  # question </s> answer
    ids[0, 1, :4] = torch.tensor([15, EOS_ID, 16, 17])
    ids[1, 0, :6] = torch.tensor([18, 19, EOS_ID, 20, 21, 22])
    ids[1, 1, :1] = EOS_ID  # nothing recalled: a lone </s>
    recall = RecallInput(ids, torch.tensor([[5, 4], [6, 1]]), torch.tensor([[0.9, 0.4], [0.7, 0.0]]))
    tgt_in = torch.tensor([[BOS_ID, 13, 14], [BOS_ID, 20, 21]])
    return src, src_len, tgt_in, recall


def test_one_softmax_over_message_and_recalls_is_zero_on_padding_and_the_mixture_sums_to_one():
    model = tiny()
    src, src_len, tgt_in, recall = batch()
    with torch.no_grad():
        logp, w = model(src, src_len, tgt_in, recall=recall)
    assert logp.shape == (2, 3, V) and w.shape == (2, 3, 4 + 2 * 6)  # message (4) + K (2) x L (6) columns
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))  # one distribution over everything it reads
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 3))  # the mixture is a distribution
    assert (w[1, :, 2:4] == 0).all()  # the second message's padding
    assert (w[0, :, 4 + 5: 4 + 6] == 0).all() and (w[0, :, 4 + 6 + 4:] == 0).all()  # padded slots
    assert (w[1, :, 4 + 6 + 1:] == 0).all()  # the empty slot: only its </s> is real


def test_the_gate_is_in_0_1_and_step_equals_teacher_forcing():
    model = tiny()
    src, src_len, tgt_in, recall = batch()
    with torch.no_grad():
        logp, w = model(src, src_len, tgt_in, recall=recall)
        memory = model.encode(src, src_len, recall=recall)
        state = memory.state
        for t in range(tgt_in.size(1)):
            step_logp, step_w, state, gate = model.step(tgt_in[:, t], state, memory)
            torch.testing.assert_close(step_logp, logp[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step_w, w[:, t])
            assert gate.shape == (2,) and ((gate >= 0) & (gate <= 1)).all()


def test_copying_puts_a_piece_only_a_recall_holds_first():
    """Gate shut (all copy): the piece that fills a recall slot takes the most probability, though the
    message never holds it."""
    model = tiny(k=1)
    with torch.no_grad():
        model.copy_gate.bias.fill_(-30.0)
    src, src_len = torch.tensor([[5, 6, 7]]), torch.tensor([3])
    ids = torch.tensor([[[8, EOS_ID] + [33] * 10]])  # question "8", answer "33" x 10
    recall = RecallInput(ids, torch.tensor([[12]]), torch.tensor([[0.8]]))
    with torch.no_grad():
        logp, w = model(src, src_len, torch.tensor([[BOS_ID]]), recall=recall)
    assert int(logp[0, 0].argmax()) == 33
    copy = w[0, 0, 5:].sum()  # the attention on the ten "33"s is the probability of "33"
    torch.testing.assert_close(logp[0, 0, 33].exp(), copy, atol=1e-4, rtol=1e-4)
    assert logp[0, 0, EOS_ID].exp() < 1e-6  # the slot's separator is read, never copied


def test_beam_one_equals_greedy_and_every_mode_returns_the_gate():
    model = tiny()
    src, src_len, _, recall = batch()
    opts = DecodeOptions(max_len=8)
    hyps = greedy(model, src, src_len, opts, recall=recall)
    for i, h in enumerate(hyps):
        real = 4 + 5 + 4 if i == 0 else 2 + 6 + 1  # message + each slot's real pieces
        assert h.attention.shape == (len(h.tokens), real) and h.gate.shape == (len(h.tokens),)
        np.testing.assert_allclose(h.attention.sum(1), 1.0, atol=1e-5)
        [b1] = beam_search(model, src[i:i + 1, : src_len[i]], src_len[i:i + 1],
                           DecodeOptions(strategy="beam", beam_size=1, max_len=8), recall=recall.select(i))
        assert b1.tokens == h.tokens
        np.testing.assert_allclose(b1.attention, h.attention, atol=1e-5)
        np.testing.assert_allclose(b1.gate, h.gate, atol=1e-5)
    for h in sample(model, src, src_len, DecodeOptions(strategy="sample", seed=1, max_len=8), recall=recall):
        assert h.gate is not None and len(h.gate) == len(h.tokens)


def test_a_recall_model_needs_luong_attention_and_its_recalls():
    with pytest.raises(ValueError, match="recall"):
        ModelConfig(recall_k=2, attention="additive")
    src, src_len, tgt_in, _ = batch()
    with pytest.raises(ValueError, match="pass recall"):
        tiny()(src, src_len, tgt_in)


@pytest.fixture(scope="module")
def recall_checkpoint(tiny_corpus_csv, tmp_path_factory):
    return train_tiny(tiny_corpus_csv, tmp_path_factory.mktemp("recall_run"),
                      **{"model.recall_k": "3", "train.recall_noise": "0.3", "train.select": "chrf",
                         "train.epochs": "3"})


def test_training_saves_the_index_and_serving_recalls_from_it(recall_checkpoint, tmp_path):
    from chatbot.checkpoint import load_checkpoint, save_checkpoint
    from chatbot.inference import ChatBot
    from chatbot.recall import RECALL_FILE

    assert (recall_checkpoint / RECALL_FILE).is_file()
    bot = ChatBot.from_checkpoint(recall_checkpoint, device="cpu")
    r = bot.reply("헤어진 지 한 달 됐어")
    assert [g.name for g in r.groups] == ["메시지", "기억 1", "기억 2", "기억 3"]
    assert r.groups[0].end == len(bot.read("헤어진 지 한 달 됐어").ids) and r.groups[-1].end == len(r.source_tokens)
    assert r.groups[1].score >= r.groups[2].score >= r.groups[3].score and r.groups[1].question
    assert r.attention.shape == (len(r.reply_tokens), len(r.source_tokens))
    np.testing.assert_allclose(r.attention.sum(1), 1.0, atol=1e-4)
    assert r.gate.shape == (len(r.reply_tokens),) and ((r.gate >= 0) & (r.gate <= 1)).all()
    assert all(c.copied is not None and 0 <= c.copied <= 1 for step in r.candidates for c in step)
    # save -> load: the same replies
    ck = load_checkpoint(recall_checkpoint)
    again = save_checkpoint(tmp_path / "again", ck.model, ck.tokenizer, ck.config, meta=ck.meta,
                            recall=ck.recall_index)
    bot2 = ChatBot.from_checkpoint(again, device="cpu")
    for opts in ({}, {"strategy": "beam", "beam_size": 3, "n_best": 2}, {"strategy": "sample", "seed": 3}):
        assert bot2.reply("헤어진 지 한 달 됐어", **opts).text == bot.reply("헤어진 지 한 달 됐어", **opts).text
    *_, last = bot.stream("헤어진 지 한 달 됐어")
    assert last.done and last.reply.text == r.text and last.reply.groups == r.groups
    (again / RECALL_FILE).unlink()
    from chatbot.checkpoint import CheckpointError
    with pytest.raises(CheckpointError):
        ChatBot.from_checkpoint(again, device="cpu")


def test_a_recall_checkpoint_saved_before_the_shared_continuation_weight_replies_as_with_c_zero(
        recall_checkpoint, tmp_path):
    """Eighth-session recall checkpoints have u but no shared c: they load, with c = 0 (their own bias)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from test_checkpoint import resign

    from chatbot.checkpoint import load_checkpoint, save_checkpoint
    from chatbot.inference import ChatBot

    ck = load_checkpoint(recall_checkpoint)
    with torch.no_grad():
        ck.model.continuation_all.zero_()
    zero = save_checkpoint(tmp_path / "c0", ck.model, ck.tokenizer, ck.config, meta=ck.meta, recall=ck.recall_index)
    old = tmp_path / "old"
    shutil.copytree(zero, old)
    weights = load_file(str(old / "model.safetensors"))
    del weights["continuation_all"]
    save_file(weights, str(old / "model.safetensors"))
    resign(old, "model.safetensors")
    bot_old, bot_zero = ChatBot.from_checkpoint(old, device="cpu"), ChatBot.from_checkpoint(zero, device="cpu")
    assert bot_old.model.continuation_all.item() == 0.0
    for text in ("헤어진 지 한 달 됐어", "오늘 날씨 좋다"):
        a, b = bot_old.reply(text), bot_zero.reply(text)
        assert a.text == b.text and np.array_equal(a.attention, b.attention)


def test_reply_json_and_the_cli_carry_the_recall_fields(recall_checkpoint):
    from chatbot import ui
    from chatbot.inference import ChatBot

    out = ui.reply_json(ChatBot.from_checkpoint(recall_checkpoint, device="cpu"), "헤어진 지 한 달 됐어")
    assert [g["name"] for g in out["column_groups"]][0] == "메시지" and len(out["recalled"]) == 3
    assert len(out["gate"]) == len(out["reply_tokens"]) and all("copied" in c for c in out["candidates"][0])
    p = subprocess.run([sys.executable, "-m", "chatbot", "reply", "--checkpoint", str(recall_checkpoint), "--json"],
                       input="헤어졌어\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    line = json.loads(p.stdout)
    assert set(line) >= {"recalled", "gate", "column_groups"} and len(line["attention"][0]) == len(line["source_tokens"])


def test_the_heatmap_groups_message_and_recall_columns(recall_checkpoint, tiny_bot):
    """The UI function: one heatmap over every column, a line before each recall, each group named
    (a recall by its score and question), and the copy strip beside it: each piece's copied share, the one
    the step inspector shows for the chosen piece (the gate's 1 - g in its hover; 1 - g itself without
    candidates)."""
    from chatbot import ui
    from chatbot.inference import ChatBot

    r = ChatBot.from_checkpoint(recall_checkpoint, device="cpu").reply("헤어진 지 한 달 됐어")
    fig = ui.reply_figure(r)
    heat, strip = fig.data
    assert len(heat.z[0]) == len(r.source_tokens) and len(heat.z) == len(r.reply_tokens)
    np.testing.assert_allclose(np.array(heat.z).sum(1), 1.0, atol=2e-3)  # rows still sum to 1
    chosen = [next(c for c in cands if c.piece == p) for p, cands in zip(r.reply_tokens, r.candidates)]  # greedy: top 1
    np.testing.assert_allclose([row[0] for row in strip.z], [c.copied for c in chosen], atol=1e-3)
    assert all(f"{1 - g:.0%}" in h[0] for h, g in zip(strip.customdata, r.gate))  # the gate, in the hover
    no_candidates = ui.attention_figure(r.source_tokens, r.reply_tokens, r.attention, None, r.groups, r.gate)
    np.testing.assert_allclose([row[0] for row in no_candidates.data[1].z], 1 - r.gate, atol=1e-3)
    names = [a.text for a in fig.layout.annotations]
    assert names[0] == "메시지<br>message" and all(n.startswith(f"기억 {k} · 유사도 {g.score:.2f}") for k, (n, g)
                                       in enumerate(zip(names[1:], r.groups[1:]), 1))
    assert [row[0] for row in strip.text] == [f"{100 * c.copied:.0f}" for c in chosen]  # shares printed, in percent
    assert fig.layout.xaxis2.ticktext == ("복사 %<br>copied",)
    assert no_candidates.layout.xaxis2.ticktext == ("1−g<br>%",)  # without candidates it is the gate's weight
    assert "기억" in ui.model_kind(ChatBot.from_checkpoint(recall_checkpoint, device="cpu"))  # the dropdown says so
    assert [s.x0 for s in fig.layout.shapes] == [g.start - 0.5 for g in r.groups[1:]]
    status = ui.turn_view([ui.Turn("헤어진 지 한 달 됐어", r)]).status
    assert f"기억 {len(r.groups) - 1}개" in status and "복사 mean copied" in status
    step = ui.step_figure(r, 1)
    assert step.layout.barmode == "stack"  # generated and copied parts of each candidate, named in a legend
    assert [t.name for t in step.data if t.showlegend] == ["생성 generated", "복사 copied"]
    assert step.data[2].showlegend is False  # the attention row needs no legend entry
    assert [a.text for a in step.layout.annotations][-len(r.groups):] == [g.name for g in r.groups]  # its groups
    assert [s.x0 for s in step.layout.shapes] == [g.start - 0.5 for g in r.groups[1:]]
    totals = [c.prob for c in r.candidates[0]]
    assert list(step.data[1].text) == [f"{p:.0%}" if p >= 0.005 else "<1%" for p in totals]  # each bar's total on top
    assert max(totals) <= step.layout.yaxis.range[1] <= 1.0
    first = next(c for c in r.candidates[0] if c.piece == r.reply_tokens[0])
    assert ("← " + str(first.source) in step.layout.title.text) == bool(first.source and first.copied >= 0.5)
    assert not any(t.showlegend for t in ui.step_figure(tiny_bot.reply("헤어진 지 한 달 됐어"), 1).data)  # no recall


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_the_browser_shows_the_recall_groups(recall_checkpoint):
    """In headless Chromium: the streamed heatmap of a recall model carries the group labels."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from chatbot.demo import build_demo, launch
    from chatbot.inference import ChatBot
    from chatbot.loadtest import free_port

    bot = ChatBot.from_checkpoint(recall_checkpoint, device="cpu")
    demo = build_demo({"recall": bot})
    _, url, _ = launch(demo, checkpoint_dirs=[recall_checkpoint], server_port=free_port(),
                       prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#msg textarea").fill("헤어진 지 한 달 됐어")
            page.locator("#msg textarea").press("Enter")
            expected = bot.reply("헤어진 지 한 달 됐어")
            page.wait_for_function(
                "n => { const d = document.querySelector('#heatmap .js-plotly-plot');"
                " return d && d.data && d.data.length && d.data[0].type === 'heatmap' && d.data[0].z.length === n; }",
                arg=len(expected.reply_tokens), timeout=30_000)
            labels = page.evaluate("() => Array.from(document.querySelectorAll('#heatmap .annotation-text'))"
                                   ".map(t => t.textContent)")
            shown = page.evaluate(SHOWN_GROUP_NAMES)
            page.set_viewport_size({"width": 420, "height": 1000})  # a phone: the names must make room
            page.wait_for_function(f"() => ({SHOWN_GROUP_NAMES})().every(n => !n.question)", timeout=10_000)
            narrow = page.evaluate(SHOWN_GROUP_NAMES)
            browser.close()
    finally:
        demo.close()
    assert any(t.startswith("메시지") for t in labels)
    assert sum(t.startswith("기억") for t in labels) == len(expected.groups) - 1
    assert all(n["question"] for n in shown[1:]), shown  # wide: each recall's question under its name
    assert len(narrow) == len(expected.groups)
    assert all(a["right"] <= b["left"] for a, b in zip(narrow, narrow[1:])), narrow  # narrow: none overlap


# each group name as drawn, left to right: its box and whether its second line (the question) shows
SHOWN_GROUP_NAMES = """() => Array.from(document.querySelectorAll('#heatmap g.annotation'))
  .map(a => { const tspans = Array.from(a.querySelectorAll('tspan.line')),
                    lines = tspans.length ? tspans : Array.from(a.querySelectorAll('text.annotation-text')),
                    shown = lines.filter(l => l.style.display !== 'none').map(l => l.getBoundingClientRect());
              return {left: Math.min(...shown.map(b => b.left)), right: Math.max(...shown.map(b => b.right)),
                      text: shown.length ? lines[0].textContent : a.textContent,
                      question: lines.length > 1 && lines[1].style.display !== 'none'}; })
  .sort((a, b) => a.left - b.left)"""


def test_recall_noise_swaps_a_share_of_the_recalls_deterministically():
    from chatbot.batching import EncodedPairs
    from chatbot.train import noisy_recalls

    rows = [[i, i + 1, i + 2] for i in range(1000)]
    pairs = EncodedPairs([[5]] * 1000, [[6, EOS_ID]] * 1000, [0] * 1000, rows, [[0.9, 0.5, 0.1]] * 1000)
    noisy = noisy_recalls(pairs, 0.3, num_rows=5000, seed=1)
    changed = sum(a != b for a, b in zip(noisy.recall_rows, rows))
    assert 240 < changed < 360  # about 30 % of the questions read random pairs
    assert noisy.recall_scores == pairs.recall_scores and noisy.src == pairs.src  # scores and questions kept
    assert all(0 <= r < 5000 for rs in noisy.recall_rows for r in rs)
    assert noisy_recalls(pairs, 0.3, 5000, seed=1).recall_rows == noisy.recall_rows  # seeded
    assert noisy_recalls(pairs, 0.0, 5000, seed=1).recall_rows == rows


def test_evaluate_reads_a_recall_models_recalls_and_its_probe_sees_the_message(recall_checkpoint, tiny_corpus_csv):
    from chatbot.evaluate import evaluate
    from chatbot.inference import ChatBot

    result = evaluate(ChatBot.from_checkpoint(recall_checkpoint, device="cpu"), str(tiny_corpus_csv), probe=True)
    assert 1 < result["model"]["perplexity"] < 1000 and 0 <= result["recall"]["gate_mean"] <= 1
    assert 0 <= result["encoder_neighbour"]["chrf"] <= 100
    oracle = result["recall_oracle_chrf"]
    assert oracle["top1"] == pytest.approx(result["retrieval_baseline"]["chrf"], abs=1e-3)  # one lookup, top 1
    assert oracle["top1"] <= oracle["top3"] <= oracle["top5"]


def test_the_continuation_bias_points_past_the_piece_just_written():
    """c + u[y_{t-1}] is added to the score of each position that follows y_{t-1} in its own text (message
    or slot): c (shared) starts at CONTINUATION_INIT, u (per piece) at zero; once large, the attention goes
    to the piece after the one copied, and only there."""
    from chatbot.model import CONTINUATION_INIT
    model = tiny()
    src, src_len, tgt_in, recall = batch()
    assert not model.continuation.weight.any() and model.continuation_all.item() == CONTINUATION_INIT > 0
    assert not hasattr(build_model(ModelConfig(vocab_size=V, emb_dim=8, hidden_dim=12)), "continuation")
    S = src.size(1)
    follows_13, follows_20 = S + 4, S + 4  # message 0's slot 0: 11 12 </s> 13 [14]; message 1's: 18 19 </s> 20 [21]
    with torch.no_grad():
        model.continuation_all.zero_()
        _, base = model(src, src_len, tgt_in, recall=recall)
        model.continuation.weight[13] = 30.0  # u alone: after writing 13, continue where 13 is followed
        _, w = model(src, src_len, tgt_in, recall=recall)
        assert torch.equal(base[:, 0], w[:, 0]) and torch.equal(base[1], w[1])  # <s> read, or no 13 in the memory
        assert w[0, 1].argmax() == follows_13 and w[0, 1, follows_13] > 0.99
        model.continuation.weight.zero_()
        model.continuation_all.fill_(30.0)  # c: after any piece
        _, w = model(src, src_len, tgt_in, recall=recall)
    assert torch.equal(base[:, 0], w[:, 0])  # <s> follows nothing
    assert w[0, 1].argmax() == follows_13 and w[1, 1].argmax() == follows_20 and w[1, 1, follows_20] > 0.99
    np.testing.assert_allclose(w.sum(-1).numpy(), 1.0, atol=1e-5)


def test_guided_alignment_points_each_step_at_the_recalled_answer_that_is_the_whole_target():
    from chatbot.batching import Batch
    from chatbot.train import alignment_nll

    src, src_len, tgt_in, recall = batch()  # message 0's slot 0 answers 13 14; message 1's slot 0: 20 21 22
    tgt_out = torch.tensor([[13, 14, EOS_ID], [20, 21, EOS_ID]])  # message 1's target is only a prefix of its slot
    b = Batch(src, src_len, tgt_in, tgt_out, None, recall)
    S = src.size(1) + 2 * recall.ids.size(2)
    w = torch.full((2, 3, S), 1.0 / S)
    w[0, 0] = 0
    w[0, 0, 4 + 3] = 1.0  # step 0 -> piece 13 of slot 0 (after 4 message positions and "11 12 </s>")
    w[0, 1] = 0
    w[0, 1, 4 + 4] = 0.25  # step 1 -> piece 14, a quarter of the weight
    w[0, 1, 0] = 0.75
    assert alignment_nll(w, b).item() == pytest.approx(-np.log(0.25), rel=1e-5)
    b.tgt_out = torch.tensor([[13, 15, EOS_ID], [20, 21, EOS_ID]])  # no slot holds either whole answer
    assert alignment_nll(w, b).item() == 0.0
