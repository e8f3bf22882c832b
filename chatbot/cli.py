"""Command line: ``python -m chatbot {download,train,topic,reply,evaluate,bench,loadtest} ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

HELP = """Korean attention seq2seq chatbot.

  python -m chatbot download                       fetch the public ChatbotData corpus to data/
  python -m chatbot train --config configs/default.yaml
  python -m chatbot topic --checkpoint DIR         add a topic classifier to a model that reads a topic
  python -m chatbot reply                          one reply per stdin line (shipped model)
  python -m chatbot evaluate --data data/ChatbotData.csv
  python -m chatbot bench --quick                  speed beside the naive tutorial seq2seq (docs/performance.md)
  python -m chatbot loadtest                       1 / 4 / 16 concurrent API users on 127.0.0.1 (docs/reliability.md)
"""


def _decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--strategy", choices=["greedy", "beam", "sample"], default=None,
                   help="decoding strategy (default greedy; beam if --beam > 1)")
    g.add_argument("--beam", type=int, default=1, help="beam size (>1 means beam search)")
    g.add_argument("--n-best", type=int, default=1, help="beam search: hypotheses to return")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: GNMT length penalty alpha")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely pieces (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    g.add_argument("--max-len", type=int, default=40, help="maximum reply pieces")
    g.add_argument("--no-repeat-ngram", type=int, default=0, help="never repeat an n-gram of this size")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeated pieces")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")


def _decoding(a: argparse.Namespace) -> dict[str, Any]:
    strategy = a.strategy or ("beam" if a.beam > 1 else "greedy")
    d: dict[str, Any] = {"strategy": strategy, "max_len": a.max_len, "no_repeat_ngram": a.no_repeat_ngram,
                         "repetition_penalty": a.repetition_penalty}
    if strategy == "beam":
        d.update(beam_size=max(1, a.beam), n_best=a.n_best, length_penalty=a.length_penalty)
    if strategy == "sample":
        d.update(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chatbot", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download the public ChatbotData corpus")
    p.add_argument("--url", default=None, help="corpus URL (default: the songys/Chatbot_data raw CSV)")
    p.add_argument("--out", default=None, help="where to write it (default: $CHATBOT_DATA or data/ChatbotData.csv)")

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
                                   "model.num_labels then answers messages without a given topic. `train` "
                                   "does this itself; this command is for checkpoints trained before it did.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (model.num_labels > 0)")
    p.add_argument("--data", default=None, help="corpus CSV (default: $CHATBOT_DATA or data/ChatbotData.csv)")

    p = sub.add_parser("reply", help="reply to each line of stdin, one line each")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped checkpoints/default)")
    p.add_argument("--topic", type=int, default=None,
                   help="topic label for a model that reads one (0 everyday, 1 breakup, 2 love, 3 unknown where "
                        "the model has it; default: predicted)")
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
    p.add_argument("--topics", default="predicted", choices=["predicted", "corpus", "unknown"],
                   help="for a model that reads a topic: predicted from each question as the demo does "
                        "(default), the corpus's own label, or 'unknown' (models trained with train.topic_dropout)")
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
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")

    p = sub.add_parser("loadtest", help="concurrent /reply users against the demo served on 127.0.0.1",
                       description="Serve the demo on a free loopback port, then send --requests messages from "
                                   "each of N concurrent gradio_client users for every N in --clients; prints "
                                   "p50/p95 latency and errors. The last line printed is a JSON object.")
    p.add_argument("--checkpoint", action="append", default=None, help="checkpoint folder (default: the shipped one)")
    p.add_argument("--clients", default="1,4,16", help="comma list of concurrent users (default 1,4,16)")
    p.add_argument("--requests", type=int, default=5, help="requests per user (default 5)")
    p.add_argument("--queue-size", type=int, default=None, help="queue max_size (default: the demo's)")
    p.add_argument("--concurrency", type=int, default=None, help="concurrency limit (default: the demo's)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take (default 60)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .checkpoint import CheckpointError
    from .data import CorpusError
    try:
        return _run(args, extra, argv)
    except (CheckpointError, CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    if args.command == "download":
        from .config import default_data_path
        from .data import DEFAULT_URL, download_corpus
        path = download_corpus(args.url or DEFAULT_URL, args.out or default_data_path())
        print(path)
        return 0

    if args.command == "train":
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

    if args.command == "topic":
        from .checkpoint import add_topic_classifier, read_config
        from .config import default_data_path
        from .data import load_corpus, split_corpus
        from .topic import fit_on_splits
        cfg, _ = read_config(args.checkpoint)
        if not cfg.model.num_labels:
            raise ValueError(f"{args.checkpoint} reads no topic (model.num_labels is 0): nothing to predict")
        corpus = load_corpus(args.data or default_data_path(), verbose=False)
        clf, acc = fit_on_splits(split_corpus(corpus.pairs, cfg.data.val_fraction, cfg.data.test_fraction),
                                 cfg.model.num_labels)
        add_topic_classifier(args.checkpoint, clf, acc, command="python -m chatbot " + shlex.join(argv))
        print(json.dumps({"checkpoint": str(args.checkpoint), "topic_accuracy": acc}))
        return 0

    if args.command == "bench":
        from pathlib import Path

        from .bench import run_bench, table
        result = run_bench("smoke" if args.smoke else "quick" if args.quick else "full", args.checkpoint,
                           args.threads, args.device)
        print(table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
        print(json.dumps(result, ensure_ascii=False))
        return 0

    if args.command == "loadtest":
        from pathlib import Path

        from .loadtest import main as loadtest
        counts = [int(n) for n in args.clients.split(",") if n.strip()]
        if not counts or min(counts) < 1 or args.requests < 1:
            raise ValueError("--clients needs positive counts (e.g. 1,4,16) and --requests at least 1")
        result = loadtest(args.checkpoint or [], counts, args.requests, queue_size=args.queue_size,
                          concurrency_limit=args.concurrency, timeout=args.timeout)
        print(result.pop("table"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
        print(json.dumps(result, ensure_ascii=False))
        return 0

    from .inference import ChatBot
    decoding = _decoding(args)

    if args.command == "evaluate":
        from .config import default_data_path
        from .evaluate import evaluate, markdown_table, plot_chrf_by_length
        results = []
        for path in args.checkpoint or [None]:
            bot = ChatBot.from_checkpoint(path, device=args.device)
            result = evaluate(bot, args.data or default_data_path(), args.split, args.limit, topics=args.topics,
                              **decoding)
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

    bot = ChatBot.from_checkpoint(args.checkpoint, device=args.device)
    if args.command == "reply":
        for line in sys.stdin:
            r = bot.reply(line.rstrip("\n"), label=args.topic, **decoding)
            if args.json:
                print(json.dumps(r.to_dict(), ensure_ascii=False), flush=True)
            else:
                print(r.text.replace("\n", " "), flush=True)
        return 0
    return 2
