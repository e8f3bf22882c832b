"""Command line: ``python -m chatbot {download,train,topic,reply,evaluate,bench,loadtest,publish} ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Callable, NoReturn

from .search import OPTIONS, DecodeOptions, OptionSpec

HELP = """Korean attention seq2seq chatbot.

  python -m chatbot download                       fetch the public ChatbotData corpus to data/
  python -m chatbot train --config configs/default.yaml
  python -m chatbot topic --checkpoint DIR         add a topic classifier to a model that reads a topic
  python -m chatbot reply                          one reply per stdin line (shipped model)
  python -m chatbot evaluate --data data/ChatbotData.csv
  python -m chatbot bench --quick                  speed beside the naive tutorial seq2seq (docs/performance.md)
  python -m chatbot loadtest                       1 / 4 / 16 / 64 concurrent API users on 127.0.0.1 (docs/reliability.md)
  python -m chatbot publish --space USER/NAME      upload the demo to a Hugging Face Space (--dry-run: list only)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to read more, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


FLAG_ALIASES = {"beam_size": ("--beam",)}  # the CLI's older, shorter name
FLAG_NOTES = {  # what a flag means here beyond the option itself
    "strategy": "Beam if --beam > 1.",
    "beam_size": "More than 1 alone means beam search.",
    "n_best": "The n-best list appears with --json; without it each input line gets the best reply.",
}
STRATEGY_NAMES = {"beam": "beam search", "sample": "sampling"}
REPORTED_WHEN_SET = ("min_len", "inspect_k")  # newer flags: left out at their defaults, so a default
# run's decoding record (evaluate's JSON and model card) reads as before


def _checked(spec: OptionSpec) -> Callable[[str], Any]:
    """An argparse ``type`` for ``spec``: the value, or an error naming the limits."""

    def parse(text: str) -> Any:
        try:
            value = spec.type(text)
        except ValueError:
            kind = "an integer" if spec.type is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        problem = spec.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    return parse


def _option_help(spec: OptionSpec) -> str:
    scope = f"{STRATEGY_NAMES[spec.strategies[0]]}: " if len(spec.strategies) == 1 else ""
    default = "none" if spec.default is None else spec.default
    note = f" {FLAG_NOTES[spec.name]}" if spec.name in FLAG_NOTES else ""
    limits = "" if spec.choices else f"{spec.range_text()}, "
    return f"{scope}{spec.help} [{limits}default {default}].{note}".replace("%", "%%")


def _decoding_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`chatbot.search.DecodeOptions` field (``max_len`` -> ``--max-len``), its
    default, limits and help taken from the field."""
    g = p.add_argument_group("decoding", "(defaults and limits: chatbot.search.DecodeOptions)")
    p.set_defaults(decoding_parser=p)  # main checks the limits between flags and reports them here
    for spec in OPTIONS.values():
        flags = ["--" + spec.name.replace("_", "-"), *FLAG_ALIASES.get(spec.name, ())]
        # no default for these two: the strategy follows --beam unless given, and --beam only when given
        default = None if spec.name in ("strategy", "beam_size") else spec.default
        if spec.choices:
            g.add_argument(*flags, choices=spec.choices, default=default, help=_option_help(spec))
        else:
            g.add_argument(*flags, dest=spec.name, type=_checked(spec), default=default,
                           metavar="N" if spec.type is int else "X", help=_option_help(spec))


def _decoding(a: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags as DecodeOptions fields: those of every strategy, then the chosen one's own."""
    strategy = a.strategy or ("beam" if (a.beam_size or 1) > 1 else "greedy")
    d: dict[str, Any] = {"strategy": strategy}
    shared = [s for s in OPTIONS.values() if len(s.strategies) > 1 and s.name != "strategy"]
    own = [s for s in OPTIONS.values() if s.strategies == (strategy,)]
    for spec in shared + own:
        value = getattr(a, spec.name)
        if value is None and spec.name == "beam_size":  # --strategy beam without --beam
            value = spec.default
        if spec.name not in REPORTED_WHEN_SET or value != spec.default:
            d[spec.name] = value
    return d


