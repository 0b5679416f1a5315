"""Request schemas of the service: parse and check a JSON body, or refuse it with a one-line reason.

``POST /recommend``::

    {"history": [raw item ids, oldest first],      required; ints or strings ("42" and 42 are one item)
     "n": 10,                                      1 <= n <= min(max_n, catalogue size); default 10
     "user_features": {"age": 3, ...},             optional: feature name -> index in 0..cardinality-1
                                                   (0 = unknown; names from meta.json; missing = 0)
     "merge": "max" | "quota" | "diverse",         optional; passed to Recommender.recommend_batch
     "diversity": 0.5,                             optional (lambda >= 0, with merge "diverse")
     "exclude_history": true}                      optional; default true

``POST /recommend/batch``: ``{"users": [{"history": [...], "user_features": {...}}, ...]}`` plus the
same ``n``, ``merge``, ``diversity`` and ``exclude_history`` for every user.

Every refusal is a :class:`BadRequest` with an HTTP status (400, or 413 for a body over the limit)
and a one-line reason; the app answers ``{"error": reason}``.  The checks here are the ones that need
no model (types, unknown fields, sizes, ranges); what depends on the catalogue (unknown ids, a
history with no known item) and the merge arguments are the Recommender's own checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

COMMON = ("n", "merge", "diversity", "exclude_history")
SINGLE_FIELDS = ("history", "user_features", *COMMON)
BATCH_FIELDS = ("users", *COMMON)
USER_FIELDS = ("history", "user_features")
MAX_ID_CHARS = 256


class BadRequest(Exception):
    """A client mistake: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = " ".join(str(reason).split())[:500]
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``python -m mind serve`` flags)."""

    max_body_bytes: int = 1 << 20     # --max-body-bytes
    max_history: int = 10_000         # --max-history: ids in one history
    max_users: int = 1_000            # --max-users: users in one /recommend/batch request
    max_n: int = 1_000                # --max-n


@dataclass
class Query:
    """A checked request: one or many users, and the arguments they share."""

    histories: list
    features: Optional[np.ndarray]    # (U, F) int64, or None when no user gave features
    n: int
    exclude_history: bool
    merge_kwargs: dict                # only what the request gave: {"merge": ..., "diversity": ...}
    batch: bool

    def key(self) -> tuple:
        """Requests with equal keys can share one Recommender call."""
        return (self.n, self.exclude_history, tuple(sorted(self.merge_kwargs.items())))


def parse_json(body: bytes):
    """The JSON value of ``body``; BadRequest naming the problem."""
    if not body.strip():
        raise BadRequest("empty body: send a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None


def _type(x) -> str:
    return "null" if x is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(x), type(x).__name__)


def _object(x, what: str, allowed: tuple) -> dict:
    if not isinstance(x, dict):
        raise BadRequest(f"{what} must be a JSON object, got {_type(x)}")
    unknown = [k for k in x if k not in allowed]
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown[:5]} in {what} (allowed: {', '.join(allowed)})")
    return x


def _int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise BadRequest(f"{what} must be an integer, got {_type(x)} {json.dumps(x)[:40]}")
    return x


def _history(x, what: str, limits: Limits) -> list:
    if x is None:
        raise BadRequest(f"{what} is required: a list of raw item ids, oldest first")
    if not isinstance(x, list):
        raise BadRequest(f"{what} must be a list of raw item ids, got {_type(x)}")
    if len(x) > limits.max_history:
        raise BadRequest(f"{what} has {len(x)} ids, more than the limit of {limits.max_history}")
    for i, r in enumerate(x):
        if isinstance(r, bool) or not isinstance(r, (int, str)):
            raise BadRequest(f"{what}[{i}] must be an item id (integer or string), got {_type(r)}")
        if isinstance(r, str) and len(r) > MAX_ID_CHARS:
            raise BadRequest(f"{what}[{i}] is a string of {len(r)} characters, more than {MAX_ID_CHARS}")
    return x


def _features(x, what: str, names: list, cardinalities: list) -> Optional[np.ndarray]:
    if x is None:
        return None
    if not isinstance(x, dict):
        raise BadRequest(f"{what} must be an object of feature name -> index, got {_type(x)}")
    row = np.zeros(len(names), dtype=np.int64)
    for name, value in x.items():
        if name not in names:
            raise BadRequest(f"{what} has unknown feature {name!r} (this model's: {names})")
        j = names.index(name)
        v = _int(value, f"{what}[{name!r}]")
        if not 0 <= v < cardinalities[j]:
            raise BadRequest(f"{what}[{name!r}] must be in 0..{cardinalities[j] - 1} (0 = unknown), got {v}")
        row[j] = v
    return row


def _common(body: dict, num_items: int, limits: Limits) -> tuple[int, bool, dict]:
    n = _int(body.get("n", 10), "n")
    top = min(limits.max_n, num_items)
    if not 1 <= n <= top:
        why = "the catalogue size" if top == num_items else "the service's --max-n"
        raise BadRequest(f"n must be between 1 and {top} ({why}), got {n}")
    exclude = body.get("exclude_history", True)
    if not isinstance(exclude, bool):
        raise BadRequest(f"exclude_history must be true or false, got {_type(exclude)}")
    merge_kwargs = {}
    if "merge" in body:
        if not isinstance(body["merge"], str):
            raise BadRequest(f"merge must be a string, got {_type(body['merge'])}")
        merge_kwargs["merge"] = body["merge"]
    if "diversity" in body:
        d = body["diversity"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise BadRequest(f"diversity must be a finite number, got {_type(d)}")
        merge_kwargs["diversity"] = float(d)
    return n, exclude, merge_kwargs


def parse_recommend(body, num_items: int, feature_names: list, cardinalities: list, limits: Limits) -> Query:
    """A /recommend body -> :class:`Query` of one user; BadRequest for a malformed one."""
    body = _object(body, "the body", SINGLE_FIELDS)
    history = _history(body.get("history"), "history", limits)
    feats = _features(body.get("user_features"), "user_features", feature_names, cardinalities)
    n, exclude, merge_kwargs = _common(body, num_items, limits)
    return Query([history], None if feats is None else feats[None], n, exclude, merge_kwargs, batch=False)


def parse_batch(body, num_items: int, feature_names: list, cardinalities: list, limits: Limits) -> Query:
    """A /recommend/batch body -> :class:`Query` of its users; BadRequest for a malformed one."""
    body = _object(body, "the body", BATCH_FIELDS)
    users = body.get("users")
    if not isinstance(users, list) or not users:
        raise BadRequest("users must be a non-empty list of {\"history\": [...], \"user_features\": {...}}"
                         + ("" if users is None else f", got {_type(users)}" if not isinstance(users, list) else ""))
    if len(users) > limits.max_users:
        raise BadRequest(f"users has {len(users)} entries, more than the limit of {limits.max_users}")
    histories, rows = [], []
    for u, user in enumerate(users):
        user = _object(user, f"users[{u}]", USER_FIELDS)
        histories.append(_history(user.get("history"), f"users[{u}].history", limits))
        rows.append(_features(user.get("user_features"), f"users[{u}].user_features", feature_names, cardinalities))
    n, exclude, merge_kwargs = _common(body, num_items, limits)
    feats = None
    if any(r is not None for r in rows):
        feats = np.stack([np.zeros(len(feature_names), np.int64) if r is None else r for r in rows])
    return Query(histories, feats, n, exclude, merge_kwargs, batch=True)
