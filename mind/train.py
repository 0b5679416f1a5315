"""Train MIND on a :class:`mind.data.PreparedData`: AdamW, early stopping, checkpoints, resume.

One epoch = one pass over the (history, next item) training samples in a seeded random
order.  After each epoch the model is evaluated on the validation split (Recall, HitRate,
NDCG @20 and @50 with full-catalogue retrieval); training stops when valid recall@50 has
not improved for ``patience`` epochs, and the best epoch's weights are evaluated on test.

Retrieval excludes every item of the user's full known history (``full_histories``):
MovieLens users rate an item at most once, so a seen item can never be a target and
leaving seen items in would only spend slots of the top-N list.

Files in ``out_dir``:
    last.pt            checkpoint after the latest epoch (model, optimizer, epoch, RNG, config, best)
    best.pt            model weights of the best validation epoch
    metrics.json/.csv  one row per epoch (train loss, valid metrics, seconds)
    final_metrics.json/.csv   valid and test metrics of the best epoch
    learning_curves.png
    split.json         the user split (mind.data.save_split)

Reproducibility: everything is seeded from ``config.seed``; the epoch order comes from a
generator seeded by (seed, epoch), and the global RNG states are saved in each checkpoint,
so ``resume`` from epoch e continues exactly as the uninterrupted run would have.

Multi-process (``torchrun --nproc_per_node W python -m mind train ...``, see mind/distributed.py):

* The model is wrapped in DistributedDataParallel (gloo on CPUs, NCCL on GPUs); DDP averages
  the gradients and broadcasts buffers (the routing layer's fixed eval logits) from rank 0.
* Data: every rank draws the same (seed, epoch) permutation and takes its own strided shard
  of it (``mind.distributed.shard``), so an epoch is still one pass over all samples.
* Batch: ``batch_size`` is the *global* batch; each rank takes ``batch_size // W`` samples
  per step, so one optimizer step sees the same number of samples as a single-process run
  with the same ``--batch-size`` and the hyper-parameters carry over.
* Randomness: the sampled-softmax negatives and the training routing logits b0 come from the
  global torch RNG, which in a multi-process run is re-seeded at the start of every epoch
  from (seed, epoch, rank).  So each rank draws its *own* S negatives for its sub-batch (W*S
  distinct draws per global step rather than S shared by all rows; each row still sees S,
  the estimator is unchanged), and a resumed run draws exactly what the uninterrupted one
  would have, whatever the checkpoint's RNG state.
* ``loss="in_batch"`` takes its negatives from the rank's own sub-batch (``batch_size // W``
  rows), not from the global batch; ``"full"`` and ``"sampled"`` do not depend on the split.
* Rank 0 alone evaluates, writes metrics, plots, the split and the checkpoints; it
  broadcasts each epoch's row so every rank takes the same early-stopping decision, and the
  other ranks wait at a barrier meanwhile.  ``resume`` makes every rank load the same
  ``last.pt``.  At the end the ranks check that their parameters agree (a checksum) and
  raise if they do not.
* The single-process path (no torchrun) is untouched: bit-identical to before.

Speed (issue 13, ``bench/bench_train.py``): with the exact softmax each step embeds the item
table once and gathers the histories and targets from it; ``compile=True`` runs the forward +
loss as one ``torch.compile(fullgraph=True)`` graph (single process only); ``optimizer="rowwise"``
updates only the embedding rows a step touched (``mind.optim``).  Both levers are off by default.
Second round, on by default (measured step by step in one process, ``--sections levers``):
``pad_items`` pads the exact softmax's score rows to a multiple of 16 (MKL's sgemm is ~1.5x slower
at an odd item count), ``split_h`` computes the profile part of the first H layer once per user,
and ``genre_matmul`` pools genres by one matmul.  Two stay flags: ``keep_freed_memory`` (glibc
keeps freed heap memory in the process, ``mind.allocator``: 0.96x to 1.42x per step, a win only
on a loaded machine) and ``item_table="auto"`` (embed the whole table for the sampled softmax too
when N + 1 <= B L: 1.07x on ML-100k, 0.73x to 1.00x on 5,000 to 30,000-item synthetic catalogues).
Third round (``--sections levers``, "round 3"): ``fused_loss`` runs the exact best-interest softmax
through ``mind_kernels.best_interest_cross_entropy`` (loss and score gradients in one pass per user,
a compiled CPU kernel), ``gather_index_add`` gathers the histories' rows of the item table with an
``index_add_`` backward (``mind.model.gather_rows``), ``build_optimizer`` steps AdamW with
``fused=True``; ``h_dtype="bfloat16"`` (off: it cost valid recall) runs the H layers' products in bf16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import (CheckpointError, get_rng_state, load_checkpoint, save_checkpoint,
                         seed_everything, set_rng_state)
from .loss import SoftmaxLoss, interest_similarity_penalty
from .model import MIND, label_aware_attention, retrieval_vectors
from .optim import build_optimizer

#: config fields that change the model or the optimisation; a resumed run must match them.
_RESUME_MUST_MATCH = ("dim", "num_interests", "num_iters", "max_len", "p", "lr", "weight_decay", "batch_size",
                      "num_negatives", "loss", "seed", "dynamic_interests", "user_feature_dim", "hidden_mult",
                      "routing_init_std", "softmax_over", "routing_weight_scale", "logit_scale",
                      "h_out_activation", "scoring", "hard_negative_beta", "diversity_lambda",
                      "stochastic_selection", "target_window", "optimizer", "score_dtype", "h_dtype")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults tuned on MovieLens-100k, see mind/quality.py)."""

    dim: int = 64
    num_interests: int = 4
    num_iters: int = 3
    max_len: int = 20
    # The defaults of the levers below are the K>1 recipe `python -m mind sweep` chose on
    # MovieLens-100k valid (bench/measured/sweep): every item scored by its best interest, a
    # linear last H layer, the exact softmax, routing logits N(0, 1), lambda = 0.1.
    p: float = 0.0                 # label-aware attention hardness (0 = mean, inf = argmax); scoring="attention" only
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 20
    num_negatives: int = 200
    loss: str = "auto"             # "auto" (full up to FULL_SOFTMAX_MAX_ITEMS items, else sampled) | "sampled" | "full" | "in_batch"
    patience: int = 3
    seed: int = 0
    dynamic_interests: bool = False
    backend: str = "auto"
    user_feature_dim: int = 16
    hidden_mult: int = 4
    routing_init_std: float = 1.0  # sigma of the routing logits b0 ~ N(0, sigma^2)
    softmax_over: str = "interests"  # routing coupling axis; "behaviors" = ComiRec's convention
    routing_weight_scale: float = 1.0  # initial scale of the routing map S
    logit_scale: float = 1.0       # s of the routing update b += s * c . u (ROUTING.md)
    h_out_activation: str = "linear"  # last H layer: "relu" (the paper) or "linear"
    scoring: str = "max"           # "attention" (label-aware v_u, the paper) or "max" (every item by its best interest)
    hard_negative_beta: float = 0.0  # interest-aware hard negatives (REMI), sampled loss only
    diversity_lambda: float = 0.1  # weight of the mean pairwise interest cosine in the loss
    stochastic_selection: bool = False  # BaM: draw the target's interest instead of attending
    target_window: int = 1         # target = one of the next W items of the sequence, drawn per step (1 = next item)
    # Speed levers (issue 13, bench/bench_train.py): each stays off until it wins end to end.
    optimizer: str = "adamw"       # "adamw" | "rowwise" (embedding tables updated on touched rows only, mind/optim.py)
    compile: bool = False          # torch.compile(fullgraph=True) of the training forward + loss (single process)
    # Second round (issue 13, ``bench/bench_train.py --sections levers``); none changes the model's
    # math beyond float rounding, so none is part of _RESUME_MUST_MATCH.
    keep_freed_memory: bool = False  # CPU: glibc keeps freed memory (mind/allocator.py); RSS stays at its peak
    split_h: bool = True           # first H layer as W1c C_k + W1p p_u, the profile part once per user
    genre_matmul: bool = True      # genre pooling as a (n, genres) x (genres, d) matmul
    pad_items: int = 16            # exact softmax: score rows padded to a multiple of this (1 = off)
    item_table: str = "loss"       # "loss": whole table embedded only for the exact softmax; "auto": also when N + 1 <= B * L
    jagged: str = "auto"           # histories routed as values + offsets: "on", "off", "auto" (see resolve_jagged)
    score_dtype: str = "auto"      # exact softmax, scoring="max": dtype of the score products (see resolve_score_dtype)
    gather_index_add: bool = True  # item-table rows gathered with an index_add_ backward (mind.model.gather_rows)
    h_dtype: str = "float32"       # H layers' products in training: "float32", "bfloat16", "auto" (resolve_h_dtype)
    fused_loss: bool = True        # exact softmax, scoring="max": mind_kernels.best_interest_cross_entropy (one pass)
    eval_ns: tuple = (20, 50)
    eval_batch_size: int = 1024
    out_dir: str = "runs/mind"
    progress: bool = True          # tqdm bars
    write_files: bool = True       # metrics / plots / split (checkpoints are always written)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_ns"] = list(self.eval_ns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "eval_ns" in d:
            d["eval_ns"] = tuple(d["eval_ns"])
        return cls(**d)