def _overrides(extra: list[str]) -> dict[str, str]:
    """``--train.epochs 3 --model.attention=dot`` -> {"train.epochs": "3", "model.attention": "dot"}."""
    out: dict[str, str] = {}
    it = iter(extra)
    for tok in it:
        if not tok.startswith("--") or "." not in tok:
            raise SystemExit(f"unknown argument {tok!r}: config overrides look like --section.key value")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise SystemExit(f"{tok} needs a value")
        out[key] = value
    return out


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type``: a finite number above 0 of ``kind``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} above 0, "
                                             f"got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m chatbot", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    _download_parser(sub)

    p = sub.add_parser("train", help="train a model from a YAML recipe",
                       description="Train from a recipe; override any key with --section.key value, "
                                   "e.g. --train.epochs 3 --model.attention additive.")
    p.add_argument("--config", default=None, help="YAML recipe (default: built-in defaults)")
    p.add_argument("--data", default=None, help="corpus CSV (default: $CHATBOT_DATA or data/ChatbotData.csv)")
    p.add_argument("--out", default=None, help="output folder (overrides train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last exactly where it stopped")

    p = sub.add_parser("topic", help="fit the topic classifier of a checkpoint that reads a topic",
                       description="Fit the character n-gram topic classifier on the checkpoint's training split "
                                   "and add it to the checkpoint (topic.safetensors): a model trained with "
                                   "model.num_topics then answers messages without a given topic. `train` "
                                   "does this itself; this command is for checkpoints trained before it did.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (model.num_topics > 0)")
    p.add_argument("--data", default=None, help="corpus CSV (default: $CHATBOT_DATA or data/ChatbotData.csv)")

    p = sub.add_parser("reply", help="reply to each line of stdin, one line each")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped checkpoints/default)")
    p.add_argument("--topic", type=int, default=None,
                   help="topic for a model that reads one (0 everyday, 1 breakup, 2 love; default: predicted)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: reply, tokens and attention")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    _decoding_args(p)

    p = sub.add_parser("evaluate", help="metrics on a split, beside a TF-IDF retrieval baseline")
    p.add_argument("--checkpoint", action="append", default=None,
                   help="checkpoint folder (default: the shipped one); repeat to evaluate several")
    p.add_argument("--plot", default=None, help="write a PNG of chrF by question length for every checkpoint")
    p.add_argument("--write-card", action="store_true",
                   help="put the evaluation table into each checkpoint's model card (README.md)")
    p.add_argument("--data", default=None, help="corpus CSV (default: $CHATBOT_DATA or data/ChatbotData.csv)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N pairs (0 = all)")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table to stderr")
    p.add_argument("--topics", default="predicted", choices=["predicted", "corpus"],
                   help="for a model that reads a topic: predicted from each question as the demo does "
                        "(default), or the corpus's own label")
    p.add_argument("--probe", action="store_true",
                   help="also score the encoder-neighbour probe: the answer of the training question nearest "
                        "in the model's encoder space (a diagnostic, never a reply)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    _decoding_args(p)

    p = sub.add_parser("bench", help="training and reply speed beside the naive tutorial implementation",
                       description="Measure training tokens/s (ours and the naive tutorial seq2seq), MFU, reply "
                                   "latency and app start-up in one run; the last line printed is a JSON object.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer repetitions (finishes within 5 minutes)")
    g.add_argument("--smoke", action="store_true", help="tiny model, one repetition each (tests)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to time (default: the shipped one if present, else a fresh model)")
    p.add_argument("--recall-checkpoint", default=None,
                   help="a recall model to time beside it (default: checkpoints/recall if present)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")

    _loadtest_parser(sub)
    _publish_parser(sub)  # each its own function: build_parser is long enough
    return parser


def _download_parser(sub: Any) -> None:
    p = sub.add_parser("download", help="download the public ChatbotData corpus")
    p.add_argument("--url", default=None, help="corpus URL (default: the songys/Chatbot_data raw CSV)")
    p.add_argument("--out", default=None, help="where to write it (default: $CHATBOT_DATA or data/ChatbotData.csv)")
    p.add_argument("--max-bytes", type=_positive(int), default=50_000_000, metavar="N",
                   help="refuse a body larger than this (default 50000000; the corpus is under 1 MB)")
    p.add_argument("--deadline", type=_positive(float), default=120.0, metavar="SECONDS",
                   help="give up when the whole download takes longer (default 120)")


def _loadtest_parser(sub: Any) -> None:
    p = sub.add_parser("loadtest", help="concurrent /reply and streamed /chat users against the demo on 127.0.0.1",
                       description="Serve the demo in a child process on a free loopback port; for every N in "
                                   "--clients start N gradio_client users at once (N - 1 stream --requests long "
                                   "sampled /chat replies each, one sends /reply back to back), then --sessions "
                                   "requests each from a new session; prints p50/p95 latency, errors, the server's "
                                   "memory and a verdict on each target. The last line printed is a JSON object.")
    p.add_argument("--checkpoint", action="append", default=None, help="checkpoint folder (default: the shipped one)")
    p.add_argument("--clients", default="1,4,16,64", help="comma list of concurrent users (default 1,4,16,64)")
    p.add_argument("--requests", type=int, default=3, help="streamed chats per chat user (default 3)")
    p.add_argument("--sessions", type=int, default=2000,
                   help="new-session requests for the memory check (default 2000; 0 = skip)")
    p.add_argument("--queue-size", type=int, default=None, help="queue max_size (default: the demo's)")
    p.add_argument("--concurrency", type=int, default=None, help="concurrency limit (default: the demo's)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take (default 60)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")


def _publish_parser(sub: Any) -> None:
    p = sub.add_parser("publish", help="upload the demo to a Hugging Face Space",
                       description="Create the Space (Gradio SDK) if it is missing and commit what it serves: app.py, "
                                   "chatbot/, the shipped checkpoints/, requirements.txt, README.md (its front matter "
                                   "configures the Space), docs/chrf_by_length.png and, when a checkpoint needs Java, "
                                   "packages.txt; other files on the Space are deleted (.gitattributes aside). Binary "
                                   "files go through the Hub's upload API (Xet or LFS), not git. The token is the "
                                   "usual huggingface_hub login (`hf auth login`) or HF_TOKEN.")
    p.add_argument("--space", required=True, metavar="USER/NAME", help="the Space, e.g. someone/korean-chatbot")
    p.add_argument("--private", action="store_true",
                   help="create the Space private (an existing Space keeps its visibility)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the front matter and every file with its size; touch no network")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "decoding_parser", None):
        try:  # limits between flags (--n-best <= --beam), before any checkpoint loads
            DecodeOptions(**_decoding(args))
        except ValueError as e:
            args.decoding_parser.error(str(e))
    from .checkpoint import CheckpointError
    from .data import CorpusError
    try:
        return COMMANDS[args.command](args, extra, argv)
    except (CheckpointError, CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- one function per command
def _download(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .config import default_data_path
    from .data import DEFAULT_URL, download_corpus
    path = download_corpus(args.url or DEFAULT_URL, args.out or default_data_path(), max_bytes=args.max_bytes,
                           deadline=args.deadline)
    print(path)
    return 0


def _train(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .config import load_config
    from .train import TrainingError, train
    overrides = _overrides(extra)
    if args.data:
        overrides["data.path"] = args.data
    if args.out:
        overrides["train.out_dir"] = args.out
    cfg = load_config(args.config, overrides)
    try:
        best = train(cfg, resume=args.resume, command="python -m chatbot " + shlex.join(argv))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from pathlib import Path

        from .train import TRAIN_STATE
        last = Path(cfg.train.out_dir) / "last"
        again = argv if "--resume" in argv else [*argv, "--resume"]
        hint = (f"; continue with: python -m chatbot {shlex.join(again)}" if (last / TRAIN_STATE).exists()
                else " before the first checkpoint; nothing to resume")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    print(best)
    return 0


def _topic(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .checkpoint import add_topic_classifier, read_config
    from .config import default_data_path
    from .data import load_corpus, split_corpus
    from .topic import fit_on_splits
    cfg, _ = read_config(args.checkpoint)
    if not cfg.model.num_topics:
        raise ValueError(f"{args.checkpoint} reads no topic (model.num_topics is 0): nothing to predict")
    corpus = load_corpus(args.data or default_data_path(), verbose=False)
    clf, acc = fit_on_splits(split_corpus(corpus.pairs, cfg.data.val_fraction, cfg.data.test_fraction),
                             cfg.model.num_topics)
    add_topic_classifier(args.checkpoint, clf, acc, command="python -m chatbot " + shlex.join(argv))
    print(json.dumps({"checkpoint": str(args.checkpoint), "topic_accuracy": acc}))
    return 0


def _bench(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .bench import run_bench, table
    result = run_bench("smoke" if args.smoke else "quick" if args.quick else "full", args.checkpoint,
                       args.threads, args.device, recall_checkpoint=args.recall_checkpoint)
    print(table(result))
    _write_json(result, args.json)
    return 0


def _loadtest(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .loadtest import main as loadtest
    counts = [int(n) for n in args.clients.split(",") if n.strip()]
    if not counts or min(counts) < 1 or args.requests < 1 or args.sessions < 0:
        raise ValueError("--clients needs positive counts (e.g. 1,4,16), --requests at least 1, --sessions >= 0")
    result = loadtest(args.checkpoint or [], counts, args.requests, queue_size=args.queue_size,
                      concurrency_limit=args.concurrency, timeout=args.timeout, sessions=args.sessions)
    print(result.pop("table"))
    _write_json(result, args.json)
    return 0


def _publish(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .publish import ROOT, PublishError, check_space_id, describe, front_matter, publish, space_files
    try:
        check_space_id(args.space)
        files, meta = space_files(ROOT), front_matter(ROOT / "README.md")
        if args.dry_run:
            print(describe(args.space, files, meta, args.private))
            print("dry run: nothing was sent")
            return 0
        url = publish(args.space, files, args.private)
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"published {len(files)} files to Space {args.space}: {url}")
    return 0


def _write_json(result: dict[str, Any], path: str | None) -> None:
    """Write ``result`` to ``path`` when given, then print it as the last line (what scripts read)."""
    if path:
        from pathlib import Path
        Path(path).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False))


def _evaluate(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .config import default_data_path
    from .evaluate import evaluate, markdown_table, plot_chrf_by_length
    from .inference import ChatBot
    decoding = _decoding(args)
    results = []
    for path in args.checkpoint or [None]:
        bot = ChatBot.from_checkpoint(path, device=args.device)
        result = evaluate(bot, args.data or default_data_path(), args.split, args.limit, topics=args.topics,
                          probe=args.probe, **decoding)
        if args.markdown:
            print(f"{result['checkpoint']}:\n{markdown_table(result)}", file=sys.stderr)
        if args.write_card:
            from .checkpoint import rewrite_card
            topics = f", topics {result['topics']}" if result.get("topics") else ""
            if "topic_accuracy" in result:
                topics += f" (classifier accuracy {result['topic_accuracy']:.1%})"
            rewrite_card(bot.path, f"Test split ({result['pairs']} pairs), decoding {result['decoding']}{topics}:\n\n"
                         + markdown_table(result))
        results.append(result)
    if args.plot:
        plot_chrf_by_length(results, args.plot)
    print(json.dumps(results[0] if len(results) == 1 else results, ensure_ascii=False, indent=2))
    return 0


def _reply(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from .inference import ChatBot
    decoding = _decoding(args)
    bot = ChatBot.from_checkpoint(args.checkpoint, device=args.device)
    for line in sys.stdin:
        r = bot.reply(line.rstrip("\n"), topic=args.topic, **decoding)
        if args.json:
            print(json.dumps(r.to_dict(), ensure_ascii=False), flush=True)
        else:  # the best reply, one line per input line whatever the n-best
            print(r.text.replace("\n", " "), flush=True)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str], list[str]], int]] = {
    "download": _download, "train": _train, "topic": _topic, "reply": _reply, "evaluate": _evaluate,
    "bench": _bench, "loadtest": _loadtest, "publish": _publish}
