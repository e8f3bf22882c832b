"""The recall index (chatbot.recall): leave-one-out, distinct answers, determinism, files, and the
retrieval baseline that is its top-1."""
from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize as l2_normalize

from chatbot.evaluate import RetrievalBaseline, oracle_chrf
from chatbot.recall import RecallIndex, Recalled
from chatbot.text import normalize
from chatbot.topic import TopicClassifier
from corpus import BASE_PAIRS, PREFIXES, tiny_pairs

ROWS = tiny_pairs(len(BASE_PAIRS) * 5)  # every base question with 5 openers: 5 questions per answer
# A question asked twice with two answers, and spacing / NFD variants of one question.
EXTRA = [("배고파", "라면 어때요?"), (" 배고파  ", "밥부터 드세요."),
         (unicodedata.normalize("NFD", "헤어졌어"), "힘내세요."), ("헤어졌어 ", "시간이 필요해요."),
         ("양자역학 숙제 너무 어려워", "천천히 풀어 봐요.")]  # words no other question has
QUESTIONS = [q for q, _, _ in ROWS] + [q for q, _ in EXTRA]
ANSWERS = [a for _, a, _ in ROWS] + [a for _, a in EXTRA]


@pytest.fixture(scope="module")
def index() -> RecallIndex:
    return RecallIndex(QUESTIONS, ANSWERS)


def test_leave_one_out_never_recalls_the_query_s_own_question(index):
    for k in (1, 5, 40):
        for q, recalled in zip(QUESTIONS, index.recall(QUESTIONS, k, exclude_self=True)):
            assert recalled, q
            assert all(normalize(r.question) != normalize(q) for r in recalled), q
    # Without leave-one-out a training question finds itself (or a variant of it) first, at cosine 1.
    first = index.recall(["배고파", "헤어졌어"], 1)
    assert [normalize(r[0].question) for r in first] == ["배고파", "헤어졌어"]
    assert first[0][0].score == pytest.approx(1.0, abs=1e-6)
    # A spacing or NFD variant of a question is that question: left out with all its rows.
    for query in ["  배고파", unicodedata.normalize("NFD", "배고파"), "헤어졌어"]:
        left = {normalize(r.question) for r in index.recall([query], len(index), exclude_self=True)[0]}
        assert normalize(query) not in left
    # A question the index does not hold loses nothing.
    assert index.recall(["처음 보는 질문"], 3, exclude_self=True) == index.recall(["처음 보는 질문"], 3)


def test_leave_one_out_reads_the_index_as_a_new_question_would(index):
    """A training question recalled with leave-one-out gets (nearly: the idf still counts its own
    pairs) the scores and rows it would get from an index without its pairs, also when it has words
    no other question has (their n-grams would be unknown to the smaller index)."""
    for q in ["양자역학 숙제 너무 어려워", "배고파", "헤어졌어", "요즘 차였어"]:
        keep = [i for i, x in enumerate(QUESTIONS) if normalize(x) != normalize(q)]
        without = RecallIndex([QUESTIONS[i] for i in keep], [ANSWERS[i] for i in keep])
        loo = index.scores([q], exclude_self=True)[0]
        assert float((loo[keep] - without.scores([q])[0]).abs().max()) < 0.03, q
        assert set(range(len(index))) - set(keep) == set(np.flatnonzero(loo.numpy() == -1.0))  # left out
        rows = index.search([q], 5, exclude_self=True)[0][0].tolist()
        assert rows == [keep[r] for r in without.search([q], 5)[0][0].tolist()], q


def test_results_are_distinct_answers_sorted_by_score(index):
    results = index.recall(QUESTIONS + ["", "커피 한 잔 할래"], 5, exclude_self=True)
    for recalled in results:
        assert len(recalled) == 5
        assert len({r.answer for r in recalled}) == 5
        scores = [r.score for r in recalled]
        assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
        for r in recalled:
            assert (r.question, r.answer) == (QUESTIONS[r.row], ANSWERS[r.row])
    # Fewer distinct answers than k: all of them, once each.
    few = RecallIndex(["a", "a b", "c"], ["x", "x", "y"]).recall(["a"], 5)[0]
    assert [(r.answer, r.row) for r in few] == [("x", 0), ("y", 2)]
    rows, scores = RecallIndex(["a", "a b", "c"], ["x", "x", "y"]).search(["a"], 4)
    assert rows.tolist() == [[0, 2, -1, -1]] and scores.shape == (1, 4) and float(scores[0, 3]) == 0.0


def test_ties_go_to_the_lower_row_and_recall_is_deterministic(index):
    same = RecallIndex(["배고파", "배고파", "배고파"], ["c", "a", "b"]).recall(["배고파"], 3)[0]
    assert [r.row for r in same] == [0, 1, 2] and len({r.score for r in same}) == 1
    queries = QUESTIONS[::7] + ["오늘 날씨 진짜 좋다", "헤어진 지 일주일"]
    assert index.recall(queries, 5, exclude_self=True) == index.recall(queries, 5, exclude_self=True)
    assert RecallIndex(QUESTIONS, ANSWERS).recall(queries, 5) == index.recall(queries, 5)