@dataclasses.dataclass
class TrainResult:
    model: MIND
    history: list
    best_epoch: int
    best_metric: float
    valid_metrics: dict
    test_metrics: dict
    out_dir: pathlib.Path


def build_model(data, config: TrainConfig, device=None) -> MIND:
    """A fresh MIND sized for ``data`` (items, genres, user features) and ``config`` (``device``: where
    it will train, None = CPU; it only decides ``h_dtype="auto"``)."""
    model = MIND(
        num_items=int(data.num_items), item_genres=torch.as_tensor(np.asarray(data.item_genres), dtype=torch.long),
        num_genres=len(data.genre_names), user_feature_cardinalities=list(data.user_feature_cardinalities),
        dim=config.dim, num_interests=config.num_interests, num_iters=config.num_iters,
        user_feature_dim=config.user_feature_dim, hidden_mult=config.hidden_mult,
        dynamic_interests=config.dynamic_interests, backend=config.backend,
        routing_init_std=config.routing_init_std, softmax_over=config.softmax_over,
        routing_weight_scale=config.routing_weight_scale, logit_scale=config.logit_scale,
        h_out_activation=config.h_out_activation)
    model.split_h, model.genre_matmul = bool(config.split_h), bool(config.genre_matmul)
    model.gather_index_add = bool(config.gather_index_add)
    model.h_dtype = torch.bfloat16 if resolve_h_dtype(config, device) == "bfloat16" else None
    return model


