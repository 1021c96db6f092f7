"""Helpers shared by the test modules (importable because tests/conftest.py puts this folder on sys.path)."""
import json


class Sink:
    """An output stream that keeps what was written; not a terminal unless ``tty``."""

    def __init__(self, tty: bool = False):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def tiny_corpus(tmp_path_factory) -> list[str]:
    """Overrides pointing at a small JSON-lines corpus, tokenized once per test session."""
    base = tmp_path_factory.getbasetemp() / "tiny-corpus"
    corpus = base / "corpus.jsonl"
    if not corpus.exists():
        base.mkdir(exist_ok=True)
        docs = (f"def f{i}(x):\n    return x * {i} + {i % 7}  # the quick brown fox {i}\n" * 3 for i in range(200))
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [f"--data.source={corpus}", f"--data.cache_dir={base / 'cache'}"]
