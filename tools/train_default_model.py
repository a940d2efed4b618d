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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgate.spamfilter import (  # noqa: E402  (runs from a checkout, not installed)
    SCORE_TOKENS,
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
HELDOUT_OUTCOME_6 = """\
   Outcome of that look, at threshold 0.9: the same as the fourth and
   fifth to the digit (accuracy 0.9815, spam recall 0.95, ham FP 0.0127 =
   7 of 550, all hard ham)."""
HELDOUT_OUTCOME_5 = """\
   Outcome of that look, at threshold 0.9: the same as the fourth to the
   digit (accuracy 0.9815, spam recall 0.95, ham FP 0.0127 = 7 of 550)."""
# Written by hand after the one look at the held-out part that this model got
# (the card's history); a rebuild of the same model reproduces the figures.
HELDOUT_OUTCOME = """\
   Outcome of that one look, at threshold 0.9: accuracy 0.9815 (was
   0.9785), spam recall 0.95 (was 0.92; target met), ham FP 0.0127 = 7 of
   550, all hard ham (was 6). Accuracy and false positives are still short
   of the targets. Nothing was changed after the look."""


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def validate(
    rows: Sequence[tuple[float, np.ndarray, bool]], alpha: float, threshold: float
) -> dict[str, float]:
    """Pooled forward-fold validation; rows are (position in folder 0..1, columns, is_spam)."""
    predicted: list[bool] = []
    labels: list[bool] = []
    for fit_below, lo, hi in FOLDS:
        model = SpamModel.empty(alpha=alpha)
        model.fit_columns((cols, is_spam) for pos, cols, is_spam in rows if pos < fit_below)
        for pos, cols, is_spam in rows:
            if lo <= pos < hi:
                predicted.append(model.score_columns(cols, threshold).is_spam)
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
    train_part: list[tuple[float, np.ndarray, bool]] = []
    held: dict[str, list[Path]] = {}
    for name in HAM_FOLDERS + SPAM_FOLDERS:
        files = folder_files(args.corpus / name)
        n80 = int(len(files) * 0.8)
        train_part += [
            (i / len(files), vectorizer.vectorize(p.read_bytes()), name in SPAM_FOLDERS)
            for i, p in enumerate(files[:n80])
        ]
        held[name] = files[n80:]

    cv: dict[float, dict[str, float]] = {}
    for alpha in ALPHAS:
        cv[alpha] = validate(train_part, alpha, args.threshold)
        rounded = {k: round(v, 4) for k, v in cv[alpha].items()}
        print(f"valid alpha={alpha:<5} {json.dumps(rounded)}")
    allowed = [a for a in ALPHAS if cv[a]["ham_false_positive_rate"] <= MAX_CV_FP_RATE]
    alpha = max(allowed or ALPHAS, key=lambda a: (cv[a]["accuracy"], -a))
    print(f"chosen alpha={alpha}")
    if args.validate_only:
        return 0

    model = SpamModel.empty(alpha=alpha)
    model.fit_columns((cols, is_spam) for _, cols, is_spam in train_part)
    ham_held = [p.read_bytes() for name in HAM_FOLDERS for p in held[name]]
    spam_held = [p.read_bytes() for name in SPAM_FOLDERS for p in held[name]]
    heldout = {t: evaluate(model, ham_held, spam_held, t) for t in THRESHOLDS}
    hard = [p.read_bytes() for p in held["hard-ham-1"]]
    hard_fp = {t: evaluate(model, hard, [], t)["ham_false_positive_rate"] for t in THRESHOLDS}
    for t in THRESHOLDS:
        print(f"held-out threshold={t} {json.dumps(heldout[t])} hard-ham fp={hard_fp[t]}")

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
    size = args.out.stat().st_size
    print(f"saved {args.out} ({size} bytes, trained in {train_seconds:.1f} s) {final.meta}")

    card = args.out.with_suffix(".md")
    card.write_text(
        render_card(final.meta, alpha, cv, heldout, hard_fp, size, args.threshold),
        encoding="utf-8",
    )
    print(f"wrote {card}")
    return 0


def render_card(
    meta: dict,
    alpha: float,
    cv: dict[float, dict[str, float]],
    heldout: dict[float, dict],
    hard_fp: dict[float, float],
    size: int,
    threshold: float,
) -> str:
    cv_rows = "\n".join(
        f"| {a} | {m['accuracy']:.4f} | {m['ham_false_positive_rate']:.4f} "
        f"({m['ham_false_positives']} of {m['n_ham']}) | {m['spam_recall']:.4f} |"
        for a, m in cv.items()
    )
    held_rows = "\n".join(
        f"| {t} | {m['accuracy']:.4f} | {m['ham_false_positive_rate']:.4f} "
        f"| {hard_fp[t]:.4f} | {m['spam_recall']:.4f} | {m['n_ham']} | {m['n_spam']} |"
        for t, m in heldout.items()
    )
    today = datetime.now(UTC).date().isoformat()
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
- HTML signals: HTML-only, link and image counts (log2 buckets), hidden
  text (display:none, visibility:hidden, 0-1px fonts), white text, forms,
  scripts, text-to-markup ratio.
- URL host, registrable domain and TLD; IP-literal URLs; number of hosts.
- Headers: sender domain and TLD, From display name that is a different
  address, Authentication-Results (spf/dkim/dmarc/arc results) and
  Received-SPF result, X-Mailer / User-Agent product name (no version),
  charsets, top-level Content-Type, Received hop count (bucketed), missing
  Message-ID, recipient count (bucketed). (Feature set 1 also had "has
  In-Reply-To or References"; set 2 does not.)
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
  In-Reply-To/References, a trailing counter or random word, encoded-word
  charset and encoding, `!` and `$` (in their own `subj:` namespace);
  Content-Transfer-Encoding per text part, the outline of the MIME
  boundary, Content-Type without MIME-Version. Headers that only say how
  one site stores mail (Delivered-To, X-Status, virus-scanner stamps) are
  not read: a model would learn the collector instead of the mail. The hop
  count and Authentication-Results (set 1) do read what receiving servers
  wrote.
- Attachments: content type and file extension.
- Each token counts once per message.

## Validation inside the training 80%: three forward folds, pooled (threshold {threshold})

| alpha | accuracy | ham FP rate | spam recall |
|---|---|---|---|
{cv_rows}

## Held-out metrics (trained on the first 80% by file name, tested on the last 20%)

| threshold | accuracy | ham FP rate | hard-ham FP rate | spam recall | n_ham | n_spam |
|---|---|---|---|---|---|---|
{held_rows}

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

## Known weaknesses (found on the training data, not the held-out part)

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