def resolve_score_dtype(config: TrainConfig, device=None) -> str:
    """``score_dtype="auto"``: "bfloat16" on a CPU with native bf16 products (AVX512-BF16 or AMX),
    else "float32"; "float32" / "bfloat16" as given.

    Measured (bench/measured/train_bf16, ML-100k max_len 50, 1 thread, AMD EPYC with AVX512-BF16):
    1.14x per epoch (6.16 s -> 5.40 s); valid Recall@50 over seeds 0/1/2 0.3880 / 0.4013 / 0.3920 against float32's
    0.3925 / 0.3939 / 0.3814.  Without native bf16 the products would be emulated, so float32.
    """
    return _resolve_product_dtype(config.score_dtype, "score_dtype", device)


def resolve_h_dtype(config: TrainConfig, device=None) -> str:
    """``h_dtype``: the H layers' products in training, resolved as :func:`resolve_score_dtype` ("auto":
    bfloat16 on a CPU with native bf16 products).

    Off (float32) by default: bf16 H layers made a step 1.08x faster (``bench/bench_train.py --sections
    levers``) but valid Recall@50 fell on each of seeds 0/1/2, 0.3955 / 0.3996 / 0.3816 -> 0.3895 / 0.3874 /
    0.3798 (``bench/measured/seed_study_levers`` and ``seed_study_h_dtype``).
    """
    return _resolve_product_dtype(config.h_dtype, "h_dtype", device)


def _resolve_product_dtype(value: str, name: str, device=None) -> str:
    if value not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"{name} must be 'auto', 'float32' or 'bfloat16', got {value!r}")
    if value != "auto":
        return value
    if device is not None and torch.device(device).type != "cpu":
        return "float32"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bfloat16" if native else "float32"


def build_loss(data, config: TrainConfig, device=None) -> SoftmaxLoss:
    """The training objective of ``config`` for ``data`` (``device``: where the model trains, None = CPU)."""
    if config.item_table not in ("auto", "loss"):
        raise ValueError(f"item_table must be 'auto' or 'loss', got {config.item_table!r}")
    return SoftmaxLoss(resolve_loss(config.loss, int(data.num_items)), np.asarray(data.item_counts),
                       config.num_negatives, scoring=config.scoring, hard_negative_beta=config.hard_negative_beta,
                       pad_items=int(config.pad_items), score_dtype=resolve_score_dtype(config, device),
                       fused=bool(config.fused_loss))