def test_one_message_and_a_batch_find_the_same_rows_and_the_same_float_bits(index):
    """search() reads one message through the posting lists, scoring exactly only the rows that can win,
    and a batch through one sparse product over every question: the two must agree to the bit."""
    queries = QUESTIONS + ["", "ㅋ", "커피 한 잔 할래", "오늘 날씨 진짜 좋다"]
    assert index._best_few([QUESTIONS[0]], 3, False) is not None  # the posting-list path decides this one
    for exclude_self in (False, True):
        for k in (1, 3, 5):
            rows, scores = index.search(queries, k, exclude_self=exclude_self)  # a batch: the product
            for i, q in enumerate(queries):
                one_rows, one_scores = index.search([q], k, exclude_self=exclude_self)
                assert one_rows[0].tolist() == rows[i].tolist(), (q, k, exclude_self)
                assert one_scores[0].view(torch.int32).tolist() == scores[i].view(torch.int32).tolist(), q


def test_a_paraphrase_recalls_its_twin_first():
    train = [(q, a) for q, a, _ in tiny_pairs(len(BASE_PAIRS))]  # the base questions only
    index = RecallIndex([q for q, _ in train], [a for _, a in train])
    for opener in PREFIXES[1:]:
        got = index.recall([opener + q for q, _ in train], 3)
        assert [r[0].answer for r in got] == [a for _, a in train], opener
    assert index.recall(["오늘 날씨 진짜 좋다"], 1)[0][0].answer == "산책하기 좋은 날이네요."


def test_scores_are_scikit_learns_char_wb_tfidf_cosine(index):
    """The same search as TfidfVectorizer(char_wb, 1-3, sublinear tf) + cosine: the old baseline."""
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    matrix = l2_normalize(vectorizer.fit_transform([normalize(q) for q in QUESTIONS]))
    queries = ["진짜 배고파", "오늘 날씨 진짜 좋다", "SNS 끊을까", "전 여친이 자꾸 생각나", "ㅋㅋㅋ"]
    expected = (l2_normalize(vectorizer.transform([normalize(q) for q in queries])) @ matrix.T).toarray()
    np.testing.assert_allclose(index.scores(queries).numpy(), expected, atol=1e-6)
    assert [r[0].row for r in index.recall(queries, 1)] == list(expected.argmax(1))


def test_retrieval_baseline_is_the_index_s_top_1(index):
    queries = ["진짜 배고파", "요즘 헤어졌어", "고백해도 될까", "비 와"]
    baseline = RetrievalBaseline(QUESTIONS, ANSWERS)
    assert baseline.reply(queries) == [r[0].answer for r in index.recall(queries, 1)]


def test_oracle_chrf_picks_the_best_of_the_top_k():
    refs = ["우산 꼭 챙기세요.", "맛있는 거 드세요."]
    candidates = [["힘내세요.", "우산 꼭 챙기세요."], ["맛있는 거 드세요.", "힘내세요."]]
    figures = oracle_chrf(candidates, refs, ks=(1, 2))
    assert figures["top2"] == pytest.approx(100.0) and figures["top1"] < figures["top2"]


def test_save_load_round_trip_and_small_file(index, tmp_path):
    path = index.save(tmp_path / "recall.safetensors")
    back = RecallIndex.load(path)
    queries = QUESTIONS[::5] + ["오늘 날씨 진짜 좋다"]
    assert back.recall(queries, 5, exclude_self=True) == index.recall(queries, 5, exclude_self=True)
    assert back.questions == QUESTIONS and back.answers == ANSWERS
    # ~400 bytes a pair here (text + n-gram bags): ChatbotData's 10k training pairs take ~4 MB.
    assert path.stat().st_size < 600 * len(index) < 10_000_000


def _rewrite(path, out, tensors=None, **meta):
    with safe_open(str(path), "pt") as f:
        metadata = {**(f.metadata() or {}), **meta}
    save_file({**load_file(str(path)), **(tensors or {})}, str(out), metadata=metadata)
    return out


def test_a_damaged_or_mismatched_file_is_refused_by_name(index, tmp_path):
    good = index.save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00" * 64,
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    cases_paths = [tmp_path / name for name in cases]
    # Texts of other pairs than the n-grams describe (another index's questions, same count).
    shuffled = QUESTIONS[1:] + QUESTIONS[:1]
    cases_paths.append(_rewrite(good, tmp_path / "mismatch", questions=json.dumps(shuffled, ensure_ascii=False)))
    cases_paths.append(_rewrite(good, tmp_path / "short", answers=json.dumps(ANSWERS[:-1], ensure_ascii=False)))
    cases_paths.append(_rewrite(good, tmp_path / "version", format="chatbot-recall-index/0"))
    cols = load_file(str(good))["cols"].clone()
    cols[0] = 10 ** 6
    cases_paths.append(_rewrite(good, tmp_path / "cols", tensors={"cols": cols}))
    clf = TopicClassifier.fit(["헤어졌어", "좋아해"], [1, 2], 3, buckets=16)
    cases_paths.append(clf.save(tmp_path / "topic.safetensors"))  # another kind of safetensors file
    for path in cases_paths:
        with pytest.raises(ValueError, match=str(path.name)):
            RecallIndex.load(path)
    with pytest.raises(FileNotFoundError):
        RecallIndex.load(tmp_path / "missing.safetensors")


def test_bad_arguments():
    with pytest.raises(ValueError, match="as many answers"):
        RecallIndex(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="at least one"):
        RecallIndex([], [])
    with pytest.raises(ValueError, match="k must be"):
        RecallIndex(["a"], ["x"]).recall(["a"], 0)
    assert RecallIndex(["a"], ["x"]).recall([], 3) == []
    assert isinstance(RecallIndex(["a"], ["x"]).recall(["a"], 1)[0][0], Recalled)
