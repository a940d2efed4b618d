"""Naive-Bayes spam filter: feature extraction, classifier and model file io.

Pure module: no database, no config, no logging side effects. The ingest
pipeline and the CLI call into it.

Design notes (why, not what):

* Features are hashed (CRC-32 modulo 2^18) so the vocabulary never has to be
  stored or grown: ``learn_bytes`` can learn a token nobody has seen before,
  and the model file stays a fixed size.
* Each token counts once per message, and P(token | class) is estimated per
  message (``BernoulliNB``: messages of the class containing the token,
  smoothed by alpha). Scoring uses the evidence of the tokens present only,
  and a column no training message ever had votes 0. In 5-fold
  cross-validation on the training part this gave slightly higher spam
  recall than ``MultinomialNB`` at the same ham false-positive rate (0.925
  vs 0.915 at 0.23%); ``ComplementNB`` is the same as Multinomial for two
  classes. Dividing by messages rather than token mass also stops the
  smaller spam class from turning every rare ham word into a strong vote.
  Ignoring absent tokens matters for hashed features: absence of 2^18
  columns is no evidence of anything.
* Only the ``SCORE_TOKENS`` (15) most decisive tokens of a message vote: the
  ones whose log-odds are largest in magnitude (Graham's "A Plan for Spam"
  rule). Summing every token treats hundreds of correlated words as
  independent evidence, so a long message gets an absurd score (-3000 for
  a long spam full of ordinary English words, +15 for a long newsletter)
  and ranking suffers. In time-ordered validation inside the training part
  (3 folds) this raised the ROC AUC from 0.917 to 0.977 and, at threshold
  0.9, cut ham false positives from 2 to 1 of 1650 with spam recall 0.62
  -> 0.66. The counts, the file and learning are unchanged; only scoring.
* The model abstains on mail in words it does not know. A message whose
  visible words were mostly never seen in KNOWN_WORD_MESSAGES training
  messages (less than ``min_known_words`` of them, spam.min_known_words) is
  not held, whatever its score: the shipped corpus is English, and its only
  Czech, Korean or Portuguese mail is spam, so every word of a customer
  writing in those languages was either unseen, seen in one spam (+4.75),
  or a hash collision, and the 15 loudest of them decided. Hand-written
  first mails from customers went to quarantine in 6 of 28 cases with set 3
  alone, none with the rule; forward-fold validation kept its 2 false
  positives of 1650 and lost 10 of 300 spam (Chinese, Japanese, Turkish,
  Serbian, German spam). A site's own training makes its languages known.
  With a plain-text and an HTML version, the better-known one counts, so a
  junk plain part cannot hide the HTML the reader sees.
* Scoring is done here with numpy (a single contiguous log-odds vector, a
  gather and a partial sort) rather than through ``predict_proba``, which
  copies the full weight matrix on every call; training and incremental
  learning still go through scikit-learn (``BernoulliNB.partial_fit``).
* The model remembers which messages feedback taught it, and as what
  (``lesson_keys``/``lesson_classes``: 64 bits of each message's SHA-256).
  Teaching a message again as the same class changes nothing, and teaching
  it as the other class moves its counts: a lesson undone takes out exactly
  what that lesson put in, and never counts that belong to other messages
  (a lesson recorded in the database that never reached this file, or a
  model rebuilt by ``fit`` since, simply has no such record).
* The model file is ``.npz`` with plain numeric arrays and a JSON header
  stored as bytes, loaded with ``allow_pickle=False`` and checked strictly:
  a model file can arrive from anywhere (a backup, a colleague) and must
  never be able to run code or crash the daemon.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import mailbox
import math
import os
import re
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mailgate.spamfeatures import FEATURE_VERSION, extract_tokens, html_twin_words, shown_html_words

if TYPE_CHECKING:
    import scipy.sparse as sp
    from sklearn.naive_bayes import BernoulliNB

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_KNOWN_WORDS",
    "KNOWN_WORD_MESSAGES",
    "Features",
    "DEFAULT_N_FEATURES",
    "FEATURE_VERSION",
    "FORMAT_VERSION",
    "SCORE_TOKENS",
    "ModelError",
    "SpamModel",
    "SpamScore",
    "evaluate",
    "extract_tokens",
    "read_mail_sources",
]

FORMAT_VERSION = 1
# Feature sets extract_tokens can still produce: a model keeps scoring and
# learning with the set it was trained on until it is retrained (fit), so an
# upgrade does not turn the filter off.
READABLE_FEATURE_VERSIONS = frozenset({1, 2, FEATURE_VERSION})
FORMAT_NAME = "mailgate-spam-model"

DEFAULT_N_FEATURES = 2**18
# Chosen by tools/train_default_model.py on the training part of the corpus,
# validated by time (three forward folds: fit on older mail, test on newer):
# best accuracy with ham false positives at most 0.25%. sklearn's 1.0 flags
# about 5% of ham here.
DEFAULT_ALPHA = 0.05

# How many tokens vote in a score: the most decisive ones (largest |log-odds|).
# A scoring rule, not part of the file: counts learned under any value load
# and score the same way.
SCORE_TOKENS = 15

# A visible word is known to the model when at least this many training messages
# had it; mail with a smaller share of known words than spam.min_known_words
# (default below) is never held. Both chosen on forward-fold validation, where
# 3 messages with a share of 0.2-0.5, or 2-5 messages with 0.3, gave the same figures.
KNOWN_WORD_MESSAGES = 3
DEFAULT_MIN_KNOWN_WORDS = 0.3

# Hostile-file limits: a zip member can claim any uncompressed size, so the
# declared sizes are checked before anything is decompressed.
_MAX_HEADER_BYTES = 64 * 2**10  # the real one is about 300 bytes of JSON
_ZIP_MAGIC = b"PK\x03\x04"
# Four times the shipped 2^18 at most: a file of 2^24 columns compresses to 131 KB of zeros
# and cost 1-2 GB in every process that scores or learns with it.
_MIN_FEATURES, _MAX_FEATURES = 2**10, 2**20

_HAM, _SPAM = 0, 1
# Feedback lessons remembered (see the module docstring); the oldest are forgotten first.
MAX_LESSONS = 100_000
_LESSON_ARRAYS = frozenset({"lesson_keys", "lesson_classes"})
# Checked before a member is read: the .npy header is at most a few hundred bytes.
# Every member at most the size its largest valid content has: 512 MiB each made a 1.5 MB
# file of deflated zeros cost 1.6 GB and 7-14 s before it was refused.
_MAX_MEMBER_SIZES = {
    "header.npy": _MAX_HEADER_BYTES + 1024, "feature_count.npy": 2 * _MAX_FEATURES * 4 + 1024,
    "class_count.npy": 2 * 8 + 1024,
    "lesson_keys.npy": MAX_LESSONS * 8 + 1024, "lesson_classes.npy": MAX_LESSONS + 1024,
}


class ModelError(Exception):
    """A model file is missing, damaged, hostile or from another version."""


@dataclass(frozen=True)
class SpamScore:
    score: float  # probability of spam, 0..1
    is_spam: bool  # score >= threshold, and known_words >= min_known_words
    # Share of the visible words the model knows, 1.0 when there are none; that of an HTML
    # twin instead when the plain text's share alone would keep a high score from holding.
    known_words: float = 1.0


@dataclass(frozen=True)
class Features:
    """One message's hashed tokens: every column, the columns of its visible words, those
    of the words of an HTML twin of its plain text (empty when there is none), and those of
    its HTML's words without hidden text (empty when it hides none)."""

    columns: np.ndarray
    words: np.ndarray
    twin_words: np.ndarray
    shown_words: np.ndarray = field(default_factory=lambda: _NO_COLUMNS)