def use_item_table(model: MIND, loss_fn: SoftmaxLoss, config: TrainConfig, hist: torch.Tensor) -> bool:
    """Whether a step embeds the whole item table once and gathers every item it needs from it.

    Always for the exact softmax (it scores every item).  Otherwise, with ``item_table="auto"``,
    when the table has no more rows than the batch has history positions (N + 1 <= B L): then
    one pass over the table costs no more than embedding the batch's items, and it needs no
    data-dependent ``torch.unique``.  ``"loss"`` keeps the table to the exact softmax.
    """
    if loss_fn.needs_item_table():
        return True
    if config.item_table not in ("auto", "loss"):
        raise ValueError(f"item_table must be 'auto' or 'loss', got {config.item_table!r}")
    return config.item_table == "auto" and model.num_items + 1 <= hist.numel()


def _long(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


@torch.no_grad()
def user_interests(model: MIND, histories, user_features, batch_size: int = 1024):
    """Raw interests in eval mode: V (U, K, d) and the interest mask (U, K) bool, on the CPU."""
    was_training = model.training
    model.eval()
    histories, user_features = _long(histories), _long(user_features)
    device = model.item_genres.device
    vs, ms = [], []
    for s in range(0, histories.shape[0], batch_size):
        v, imask = model.interests(histories[s:s + batch_size].to(device), user_features[s:s + batch_size].to(device))
        vs.append(v.cpu())
        ms.append(imask.cpu())
    model.train(was_training)
    if not vs:
        return (torch.zeros(0, model.num_interests, model.dim),
                torch.zeros(0, model.num_interests, dtype=torch.bool))
    return torch.cat(vs), torch.cat(ms)


@torch.no_grad()
def user_vectors(model: MIND, histories, user_features, batch_size: int = 1024) -> torch.Tensor:
    """Retrieval-ready user vectors (U, K, d) in eval mode (inactive interests = copies of interest 0)."""
    return retrieval_vectors(*user_interests(model, histories, user_features, batch_size))


@torch.no_grad()
def evaluate_model(model: MIND, data, split, ns=(20, 50), batch_size: int = 1024) -> dict:
    """Recall / HitRate / NDCG @ns on an EvalSplit with full-catalogue retrieval, seen items excluded,
    plus mind.diversity.beyond_accuracy: interest_cosine, diversity@N, coverage@N and
    recall@N_entropy_{low,mid,high} (None where undefined, e.g. interest_cosine for K=1)."""
    from .diversity import beyond_accuracy
    from .evaluate import evaluate_rankings, retrieve_topk

    feats = _long(data.user_features)[_long(split.user_index)]
    interests, imask = user_interests(model, split.histories, feats, batch_size)
    vectors = retrieval_vectors(interests, imask)
    was_training = model.training
    model.eval()
    table = model.item_embeddings()
    model.train(was_training)
    ranked, _ = retrieve_topk(vectors.numpy(), table.cpu().numpy(), max(ns), exclude=split.full_histories)
    metrics = evaluate_rankings(ranked, split.targets, ns=tuple(ns))
    metrics.update(beyond_accuracy(ranked, split.targets, split.histories, data.item_genres, int(data.num_items),
                                   ns=tuple(ns), vectors=interests, mask=imask))
    return metrics


#: "auto" takes the exact softmax up to this many items: the (B, K, N) logits of a batch stay
#: small (256 x 4 x 20,000 floats = 82 MB), and on MovieLens-100k the exact softmax beat the
#: sampled one for K = 1 and K = 4 (``python -m mind sweep``).
FULL_SOFTMAX_MAX_ITEMS = 20_000


def resolve_loss(kind: str, num_items: int) -> str:
    """The softmax estimator a config's ``loss`` means for a catalogue of ``num_items``."""
    if kind == "auto":
        return "full" if num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"
    return kind


def future_targets(users: torch.Tensor, targets: torch.Tensor, window: int) -> torch.Tensor:
    """(n, W): the next W items of each training example's sequence, 0 past the user's end.

    A user's training examples are consecutive windows of one sequence (``mind.data.prepare``),
    so example e's j-th future item is example (e + j)'s target when both belong to the same user.
    Column 0 is the example's own target.
    """
    n = targets.shape[0]
    future = torch.zeros(n, window, dtype=targets.dtype)
    for j in range(window):
        same = users[j:] == users[:n - j]
        future[:n - j, j] = torch.where(same, targets[j:], torch.zeros_like(targets[j:]))
    return future


def draw_targets(future: torch.Tensor) -> torch.Tensor:
    """One item per row, uniform over the row's non-zero entries (torch's global generator)."""
    count = (future != 0).sum(1)
    pick = (torch.rand(future.shape[0]) * count).long().clamp_max(count - 1)
    return future.gather(1, pick[:, None]).squeeze(1)


#: ``jagged="auto"`` routes jagged batches when at most this share of the training history slots
#: holds an item.  Measured (one process, alternated, 1 thread, ML-100k): max_len 50 (81% filled)
#: jagged/padded step 0.99x, max_len 200 (45% filled) 1.10x.
JAGGED_AUTO_MAX_FILL = 0.5


def resolve_jagged(config: TrainConfig, histories: torch.Tensor) -> tuple[bool, float]:
    """(route jagged batches?, share of (n, max_len) history slots holding an item).

    ``"auto"`` is on when that share is at most :data:`JAGGED_AUTO_MAX_FILL` and the step is not
    compiled (the jagged gather has a data-dependent size, a graph break); ``"on"`` with
    ``compile=True`` is refused.
    """
    if config.jagged not in ("auto", "on", "off"):
        raise ValueError(f"jagged must be 'auto', 'on' or 'off', got {config.jagged!r}")
    fill = float((histories != 0).float().mean()) if histories.numel() else 1.0
    if config.jagged == "on" and config.compile:
        raise ValueError("jagged='on' cannot be compiled (the jagged gather has a data-dependent size); "
                         "use jagged='off' or 'auto' with compile=True")
    if config.jagged == "auto":
        return (not config.compile) and fill <= JAGGED_AUTO_MAX_FILL, fill
    return config.jagged == "on", fill


def training_loss(net, model: MIND, loss_fn: SoftmaxLoss, config: TrainConfig, hist, feats, tgt,
                  jagged: bool = False) -> torch.Tensor:
    """One batch's loss: the softmax objective (+ lambda * the mean pairwise interest cosine).

    ``net`` is the model or its DDP wrapper (called for the forward, so DDP's hooks run);
    ``model`` the bare MIND (item embeddings).  ``jagged``: route the histories' real
    behaviours only (:meth:`MIND.interests`; the value of :func:`resolve_jagged`).

    With the exact softmax the whole item table is embedded once and the histories and
    targets are rows of it (the same values as embedding them apart, one genre pooling
    instead of two, and no data-dependent ``torch.unique``).  Without dynamic interests every
    interest is active, so no mask is applied at all.
    """
    table = model.item_embeddings() if use_item_table(model, loss_fn, config, hist) else None
    vectors, interest_mask = net(hist, feats, item_table=table, jagged=jagged)
    mask = interest_mask if model.dynamic_interests else None
    if config.scoring == "max":
        loss = loss_fn((vectors, mask), model, tgt, item_table=table)
    else:
        target_emb = model.embed_items(tgt) if table is None else table[tgt]
        user = label_aware_attention(vectors, target_emb, mask, config.p, config.stochastic_selection)
        loss = loss_fn(user, model, tgt, item_table=table)
    if config.diversity_lambda > 0:
        loss = loss + config.diversity_lambda * interest_similarity_penalty(vectors, mask)
    return loss


def _check_resumable(saved: dict, config: TrainConfig, path) -> None:
    diffs = {k: (saved.get(k), getattr(config, k)) for k in _RESUME_MUST_MATCH
             if k in saved and saved.get(k) != getattr(config, k)
             and not (isinstance(saved.get(k), (list, tuple)) and list(saved[k]) == list(getattr(config, k)))}
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written with a different config; "
                              f"differences (saved, requested): {diffs}")


