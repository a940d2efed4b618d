"""Spam filter benchmark (run by hand, never in CI).

    python bench/spam.py [--corpus ../shared/corpus/spamassassin] [--model models/spam-model.npz]

Prints, beside references measured in the same run on the same mail:

- single-message score latency (median, p99): mailgate's ``score_bytes``
  (parse + features + numpy log-odds), the same on a tree already parsed (what the
  pipeline pays: parse_message's stdlib tree is reused), vs a plain scikit-learn pipeline
  (``HashingVectorizer`` over the raw text + ``MultinomialNB.predict_proba``),
  and the classifier step alone: mailgate's gather and top-15 sum vs
  ``BernoulliNB.predict_proba`` on the same hashed vector;
- batch throughput (messages per second over the whole corpus);
- training time for the whole corpus, for both;
- model file size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from email import message_from_bytes
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.naive_bayes import MultinomialNB

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgate.spamfilter import DEFAULT_N_FEATURES, SpamModel  # noqa: E402


def latencies(fn: Callable[[object], object], items: Sequence[object]) -> tuple[float, float]:
    """Median and p99 in milliseconds, one call per item, after a warm-up pass."""
    for item in items[:50]:
        fn(item)
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def row(label: str, median: float, p99: float) -> None:
    print(f"  {label:<48} {median:7.3f} / {p99:7.3f}")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description="spam filter benchmark")
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "spamassassin")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "spam-model.npz")
    args = parser.parse_args()

    labelled: list[tuple[bytes, bool]] = []
    for name, is_spam in (("easy-ham-1", False), ("hard-ham-1", False), ("spam-1", True)):
        for p in sorted((args.corpus / name).iterdir()):
            if p.is_file():
                labelled.append((p.read_bytes(), is_spam))
    raws = [raw for raw, _ in labelled]
    labels = np.array([int(s) for _, s in labelled])
    print(f"corpus: {len(raws)} messages ({labels.sum()} spam), {args.corpus}")

    # --- training, whole corpus ------------------------------------------
    model = SpamModel.empty(alpha=SpamModel.load(args.model).meta["alpha"])
    t_ours = timed(lambda: model.fit(labelled))

    # The reference decodes bytes the naive way: what a first attempt would do.
    texts = [raw.decode("latin-1") for raw in raws]
    hv = HashingVectorizer(n_features=DEFAULT_N_FEATURES, alternate_sign=False)
    ref = MultinomialNB(alpha=0.01)
    t_ref = timed(lambda: ref.fit(hv.transform(texts), labels))
    print("\ntraining, whole corpus")
    print(f"  mailgate SpamModel.fit              {t_ours:7.2f} s   (target < 30 s)")
    print(f"  HashingVectorizer+MultinomialNB     {t_ref:7.2f} s   (reference)")

    # --- single-message latency ----------------------------------------
    sample = raws[::3]
    ours_med, ours_p99 = latencies(lambda r: model.score_bytes(r, 0.9), sample)
    # The pipeline hands the model the stdlib tree parse_message already built (one parse
    # serves both), so what scoring adds to a message there is features and score alone.
    trees = [(r, message_from_bytes(r)) for r in sample]
    tree_med, tree_p99 = latencies(lambda rt: model.score_bytes(rt[0], 0.9, rt[1]), trees)
    ref_med, ref_p99 = latencies(lambda t: ref.predict_proba(hv.transform([t])), texts[::3])
    columns = [model.vectorize(r) for r in sample]
    nb = model.to_sklearn()
    rows = [
        sp.csr_matrix((np.ones(len(c)), c, [0, len(c)]), shape=(1, DEFAULT_N_FEATURES), dtype=np.float64)
        for c in columns
    ]
    clf_med, clf_p99 = latencies(lambda c: model.log_odds(c), columns)
    sk_med, sk_p99 = latencies(lambda x: nb.predict_proba(x), rows)
    print(f"\nsingle-message latency over {len(sample)} messages (median / p99, ms)")
    row("mailgate score_bytes (parse+features+score)", ours_med, ours_p99)
    row("mailgate on the parsed tree (pipeline's cost)", tree_med, tree_p99)
    row("HashingVectorizer+MultinomialNB.predict_proba", ref_med, ref_p99)
    row("classifier only: mailgate log_odds", clf_med, clf_p99)
    row("classifier only: BernoulliNB.predict_proba", sk_med, sk_p99)

    # --- batch throughput ----------------------------------------------
    t_batch = timed(lambda: [model.score_bytes(r, 0.9) for r in raws])
    t_ref_batch = timed(lambda: ref.predict_proba(hv.transform(texts)))
    print("\nbatch throughput, whole corpus")
    print(f"  mailgate score_bytes loop           {len(raws) / t_batch:8.0f} msg/s")
    print(f"  HashingVectorizer+MNB, one batch    {len(raws) / t_ref_batch:8.0f} msg/s")

    # --- size ------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.npz"
        model.save(path)
        size = path.stat().st_size
        t_load = timed(lambda: SpamModel.load(path))
    print("\nmodel")
    print(f"  file size {size} bytes ({size / 2**20:.2f} MiB; target < 5 MiB)")
    print(f"  shipped   {args.model.stat().st_size} bytes")
    print(f"  load time {t_load * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
