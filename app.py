"""Run the demo: ``python app.py [--checkpoint DIR ...]`` then open http://127.0.0.1:7860.

Checkpoints load once, here, before the UI is built. Several (``--checkpoint A --checkpoint B``
or ``--checkpoint A,B``) fill the Compare tab; the first answers in the chat. Without the flag,
every folder under checkpoints/ with a model.safetensors loads, checkpoints/default first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CHECKPOINTS = ROOT / "checkpoints"


def default_checkpoints(folder: Path = CHECKPOINTS) -> list[Path]:
    found = sorted(p for p in folder.glob("*") if (p / "model.safetensors").is_file()) if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name != "default")  # stable: default first, then by name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                    help="checkpoint folder; repeat it or give a comma list to compare models")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    args.checkpoint = [Path(p) for arg in args.checkpoint for p in arg.split(",") if p.strip()]
    return args


def load_bots(paths: list[Path], device: str = "auto"):
    from chatbot.inference import ChatBot

    paths = paths or default_checkpoints() or [CHECKPOINTS / "default"]  # the last: a clear "missing" error
    bots = {}
    for p in paths:
        bot = ChatBot.from_checkpoint(p, device=device)
        name = bot.name if bot.name not in bots else f"{Path(p).parent.name}/{bot.name}"  # runs/a/best, runs/b/best
        name = name if name not in bots else str(p)
        bots[name] = bot
    return bots


def main(argv: list[str] | None = None) -> None:
    from chatbot.demo import build_demo, launch

    from chatbot.checkpoint import CheckpointError

    args = parse_args(argv)
    try:  # refuse to start, with one clear line, rather than fail at the first message
        bots = load_bots(args.checkpoint, args.device)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    launch(build_demo(bots, ROOT / "docs" / "chrf_by_length.png"), checkpoint_dirs=[b.path for b in bots.values() if b.path],
           private_dirs=[CHECKPOINTS, ROOT / "data"])


if __name__ == "__main__":
    main()
