"""Text normalisation and the sentencepiece tokenizer.

``normalize`` is the one cleaning function used both when the tokenizer and model are
trained and when the chatbot serves a reply, so the two never drift apart. The
``Tokenizer`` wraps a sentencepiece model whose own normaliser is switched off
(``identity``): everything it sees has already been through ``normalize``.
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import re
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_model

from .config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_PIECES, UNK_ID, TokenizerConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- normalise

# Characters removed outright: bidi embeddings/overrides/isolates and marks, zero-width
# characters, the BOM. Invisible, and they make identical-looking strings differ.
_INVISIBLE = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F,
              0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF]


def _build_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {cp: None for cp in _INVISIBLE}
    for cp in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:  # all of category Cc
        # Line-like controls (\t \n \v \f \r, FS/GS/RS/US, NEL) separate words: keep a
        # space so "안녕\n하세요" does not glue into one word. The rest (NUL, ESC...) go.
        table[cp] = " " if chr(cp).isspace() else None
    return table


_TABLE = _build_table()
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Clean a string for training and serving alike. Never raises on a ``str``.

    1. lone UTF-16 surrogates -> U+FFFD (a valid surrogate pair becomes its character);
    2. control characters (Unicode Cc) removed, the whitespace-like ones (\\t \\n \\r ...)
       turned into a space; bidi controls, zero-width characters and the BOM removed;
    3. NFC -- never NFKC, which would turn compatibility jamo such as "ㅋㅋ" into
       conjoining jamo; NFD input ends up identical to its NFC form;
    4. runs of whitespace collapsed into one space, ends stripped.

    Idempotent: ``normalize(normalize(s)) == normalize(s)``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # only lone surrogates fail here
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    # Remove invisibles before NFC, so jamo they separated still compose.
    text = unicodedata.normalize("NFC", text.translate(_TABLE))
    return _WHITESPACE.sub(" ", text).strip()


# --------------------------------------------------------------------------- morphemes

_SPACE = "\u2581"  # sentencepiece's word-boundary marker "▁"
_JOIN = "\ue000"  # private-use char: morpheme boundary inside a word, training only

_okt = None
_okt_lock = threading.Lock()


class MorphemeAnalyzerUnavailable(RuntimeError):
    """konlpy or Java is missing, so ``morphemes=True`` cannot work."""


def _get_okt():
    """The process-wide konlpy ``Okt`` (starting the JVM takes seconds, so only once)."""
    global _okt
    if _okt is None:
        with _okt_lock:
            if _okt is None:
                try:
                    from konlpy.tag import Okt

                    _okt = Okt()
                except Exception as e:  # ImportError, JVMNotFoundException, ...
                    raise MorphemeAnalyzerUnavailable(
                        "tokenizer.morphemes=true needs konlpy and a Java runtime: "
                        "`apt-get install default-jre` and `pip install konlpy` "
                        f"(or set tokenizer.morphemes=false). Cause: {type(e).__name__}: {e}"
                    ) from e
    return _okt


def _segment_word(okt, word: str) -> list[str]:
    morphs = okt.morphs(word)
    return morphs if all(morphs) and "".join(morphs) == word else [word]


def segment_morphemes(text: str) -> list[list[str]]:
    """Split normalised ``text`` into words (at spaces) and each word into Okt morphemes.

    The morphemes of a word always concatenate back to the word: where Okt changes the
    surface form, the word is kept whole.
    """
    if not text:
        return []
    okt = _get_okt()
    words = text.split(" ")
    morphs = okt.morphs(text)  # one JVM call per sentence; aligned to words below
    out: list[list[str]] = []
    i = 0
    for word in words:
        parts, pos = [], 0
        while pos < len(word) and i < len(morphs) and morphs[i] and word.startswith(morphs[i], pos):
            parts.append(morphs[i])
            pos += len(morphs[i])
            i += 1
        if pos != len(word):  # Okt's output does not line up with the text: per word
            return [_segment_word(okt, w) for w in words]
        out.append(parts)
    if i != len(morphs):
        return [_segment_word(okt, w) for w in words]
    return out


# --------------------------------------------------------------------------- tokenizer

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class Tokenizer:
    """A sentencepiece model (unigram or bpe) behind ``normalize``.

    Fixed special ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3. No byte fallback:
    characters outside the vocabulary (emoji, rare hanja) become ``<unk>``, never an error.

    Morpheme mode (``morphemes=True``): text is pre-segmented with konlpy Okt, and both
    kinds of boundary are kept so decoding restores the original spacing:

    * a word boundary (a space in the text) is sentencepiece's usual "▁" on the first
      piece of the word;
    * a morpheme boundary inside a word carries no symbol at all. In training, morphemes
      of a word are joined with a private-use delimiter given to sentencepiece as
      ``pretokenization_delimiter`` (no piece crosses it; it is removed), with
      ``add_dummy_prefix=False`` so that only word-initial morphemes get "▁". In encoding,
      each morpheme is encoded on its own: the first of a word as "▁" + morpheme, the
      others bare. So "나는 학교에" -> chunks ["▁나", "는", "▁학교", "에"] -> pieces
      like ["▁나", "는", "▁학교", "에"], and the plain concatenation of pieces, with "▁"
      read as a space, is the original text. ``decode`` is the same for both modes.

    ``decode(encode(x)) == normalize(x)`` holds in both modes for text whose characters
    are in the vocabulary (a literal "▁" in the input is read as a space).
    The morphemes flag is not stored in the model bytes: keep it next to them (it is the
    ``TokenizerConfig.morphemes`` the model was trained with).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, model_proto: bytes, morphemes: bool = False):
        self._sp = processor
        self._proto = model_proto
        self.morphemes = morphemes
        found = tuple(processor.id_to_piece(i) for i in range(len(SPECIAL_PIECES)))
        ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if found != SPECIAL_PIECES or ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"sentencepiece model has special pieces {found} / ids {ids}; "
                             f"expected {SPECIAL_PIECES} at ids {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

    # ----------------------------------------------------------------- construction

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TokenizerConfig, *, num_threads: int = 2) -> "Tokenizer":
        """Train on ``texts`` (normalised here) in memory.

        The vocabulary is sized to fit the corpus, and the change logged: grown to one piece per
        character that ``cfg.character_coverage`` must cover when those outnumber ``cfg.vocab_size``
        (300 rows of ChatbotData hold ~500 distinct characters; the tiny recipe asks for 400),
        shrunk when the corpus cannot support that many pieces. Read the size used from ``.vocab_size``.
        """
        if cfg.model_type not in ("unigram", "bpe"):
            raise ValueError(f"tokenizer.model_type must be unigram or bpe, got {cfg.model_type!r}")
        lines = [t for t in (normalize(t) for t in texts) if t]
        if not lines:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        extra = {}
        if cfg.morphemes:
            lines = ["".join(_SPACE + _JOIN.join(word) for word in segment_morphemes(t)) for t in lines]
            extra = {"pretokenization_delimiter": _JOIN, "add_dummy_prefix": False}
        vocab_size, why = cfg.vocab_size, []
        for _ in range(4):  # sentencepiece names the size it needs; at most a grow and a shrink are expected
            buf = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                    model_type=cfg.model_type, character_coverage=cfg.character_coverage,
                    normalization_rule_name="identity", byte_fallback=False, hard_vocab_limit=False,
                    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                    pad_piece=SPECIAL_PIECES[0], unk_piece=SPECIAL_PIECES[1],
                    bos_piece=SPECIAL_PIECES[2], eos_piece=SPECIAL_PIECES[3],
                    max_sentence_length=1 << 16, num_threads=num_threads, minloglevel=2, **extra,
                )
                break
            except RuntimeError as e:
                if m := _TOO_LOW.search(str(e)):
                    vocab_size = int(m.group(2))
                    why.append(f"its {vocab_size - len(SPECIAL_PIECES)} distinct characters (character_coverage "
                               f"{cfg.character_coverage}) and the {len(SPECIAL_PIECES)} special pieces need "
                               f"{vocab_size}")
                elif m := _TOO_HIGH.search(str(e)):
                    vocab_size = int(m.group(2))
                    why.append(f"the corpus supports at most {vocab_size}")
                else:
                    raise
        else:
            raise ValueError(f"sentencepiece found no vocabulary size that fits this corpus ({'; '.join(why)}); "
                             "set tokenizer.vocab_size or tokenizer.character_coverage")
        tok = cls.from_bytes(buf.getvalue(), morphemes=cfg.morphemes)
        if tok.vocab_size != cfg.vocab_size:
            log.warning("tokenizer: %d pieces, not the %d requested: %s", tok.vocab_size, cfg.vocab_size,
                        "; ".join(why) or "the corpus supports no more")
        return tok

    @classmethod
    def from_bytes(cls, model_proto: bytes, morphemes: bool = False) -> "Tokenizer":
        processor = spm.SentencePieceProcessor(model_proto=model_proto)
        return cls(processor, bytes(model_proto), morphemes)

    def to_bytes(self) -> bytes:
        return self._proto

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)

    @classmethod
    def load(cls, path: str | Path, morphemes: bool = False) -> "Tokenizer":
        return cls.from_bytes(Path(path).read_bytes(), morphemes=morphemes)

    # ----------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, sample_alpha: float = 0.0, rng: np.random.Generator | None = None) -> list[int]:
        """Token ids of ``normalize(text)``; no ``<s>``/``</s>`` added.

        ``sample_alpha > 0`` (unigram models): one segmentation drawn with ``rng`` (a fresh unseeded
        one if None) from all of the candidates, as sentencepiece's ``enable_sampling=True,
        nbest_size=-1`` draws it (subword regularisation, Kudo 2018; smaller alpha = flatter), but
        reproducible: see :class:`SubwordSampler`. Decoding the ids still gives the same text.
        """
        text = normalize(text)
        if not text:
            return []
        if sample_alpha > 0:
            sampler = self._sampler
            rng = rng if rng is not None else np.random.default_rng()
            encode = lambda chunk: sampler.sample(chunk, sample_alpha, rng)  # noqa: E731
        else:
            encode = self._sp.encode
        if not self.morphemes:
            return encode(text)
        chunks = []
        for word in segment_morphemes(text):
            chunks.append(_SPACE + word[0])
            chunks.extend(word[1:])
        return list(itertools.chain.from_iterable(encode(c) for c in chunks))

    @functools.cached_property
    def _sampler(self) -> "SubwordSampler":  # built on the first sampled encode
        return SubwordSampler(self._proto)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special ids (pad, unk, bos, eos) skipped. Cut at eos first."""
        size = self.vocab_size
        kept = []
        for i in ids:
            i = int(i)
            if not 0 <= i < size:
                raise ValueError(f"token id {i} outside the vocabulary (size {size})")
            if i >= len(SPECIAL_PIECES):
                kept.append(i)
        return self._sp.decode(kept).strip(" ")

    def display_pieces(self, ids: Sequence[int]) -> list[str]:
        """One readable label per id, for attention-heatmap axes.

        The "▁" word marker is dropped ("▁학교" -> "학교"), a lone "▁" shows as "·",
        special ids show as ``<pad>``, ``<unk>``, ``<s>``, ``</s>``.
        """
        labels = []
        for i in ids:
            i = int(i)
            if 0 <= i < len(SPECIAL_PIECES):
                labels.append(SPECIAL_PIECES[i])
            elif 0 <= i < self.vocab_size:
                labels.append(self._sp.id_to_piece(i).replace(_SPACE, "") or "·")
            else:
                labels.append(SPECIAL_PIECES[UNK_ID])
        return labels

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, morphemes={self.morphemes})"


# --------------------------------------------------------------------------- subword sampling

_UNK_PENALTY = 10.0  # sentencepiece's kUnkPenalty: an unknown character scores the lowest piece's score minus this


class SubwordSampler:
    """Sampled segmentations of a unigram sentencepiece model, drawn from a numpy Generator.

    The distribution is sentencepiece's own ``SampleEncode(nbest_size=-1, alpha)``: every
    segmentation of the text into vocabulary pieces (an unknown character is ``<unk>``, scored the
    lowest piece score minus 10) with probability proportional to exp(alpha x the sum of its piece
    scores), drawn by forward filtering and backward sampling over the lattice of pieces. Drawing it
    here makes it reproducible: sentencepiece mixes ``set_random_generator_seed``'s seed with state
    of its own process, so one seed gave different segmentations in every process (each DDP rank,
    and a ``--resume``, which saw other segmentations than the run it continues).

    The text is what sentencepiece's identity normaliser would hand its model: spaces as "▁", and a
    leading "▁" where the model adds a dummy prefix.
    """

    def __init__(self, model_proto: bytes):
        m = spm_model.ModelProto.FromString(model_proto)
        if m.trainer_spec.model_type != spm_model.TrainerSpec.UNIGRAM:
            raise ValueError("subword sampling needs a unigram sentencepiece model (tokenizer.model_type: unigram)")
        kinds = spm_model.ModelProto.SentencePiece
        if any(p.type == kinds.USER_DEFINED for p in m.pieces):
            raise ValueError("subword sampling does not handle user-defined pieces; this project's tokenizer has none")
        self.pieces = {p.piece: (i, p.score) for i, p in enumerate(m.pieces) if p.type == kinds.NORMAL}
        self.longest = max(map(len, self.pieces))
        self.unk_score = min(score for _, score in self.pieces.values()) - _UNK_PENALTY
        self.dummy_prefix = m.normalizer_spec.add_dummy_prefix

    def surface(self, text: str) -> str:
        text = text.replace(" ", _SPACE)
        return _SPACE + text if self.dummy_prefix and text else text

    def lattice(self, text: str) -> list[list[tuple[int, int, float]]]:
        """For each end position (in characters of :meth:`surface`), the (begin, id, score) of every piece
        ending there; a character that no single piece covers gets an ``<unk>`` node."""
        s = self.surface(text)
        n = len(s)
        ends: list[list[tuple[int, int, float]]] = [[] for _ in range(n + 1)]
        for i in range(n):
            single = False
            for j in range(i + 1, min(n, i + self.longest) + 1):
                hit = self.pieces.get(s[i:j])
                if hit is not None:
                    ends[j].append((i, *hit))
                    single = single or j == i + 1
            if not single:
                ends[i + 1].append((i, UNK_ID, self.unk_score))
        return ends

    def sample(self, text: str, alpha: float, rng: np.random.Generator) -> list[int]:
        ends = self.lattice(text)
        n = len(ends) - 1
        forward = [0.0] * (n + 1)  # log of the summed weights of every segmentation of the first j characters
        for j in range(1, n + 1):
            logits = [forward[i] + alpha * score for i, _, score in ends[j]]
            top = max(logits)
            forward[j] = top + math.log(sum(math.exp(v - top) for v in logits))
        ids, j = [], n
        draws = iter(rng.random(n))  # at most one draw per character
        while j > 0:
            u, acc = next(draws), 0.0
            for begin, piece, score in ends[j]:
                acc += math.exp(forward[begin] + alpha * score - forward[j])
                if u < acc:
                    break
            ids.append(piece)  # the last node where rounding leaves the sum a hair under u
            j = begin
        return ids[::-1]