def _write_run_files(out_dir: pathlib.Path, history: list) -> None:
    from .evaluate import write_metrics
    from .plots import plot_learning_curves

    write_metrics(history, str(out_dir / "metrics"))
    if history:
        plot_learning_curves(history, out_dir / "learning_curves.png")


def train(data, config: TrainConfig, resume: bool = False, log=print,
          dist: Optional[D.DistInfo] = None) -> TrainResult:
    """Train (or resume) a MIND model on ``data``; return the best model and its valid/test metrics.

    ``resume=True`` continues from ``out_dir/last.pt`` and raises CheckpointError if that
    file is missing, corrupt, or was written with a different model/optimisation config.

    ``dist``: the process group from :func:`mind.distributed.setup` for a multi-process run
    (see the module docstring); None = single process.  Every rank returns the same
    TrainResult (metrics broadcast from rank 0); ``log`` is called on rank 0 only.
    """
    info = dist or D.SINGLE
    main = info.is_main
    if not main:
        log = lambda *_a, **_k: None  # noqa: E731
    out_dir = pathlib.Path(config.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    ns = tuple(config.eval_ns)
    key = f"valid_recall@{max(ns)}"

    seed_everything(config.seed)
    model = build_model(data, config, info.device if info.enabled else None)
    if info.enabled:
        model = model.to(info.device)
    if config.compile and info.enabled:
        raise ValueError("compile=True needs a single process (DDP splits a compiled graph at its buckets)")
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay)
    loss_fn = build_loss(data, config, info.device if info.enabled else None)
    if config.score_dtype == "auto" and loss_fn.product_dtype is not None:
        log("score products in bfloat16 (score_dtype auto: this CPU multiplies bf16 natively; --score-dtype float32 "
            "turns it off)")
    if config.h_dtype == "auto" and model.h_dtype is not None:
        log("H-layer products in bfloat16 in training (h_dtype auto: this CPU multiplies bf16 natively; --h-dtype "
            "float32 turns it off)")
    if config.keep_freed_memory and model.item_genres.device.type == "cpu":
        from .allocator import keep_freed_memory
        keep_freed_memory()

    start_epoch, history = 1, []
    best_metric, best_epoch, bad_epochs = -math.inf, 0, 0
    if resume:
        state = load_checkpoint(last_path, required=("model", "optimizer", "epoch", "rng", "config",
                                                     "best_metric", "best_epoch", "bad_epochs", "history"))
        _check_resumable(state["config"], config, last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        best_metric, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        bad_epochs, history = int(state["bad_epochs"]), list(state["history"])
        log(f"resumed from {last_path} after epoch {start_epoch - 1} (best {key} {best_metric:.4f} "
            f"at epoch {best_epoch})")
    elif config.write_files and main:
        from .data import save_split
        save_split(data, str(out_dir / "split.json"))

    # DDP after loading: its constructor broadcasts rank 0's parameters and buffers.
    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[info.local_rank] if info.backend == "nccl" else None)
        log(f"distributed: {info.world_size} processes ({info.backend}), global batch {config.batch_size} = "
            f"{info.world_size} x {D.per_rank_batch(config.batch_size, info)} per rank")
    dev = info.device if info.enabled else None
    step_batch = D.per_rank_batch(config.batch_size, info)

    users = _long(data.train_users)
    hists = _long(data.train_histories)[:, -config.max_len:]
    targets = _long(data.train_targets)
    # target_window W > 1 (the "dense all-action" objective of PinnerFormer, KDD 2022): each step
    # predicts an item drawn from the next W instead of the next one, as evaluation asks for a
    # user's whole future rather than its next click.
    if config.target_window < 1:
        raise ValueError(f"target_window must be >= 1, got {config.target_window}")
    future = future_targets(users, targets, config.target_window) if config.target_window > 1 else None
    feats_table = _long(data.user_features)
    n = targets.shape[0]
    # torch.compile: one graph (fullgraph=True, static shapes) for the full batches; the last,
    # shorter batch of an epoch runs eagerly rather than compiling a second graph.
    use_jagged, fill = resolve_jagged(config, hists)
    if config.jagged == "auto":
        log(f"jagged histories: {'on' if use_jagged else 'off'} ({fill:.0%} of the history slots hold an item; "
            f"auto is on at <= {JAGGED_AUTO_MAX_FILL:.0%} without --compile)")
    step_loss = compiled = None
    if config.compile:
        def step_loss(hist, feats, tgt):
            return training_loss(net, model, loss_fn, config, hist, feats, tgt)
        compiled = torch.compile(step_loss, fullgraph=True, dynamic=False)

    for epoch in range(start_epoch, config.epochs + 1):
        if bad_epochs >= config.patience:
            log(f"early stopping after epoch {epoch - 1} of {config.epochs}: {key} has not improved for "
                f"{bad_epochs} epoch(s) (patience {config.patience}); best epoch {best_epoch} ({best_metric:.4f})")
            break
        t0 = time.time()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        if info.enabled:
            order = D.shard(order, info)
            # per-rank negatives and b0, reproducible from (seed, epoch, rank) alone (see module doc)
            torch.manual_seed((config.seed * 100_003 + epoch) * 1_009 + info.rank)
        total, batches = 0.0, 0
        bar = tqdm(range(0, order.shape[0], step_batch), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not (config.progress and main), leave=False)
        for s in bar:
            idx = order[s:s + step_batch]
            hist, tgt, feats = hists[idx], targets[idx], feats_table[users[idx]]
            if future is not None:
                tgt = draw_targets(future[idx])
            if dev is not None:
                hist, tgt, feats = hist.to(dev), tgt.to(dev), feats.to(dev)
            if compiled is not None:
                loss = (compiled if hist.shape[0] == step_batch else step_loss)(hist, feats, tgt)
            else:
                loss = training_loss(net, model, loss_fn, config, hist, feats, tgt, jagged=use_jagged)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            if batches % 20 == 0:
                bar.set_postfix(loss=f"{total / batches:.4f}")
        train_loss = total / max(batches, 1)
        if info.enabled:  # the epoch's loss averaged over ranks (equal batch counts)
            t = torch.tensor([train_loss], dtype=torch.float64, device=dev)
            torch.distributed.all_reduce(t)
            train_loss = float(t) / info.world_size
        row = improved = None
        if main:
            valid = evaluate_model(model, data, data.valid, ns, config.eval_batch_size)
            row = {"epoch": epoch, "train_loss": train_loss,
                   **{f"valid_{k}": v for k, v in valid.items()}, "seconds": time.time() - t0}
            improved = row[key] > best_metric
        row, improved = D.broadcast_object((row, improved), info)
        history.append(row)
        if improved:
            best_metric, best_epoch, bad_epochs = row[key], epoch, 0
            if main:
                save_checkpoint({"model": model.state_dict(), "epoch": epoch, "model_config": model.config,
                                 "config": config.to_dict(), "metric": best_metric}, best_path)
        else:
            bad_epochs += 1
        if main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                             "rng": get_rng_state(), "config": config.to_dict(), "model_config": model.config,
                             "best_metric": best_metric, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                             "history": history}, last_path)
            if config.write_files:
                _write_run_files(out_dir, history)
        log(f"epoch {epoch}: loss {row['train_loss']:.4f}  {key} {row[key]:.4f}"
            f"{'  (best)' if improved else ''}  [{row['seconds']:.1f}s]")
        D.barrier(info)  # checkpoints are on disk before any rank moves on

    if info.enabled:
        sums = D.all_gather_object(D.params_checksum(model), info)
        if len(set(sums)) != 1:
            raise RuntimeError(f"distributed replicas disagree after training: parameter checksums {sums}")
        log(f"distributed: the {info.world_size} replicas agree (parameter checksum {sums[0]:.6f})")
        model = model.cpu()
    if best_epoch > 0:
        model.load_state_dict(load_checkpoint(best_path, required=("model",))["model"])
    model.eval()
    valid = test = None
    if main:
        valid = evaluate_model(model, data, data.valid, ns, config.eval_batch_size)
        test = evaluate_model(model, data, data.test, ns, config.eval_batch_size)
        if config.write_files:
            from .evaluate import write_metrics
            rows = [{"split": "valid", "epoch": best_epoch, **valid}, {"split": "test", "epoch": best_epoch, **test}]
            write_metrics(rows, str(out_dir / "final_metrics"))
            (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    valid, test = D.broadcast_object((valid, test), info)
    return TrainResult(model, history, best_epoch, best_metric, valid, test, out_dir)


def load_trained(checkpoint: str | pathlib.Path, data) -> tuple[MIND, TrainConfig]:
    """Rebuild the model from ``best.pt`` / ``last.pt`` (needs the data's item genres only for shape)."""
    state = load_checkpoint(checkpoint, required=("model", "config"))
    config = TrainConfig.from_dict(state["config"])
    model = build_model(data, config)
    model.load_state_dict(state["model"])
    return model.eval(), config
