"""Decontamination's cost and memory, before (a dict of Python string hashes, every training text checked
alone) and after (sorted 64-bit gram hashes in numpy, computed on the code points at once; a batch of training
texts checked in one sorted search), on the same planted data in one run.

Training side: the first --docs documents of ../shared/corpora/ko_transport_bills.jsonl + python_docs.jsonl,
with held-out spans planted inside --planted of them (120 characters of a ko_law.jsonl paragraph, or an
English sentence). Held-out side: ko_law.jsonl's paragraphs, the --held-out-docs corpus documents after the
training ones (to grow it) and two English sentences. Reported: seconds to build the index and to check the
training texts, Python's memory the index holds and its peak while it is built (tracemalloc), what is found,
and that both find the same documents.

    .venv/bin/python -m bench.decontaminate [--docs 3000] [--planted 300] [--held-out-docs 0]
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc

from bench.common import CORPORA, argument_parser, require


class DictIndex:
    """The index as it was: {hash(gram str): source} per unit, a training text checked on its own."""

    def __init__(self, min_words: int, min_chars: int):
        self.g = {"w": max(min_words // 2, 1), "c": max(min_chars // 2, 1)}
        self.grams: dict[str, dict[int, str]] = {"w": {}, "c": {}}

    @staticmethod
    def _gram(units, i: int, g: int) -> int:
        return hash(units[i:i + g] if isinstance(units, str) else " ".join(units[i:i + g]))

    def add(self, text: str, source: str) -> None:
        from tasks.data.shingles import normalise

        t = normalise(text)
        for unit, units in (("c", t), ("w", t.split())):
            g, grams = self.g[unit], self.grams[unit]
            for i in range(len(units) - g + 1):
                grams.setdefault(self._gram(units, i, g), source)

    def match_many(self, texts):
        from tasks.data.shingles import normalise

        out = []
        for text in texts:
            t = normalise(text)
            letters = [c for c in t if c.isalpha()]
            hangul = sum("\uac00" <= c <= "\ud7a3" for c in letters) / len(letters) if letters else 0.0
            unit, units = ("c", t) if hangul > 0.5 else ("w", t.split())
            g, grams = self.g[unit], self.grams[unit]
            source = None
            for i in range(0, len(units) - g + 1, g):
                source = grams.get(self._gram(units, i, g))
                if source is not None:
                    break
            out.append(source)
        return out


def measure(cls, held, train, cfg):
    tracemalloc.start()
    t0 = time.perf_counter()
    index = cls(cfg.min_words, cfg.min_chars)
    for text, source in held:
        index.add(text, source)
    if hasattr(index, "_merge"):
        index._merge()
    build = time.perf_counter() - t0
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t0 = time.perf_counter()
    found = []
    for s in range(0, len(train), 512):
        found += index.match_many(train[s:s + 512])
    return build, time.perf_counter() - t0, (held, peak), {i for i, f in enumerate(found) if f is not None}


def main() -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--planted", type=int, default=300)
    parser.add_argument("--held-out-docs", type=int, default=0)
    parser.add_argument("--corpora", default=CORPORA, type=__import__("pathlib").Path)
    args = parser.parse_args()
    corpora = args.corpora
    require(corpora / "ko_transport_bills.jsonl", corpora / "python_docs.jsonl", corpora / "ko_law.jsonl")

    from bench.near_dedup import corpus_texts
    from tasks.core.config.data import DecontaminateConfig
    from tasks.data.contamination import ContaminationIndex

    rng = random.Random(1)
    law = [json.loads(x)["content"] for x in (corpora / "ko_law.jsonl").read_text(encoding="utf-8").splitlines()]
    english = ["The committee shall review every amendment before the final vote is taken by the full assembly "
               "of members present.", "A function returns None when it reaches the end of its body without "
               "executing a return statement of any kind."]
    texts = corpus_texts(corpora, args.docs + args.held_out_docs)
    held = [(t, "evaluate.general_corpus") for t in law + texts[args.docs:] + english]
    long_law = [t for t in law if len(" ".join(t.split())) >= 150]
    train = texts[:args.docs]
    dirty = set()
    for k, i in enumerate(rng.sample(range(len(train)), min(args.planted, len(train)))):
        if k % 5 == 4:
            span = english[k % 2]
        else:
            src = long_law[k % len(long_law)]
            start = rng.randrange(max(len(src) - 120, 1))
            span = src[start:start + 120]
        cut = rng.randrange(len(train[i]) + 1)
        train[i] = train[i][:cut] + "\n" + span + "\n" + train[i][cut:]
        dirty.add(i)
    cfg = DecontaminateConfig(enabled=True)
    held_chars = sum(len(t) for t, _ in held)
    print(f"{len(train)} training documents ({sum(map(len, train))} characters, {len(dirty)} planted); "
          f"{len(held)} held-out texts ({held_chars} characters)")
    results = {}
    for name, cls in (("before (dict)", DictIndex), ("after (numpy)", ContaminationIndex)):
        build, check, peak, removed = measure(cls, held, train, cfg)
        results[name] = (build, check, peak, removed)
        print(f"{name}: index {build:.2f}s, held {peak[0] / 2**20:.1f} MiB (peak {peak[1] / 2**20:.1f}); "
              f"check {check:.2f}s = {check / len(train) * 1000:.3f} ms a document; planted found {len(removed & dirty)}/{len(dirty)}, "
              f"clean matched {len(removed - dirty)}")
    (b_build, b_check, b_peak, b_removed), (a_build, a_check, a_peak, a_removed) = results.values()
    print(f"ratios after/before: index {a_build / b_build:.2f}×, check {a_check / b_check:.2f}×, total "
          f"{(a_build + a_check) / (b_build + b_check):.2f}×, index memory held {a_peak[0] / b_peak[0]:.2f}× "
          f"(peak {a_peak[1] / b_peak[1]:.2f}×); "
          f"same documents found: {a_removed == b_removed} (only in before: {len(b_removed - a_removed)}, only "
          f"after: {len(a_removed - b_removed)})")


if __name__ == "__main__":
    main()
