"""The project's own Python compiles without warnings: an invalid escape such as ``"\\d"`` in a string is a
DeprecationWarning today (a SyntaxWarning from Python 3.12) and an error in a later Python."""
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_file_compiles_without_warnings():
    sources = sorted(p for folder in ("chatbot", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py"))
    assert len(sources) > 20
    warned = {}
    for path in sources + [ROOT / "app.py"]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        if caught:
            warned[str(path.relative_to(ROOT))] = [f"line {w.lineno}: {w.message}" for w in caught]
    assert not warned, warned