def _hash_tokens(tokens: Iterable[str], n_features: int) -> np.ndarray:
    """Unique column indices. CRC-32 is stable across processes, unlike hash()."""
    mask = n_features - 1
    idx = {zlib.crc32(t.encode("utf-8", "replace")) & mask for t in tokens}
    return np.fromiter(idx, dtype=np.int64, count=len(idx))


_NO_COLUMNS = np.zeros(0, dtype=np.int64)


def _hash_features(tokens: Iterable[str], n_features: int) -> Features:
    """The columns of the tokens and of their visible words; no twin words (see SpamModel.features)."""
    mask = n_features - 1
    column_of = {t: zlib.crc32(t.encode("utf-8", "replace")) & mask for t in tokens}
    columns = set(column_of.values())
    # spamfeatures.is_visible_word, inlined: a call per token is a third of the hashing time.
    words = {c for t, c in column_of.items() if ":" not in t and t[:1].isalpha() and t != "num%"}
    return Features(
        np.fromiter(columns, dtype=np.int64, count=len(columns)),
        np.fromiter(words, dtype=np.int64, count=len(words)),
        _NO_COLUMNS,
    )


def lesson_key(raw: bytes) -> int:
    """Which message a feedback lesson was about: 64 bits of its SHA-256."""
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def _lessons_from_npz(npz: np.lib.npyio.NpzFile, path: Path) -> dict[int, int]:
    try:
        keys, classes = npz["lesson_keys"], npz["lesson_classes"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelError(f"{path}: refused model array: {exc}") from exc
    if (keys.dtype != np.uint64 or classes.dtype != np.uint8 or keys.ndim != 1
            or keys.shape != classes.shape or keys.size > MAX_LESSONS):
        raise ModelError(f"{path}: lesson_keys must be uint64 and lesson_classes uint8, 1-d, of one "
                         f"length up to {MAX_LESSONS}; got {keys.dtype} {keys.shape}, {classes.dtype} {classes.shape}")
    if np.any(classes > _SPAM):
        raise ModelError(f"{path}: lesson_classes holds a class other than 0 (ham) and 1 (spam)")
    return dict(zip(keys.tolist(), classes.tolist(), strict=True))


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class SpamModel:
    """Naive Bayes over the presence of hashed mail features."""

    def __init__(
        self,
        feature_count: np.ndarray,
        class_count: np.ndarray,
        *,
        alpha: float,
        trained_at: str | None = None,
        updated_at: str | None = None,
        feature_version: int = FEATURE_VERSION,
        lessons: dict[int, int] | None = None,
    ) -> None:
        self._n_features = int(feature_count.shape[1])
        # The feature set it was trained on (fit); learning since may add newer tokens.
        self._feature_version = feature_version
        self._alpha = float(alpha)
        self._feature_count = np.ascontiguousarray(feature_count, dtype=np.float64)
        self._class_count = np.ascontiguousarray(class_count, dtype=np.float64)
        self._trained_at = trained_at
        self._updated_at = updated_at
        # Message key -> class it was taught as by feedback, oldest first.
        self._lessons: dict[int, int] = dict(lessons or {})
        self._refresh()

    # -- construction -----------------------------------------------------

    @classmethod
    def empty(cls, *, alpha: float = DEFAULT_ALPHA, n_features: int = DEFAULT_N_FEATURES) -> SpamModel:
        _check_params(n_features, alpha)
        return cls(
            np.zeros((2, n_features), dtype=np.float64),
            np.zeros(2, dtype=np.float64),
            alpha=alpha,
        )

    def copy(self) -> SpamModel:
        """An independent model with the same counts.

        ``learn_bytes`` mutates in place; a long-lived process learns on a copy
        and swaps the reference, so a concurrent scorer never sees half an update.
        """
        return SpamModel(
            self._feature_count.copy(),
            self._class_count.copy(),
            alpha=self._alpha,
            trained_at=self._trained_at,
            updated_at=self._updated_at,
            feature_version=self._feature_version,
            lessons=self._lessons,
        )

    @classmethod
    def load(cls, path: Path) -> SpamModel:
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except FileNotFoundError as exc:
            raise ModelError(f"{path}: spam model file not found") from exc
        except OSError as exc:
            raise ModelError(f"{path}: cannot read spam model: {exc}") from exc
        if magic != _ZIP_MAGIC:
            # Only a zip archive goes on to numpy, which would otherwise guess (.npy, pickle).
            raise ModelError(f"{path}: not a mailgate spam model: not an .npz (zip) archive")
        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{path}: not a mailgate spam model (.npz): {exc}") from exc
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ModelError(f"{path}: not a mailgate spam model: expected an .npz archive")
        with npz:
            try:
                return cls._from_npz(npz, path)
            except ModelError:
                raise
            except Exception as exc:  # a hostile file must never crash the daemon: refuse it
                raise ModelError(f"{path}: refused model file: {type(exc).__name__}: {str(exc)[:200]}") from exc

    @classmethod
    def _from_npz(cls, npz: np.lib.npyio.NpzFile, path: Path) -> SpamModel:
        expected = {"header", "feature_count", "class_count"}
        names = set(npz.files)
        # Files written before feedback lessons were remembered have no lesson arrays.
        if names != expected and names != expected | _LESSON_ARRAYS:
            raise ModelError(f"{path}: unexpected arrays {sorted(names)}; expected {sorted(expected)}"
                             f" and optionally {sorted(_LESSON_ARRAYS)}")
        for info in npz.zip.infolist():
            if info.file_size > _MAX_MEMBER_SIZES.get(info.filename, 0):
                raise ModelError(f"{path}: member {info.filename} is implausibly large")
        try:
            header_arr = npz["header"]
            feature_count = npz["feature_count"]
            class_count = npz["class_count"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            # ValueError is what numpy raises for object (pickled) arrays
            # under allow_pickle=False: the payload is never unpickled.
            raise ModelError(f"{path}: refused model array: {exc}") from exc

        if header_arr.dtype != np.uint8 or header_arr.ndim != 1:
            raise ModelError(f"{path}: header must be a 1-d uint8 array of JSON")
        if header_arr.size > _MAX_HEADER_BYTES:
            raise ModelError(f"{path}: header is implausibly large ({header_arr.size} bytes)")
        try:
            header = json.loads(header_arr.tobytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            # ValueError: not UTF-8, not JSON, or an integer too long to convert;
            # RecursionError: nesting deeper than the parser's stack.
            raise ModelError(f"{path}: header is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise ModelError(f"{path}: not a mailgate spam model (format tag missing)")
        if header.get("version") != FORMAT_VERSION:
            raise ModelError(
                f"{path}: model format version {repr(header.get('version'))[:40]} is not supported "
                f"(this mailgate reads version {FORMAT_VERSION}); "
                "retrain with `mailgate spam train`"
            )
        feature_version = header.get("feature_version")
        # Type first: a list in a hostile header is unhashable, True == 1.
        readable = type(feature_version) is int and feature_version in READABLE_FEATURE_VERSIONS
        if not readable:
            raise ModelError(
                f"{path}: model was trained on feature set {repr(feature_version)[:40]}, this "
                f"mailgate reads sets {sorted(READABLE_FEATURE_VERSIONS)}; retrain with `mailgate spam train`"
            )
        n_features = header.get("n_features")
        alpha = header.get("alpha")
        if not isinstance(n_features, int) or isinstance(n_features, bool):
            raise ModelError(f"{path}: header n_features must be an integer")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise ModelError(f"{path}: header alpha must be a number")
        try:
            _check_params(n_features, float(alpha))
        except (ValueError, OverflowError) as exc:
            raise ModelError(f"{path}: {exc}") from exc

        if feature_count.dtype != np.float32 or feature_count.shape != (2, n_features):
            raise ModelError(
                f"{path}: feature_count must be float32 of shape (2, {n_features}), "
                f"got {feature_count.dtype} {feature_count.shape}"
            )
        if class_count.dtype != np.float64 or class_count.shape != (2,):
            raise ModelError(
                f"{path}: class_count must be float64 of shape (2,), got {class_count.dtype} {class_count.shape}"
            )
        for name, arr in (("feature_count", feature_count), ("class_count", class_count)):
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ModelError(f"{path}: {name} holds negative or non-finite counts")
        lessons = _lessons_from_npz(npz, path) if names >= _LESSON_ARRAYS else {}
        trained_at = header.get("trained_at")
        updated_at = header.get("updated_at")
        return cls(
            feature_count.astype(np.float64),
            class_count,
            alpha=float(alpha),
            trained_at=trained_at if isinstance(trained_at, str) else None,
            feature_version=int(feature_version),
            updated_at=updated_at if isinstance(updated_at, str) else None,
            lessons=lessons,
        )

    def save(self, path: Path) -> None:
        """Write atomically: readers see the old model or the new, never half a file."""
        path = Path(path)
        header = json.dumps(
            {"format": FORMAT_NAME, "version": FORMAT_VERSION} | self.meta,
            sort_keys=True,
        ).encode("utf-8")
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                # Without lessons (trained, or never taught) no lesson arrays: such a file
                # stays readable by mailgate versions that predate them.
                lessons = {} if not self._lessons else {
                    "lesson_keys": np.fromiter(self._lessons.keys(), dtype=np.uint64, count=len(self._lessons)),
                    "lesson_classes": np.fromiter(self._lessons.values(), dtype=np.uint8, count=len(self._lessons)),
                }
                np.savez_compressed(
                    fh,
                    header=np.frombuffer(header, dtype=np.uint8),
                    # float32 halves the file; counts stay exact below 2^24.
                    feature_count=self._feature_count.astype(np.float32),
                    class_count=self._class_count.astype(np.float64),
                    **lessons,
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        _remove_stale_temporaries(path)

    # -- properties -------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "trained_at": self._trained_at,
            "updated_at": self._updated_at,
            "n_ham": int(self._class_count[_HAM]),
            "n_spam": int(self._class_count[_SPAM]),
            "n_features": self._n_features,
            "alpha": self._alpha,
            "version": FORMAT_VERSION,
            "feature_version": self._feature_version,
        }

    @property
    def ready(self) -> bool:
        """A model that has not seen both classes cannot tell them apart."""
        return bool(self._class_count[_HAM] > 0 and self._class_count[_SPAM] > 0)

    # -- scoring ----------------------------------------------------------

    def features(self, raw: bytes, msg: Message | None = None) -> Features:
        """The hashed features of one message, twin words included (msg: see extract_tokens)."""
        msg = msg if msg is not None else _parsed(raw)
        return replace(self._features(raw, msg), twin_words=self._twin_columns(raw, msg),
                       shown_words=_hash_tokens(shown_html_words(raw, msg), self._n_features))

    def _features(self, raw: bytes, msg: Message | None) -> Features:
        tokens = extract_tokens(raw, msg, feature_version=self._feature_version)
        return _hash_features(tokens, self._n_features)

    def _twin_columns(self, raw: bytes, msg: Message | None) -> np.ndarray:
        return _hash_tokens(html_twin_words(raw, msg), self._n_features)

    def vectorize(self, raw: bytes, msg: Message | None = None) -> np.ndarray:
        """Column indices of the hashed features of one message: what learning counts."""
        return self._features(raw, msg).columns

    def known_words(self, features: Features) -> float:
        """Share of the visible words seen in KNOWN_WORD_MESSAGES or more training messages;
        of the plain text, of its HTML twin or of the HTML without its hidden text, whichever
        the model knows best (junk in a plain part or in hidden HTML must not hide the words
        that the reader sees). 1.0 without words."""
        shares = [float(self._known[w].mean()) for w in (features.words, features.twin_words, features.shown_words)
                  if len(w)]
        return max(shares, default=1.0)

    def log_odds(self, columns: np.ndarray) -> float:
        """Prior log-odds plus the evidence of the SCORE_TOKENS most decisive columns."""
        w = self._weights[columns]
        n = len(w)
        if n > SCORE_TOKENS:
            w = w[np.argpartition(np.abs(w), n - SCORE_TOKENS)[n - SCORE_TOKENS :]]
        return float(self._bias + w.sum())

    def score_bytes(
        self,
        raw: bytes,
        threshold: float,
        msg: Message | None = None,
        *,
        min_known_words: float = DEFAULT_MIN_KNOWN_WORDS,
    ) -> SpamScore:
        msg = msg if msg is not None else _parsed(raw)  # once for the tokens and the twin
        features = self._features(raw, msg)
        verdict = self.score_features(features, threshold, min_known_words=min_known_words)
        if verdict.score >= threshold and not verdict.is_spam:
            # Few known words: does the model know the HTML twin, or the HTML without its hidden
            # text, better? Rare, so read only now.
            features = replace(features, twin_words=self._twin_columns(raw, msg),
                               shown_words=_hash_tokens(shown_html_words(raw, msg), self._n_features))
            verdict = self.score_features(features, threshold, min_known_words=min_known_words)
        return verdict

    def score_features(
        self, features: Features, threshold: float, *, min_known_words: float = DEFAULT_MIN_KNOWN_WORDS
    ) -> SpamScore:
        if not self.ready:
            # Fail open: an untrained filter must not quarantine customer mail.
            return SpamScore(score=0.0, is_spam=False)
        score = _sigmoid(self.log_odds(features.columns))
        # Fail open as well where the model does not know the language (module docstring).
        known = self.known_words(features)
        return SpamScore(score=score, is_spam=score >= threshold and known >= min_known_words, known_words=known)

    # -- training ---------------------------------------------------------

    def learn_bytes(self, raw: bytes, is_spam: bool) -> bool:
        """Count one message in its class, as feedback; False if it was taught so already.
        One taught as the other class before (an agent's mistake undone) leaves that class
        instead of being counted in both."""
        key = lesson_key(raw)
        label = _SPAM if is_spam else _HAM
        before = self._lessons.pop(key, None)
        self._lessons[key] = label  # (re)inserted last: the newest lessons are kept longest
        if before == label:
            return False
        columns = self.vectorize(raw)
        if before is not None:
            # Floored at 0 as a guard only: these are the counts this lesson added.
            self._feature_count[before, columns] = np.maximum(self._feature_count[before, columns] - 1, 0)
            self._class_count[before] = max(self._class_count[before] - 1, 0)
        X = _rows_to_csr([columns], self._n_features)
        self._partial_fit(X, np.array([label]))
        while len(self._lessons) > MAX_LESSONS:
            del self._lessons[next(iter(self._lessons))]
        self._updated_at = _now()
        return True

    def taught_as(self, raw: bytes) -> bool | None:
        """What feedback taught the model about this message: True spam, False ham, None nothing."""
        label = self._lessons.get(lesson_key(raw))
        return None if label is None else label == _SPAM

    def fit(
        self,
        messages: Iterable[tuple[bytes, bool]],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Train from scratch. ``progress`` gets the running message count after each one."""

        def columns() -> Iterator[tuple[np.ndarray, bool]]:
            for done, (raw, is_spam) in enumerate(messages, start=1):
                yield self.vectorize(raw), is_spam
                if progress is not None:
                    progress(done)

        self.fit_columns(columns())

    def fit_columns(self, rows: Iterable[tuple[np.ndarray, bool]]) -> None:
        """Train from scratch on messages vectorized with the current feature set.

        The rows may be a generator calling ``vectorize`` (``fit`` does): the
        feature set is switched first, so they get the current set's tokens.
        """
        self._feature_version = FEATURE_VERSION
        self._feature_count = np.zeros((2, self._n_features), dtype=np.float64)
        self._class_count = np.zeros(2, dtype=np.float64)
        self._lessons = {}
        self._refresh()
        batch: list[np.ndarray] = []
        labels: list[int] = []
        for cols, is_spam in rows:
            batch.append(cols)
            labels.append(_SPAM if is_spam else _HAM)
            # Chunks keep memory flat for a mailbox of any size.
            if len(batch) >= 2000:
                self._partial_fit(_rows_to_csr(batch, self._n_features), np.array(labels))
                batch, labels = [], []
        if batch:
            self._partial_fit(_rows_to_csr(batch, self._n_features), np.array(labels))
        self._trained_at = _now()
        self._updated_at = self._trained_at

    def to_sklearn(self) -> BernoulliNB:
        """The fitted scikit-learn estimator holding the same counts.

        Its ``predict_proba`` also counts absent columns as evidence and sums
        every present column, so its probabilities differ from ``score_bytes``;
        it is what ``partial_fit`` runs on and the speed reference in
        bench/spam.py.
        """
        # Imported here: scoring needs numpy only, and scipy + scikit-learn add ~90 MB
        # to every process that merely scores.
        from sklearn.naive_bayes import BernoulliNB

        nb = BernoulliNB(alpha=self._alpha)
        nb.classes_ = np.array([_HAM, _SPAM])
        nb.n_features_in_ = self._n_features
        nb.class_count_ = self._class_count.copy()
        nb.feature_count_ = self._feature_count.copy()
        if self.ready:
            nb.feature_log_prob_ = self._feature_log_prob()
            nb.class_log_prior_ = np.log(self._class_count / self._class_count.sum())
        return nb

    def _partial_fit(self, X: sp.csr_matrix, y: np.ndarray) -> None:
        nb = self.to_sklearn()
        with np.errstate(divide="ignore"):
            # log(0) prior while one class is still unseen is expected here.
            nb.partial_fit(X, y, classes=None if self._class_count.any() else [_HAM, _SPAM])
        self._feature_count = np.ascontiguousarray(nb.feature_count_, dtype=np.float64)
        self._class_count = np.ascontiguousarray(nb.class_count_, dtype=np.float64)
        self._refresh()

    def _feature_log_prob(self) -> np.ndarray:
        # Same estimate as BernoulliNB.feature_log_prob_.
        return np.log(self._feature_count + self._alpha) - np.log(self._class_count + 2 * self._alpha)[:, None]

    def _refresh(self) -> None:
        # Two-class NB reduces to one weight per column plus a bias; keeping
        # that single contiguous vector is what makes scoring a gather-sum.
        if self.ready:
            flp = self._feature_log_prob()
            weights = flp[_SPAM] - flp[_HAM]
            # A column no message ever had is no evidence; without this every
            # new word would vote for the smaller class.
            weights[self._feature_count.sum(axis=0) == 0] = 0.0
            self._weights = np.ascontiguousarray(weights)
            prior = np.log(self._class_count)
            self._bias = float(prior[_SPAM] - prior[_HAM])
        else:
            self._weights = np.zeros(self._n_features, dtype=np.float64)
            self._bias = 0.0
        self._known = self._feature_count.sum(axis=0) >= KNOWN_WORD_MESSAGES


def _parsed(raw: bytes) -> Message | None:
    """The stdlib MIME tree, or None where the parser gives up (extract_tokens then scores
    the raw words, as `parse:failed`)."""
    try:
        return message_from_bytes(raw)
    except Exception:
        return None


def _check_params(n_features: int, alpha: float) -> None:
    if n_features > _MAX_FEATURES:
        raise ValueError(f"{n_features} hash columns is more than mailgate loads ({_MAX_FEATURES}); "
                         "build the model again with `mailgate spam train`")
    if n_features < _MIN_FEATURES or n_features & (n_features - 1):
        raise ValueError(f"n_features must be a power of two in [{_MIN_FEATURES}, {_MAX_FEATURES}], got {n_features}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _rows_to_csr(rows: Sequence[np.ndarray], n_features: int) -> sp.csr_matrix:
    import scipy.sparse as sp

    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_features))


# A save takes well under a minute; a temporary file this old was left by a process killed
# while it saved (the model itself stays whole: it is replaced only when complete).
_STALE_TEMPORARY_SECONDS = 3600


def _remove_stale_temporaries(path: Path) -> None:
    cutoff = time.time() - _STALE_TEMPORARY_SECONDS
    # Exactly save()'s own names (mkstemp adds 8 characters): not those of another model
    # file whose name starts with this one's, which its own lock guards.
    own = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if own.fullmatch(leftover.name) and leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Mail sources and evaluation
# --------------------------------------------------------------------------


def read_mail_sources(paths: Sequence[Path], skipped: list[str] | None = None) -> Iterator[bytes]:
    """Raw messages from folders of files, maildirs or mbox files, in name order. A file
    that is no mail (empty, compressed, a stray note) is left out, and its name added to
    `skipped`: learned, it would teach the model its bytes as a message."""
    for name, raw in _mail_source_items(paths):
        if looks_like_mail(raw):
            yield raw
        elif skipped is not None:
            skipped.append(name)


# A header line's start (RFC 5322 2.2: printable ASCII but ':' as the name), or an mbox From_ line.
_HEADER_START = re.compile(rb"(From |[!-9;-~]+[ \t]*:)")


def looks_like_mail(raw: bytes) -> bool:
    return _HEADER_START.match(raw.lstrip(b"\r\n")) is not None


def _mail_source_items(paths: Sequence[Path]) -> Iterator[tuple[str, bytes]]:
    for path in map(Path, paths):
        if path.is_dir():
            subdirs = [path / "cur", path / "new"]
            if any(d.is_dir() for d in subdirs):
                for d in subdirs:
                    if d.is_dir():
                        yield from _read_files(d)
            else:
                yield from _read_files(path)
        elif path.is_file():
            with path.open("rb") as fh:
                is_mbox = fh.read(5) == b"From "
            if is_mbox:
                box = mailbox.mbox(path, create=False)
                try:
                    for key in box.iterkeys():
                        yield f"{path} message {key}", box.get_bytes(key)
                finally:
                    box.close()
            else:
                yield str(path), path.read_bytes()  # a lone .eml
        else:
            raise FileNotFoundError(f"no such mail source: {path}")


def _read_files(directory: Path) -> Iterator[tuple[str, bytes]]:
    for entry in sorted(directory.iterdir()):
        # Dot files are editor/maildir bookkeeping, never messages.
        if entry.name.startswith(".") or not entry.is_file():
            continue
        yield str(entry), entry.read_bytes()


def evaluate(
    model: SpamModel,
    ham: Iterable[bytes],
    spam: Iterable[bytes],
    threshold: float,
    min_known_words: float = DEFAULT_MIN_KNOWN_WORDS,
) -> dict[str, float | int]:
    n_ham = n_spam = ham_fp = spam_tp = 0
    for raw in ham:
        n_ham += 1
        ham_fp += model.score_bytes(raw, threshold, min_known_words=min_known_words).is_spam
    for raw in spam:
        n_spam += 1
        spam_tp += model.score_bytes(raw, threshold, min_known_words=min_known_words).is_spam
    total = n_ham + n_spam
    correct = (n_ham - ham_fp) + spam_tp
    return {
        "accuracy": round(correct / total, 4) if total else 0.0,
        "spam_recall": round(spam_tp / n_spam, 4) if n_spam else 0.0,
        "ham_false_positive_rate": round(ham_fp / n_ham, 4) if n_ham else 0.0,
        "n_ham": n_ham,
        "n_spam": n_spam,
    }
