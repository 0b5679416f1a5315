"""Train MIND on a :class:`mind.data.PreparedData`: AdamW, early stopping, checkpoints, resume.

One epoch = one pass over the (history, next item) training samples in a seeded random
order.  After each epoch the model is evaluated on the validation split (Recall, HitRate,
NDCG @20 and @50 with full-catalogue retrieval, :func:`mind.evaluate.evaluate_model`);
training stops when valid recall@50 has not improved for ``patience`` epochs, and the best
epoch's weights are evaluated on test.

Retrieval excludes every item of the user's full known history (``full_histories``):
MovieLens users rate an item at most once, so a seen item can never be a target and
leaving seen items in would only spend slots of the top-N list.

A step (:func:`training_loss`): with the exact softmax the item table is embedded once and
the histories and targets are rows of it; the histories are routed jagged (values + offsets)
when at most half of their slots hold an item (:func:`routes_jagged`); the exact softmax of
the default recipe runs fused (:mod:`mind.loss`), its score products in bf16 on CPUs that
multiply bf16 natively; AdamW steps fused.  Each of these won its measurement
(docs/results/training-speed.md), so each is the only path.

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
  per step, so one optimizer step sees the same number of samples as a single-process run.
* Randomness: the sampled-softmax negatives and the training routing logits b0 come from the
  global torch RNG, re-seeded at the start of every epoch from (seed, epoch, rank), so each
  rank draws its own negatives and a resumed run draws exactly what the uninterrupted one would.
* ``loss="in_batch"`` takes its negatives from the rank's own sub-batch.
* Rank 0 alone evaluates, writes metrics, plots, the split and the checkpoints; it
  broadcasts each epoch's row so every rank takes the same early-stopping decision.  At the
  end the ranks check that their parameters agree (a checksum) and raise if they do not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import pathlib
import platform
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import (CheckpointError, get_rng_state, load_checkpoint, save_checkpoint,
                         seed_everything, set_rng_state)
from .config import CONFIG_FORMAT, TrainConfig
from .evaluate import evaluate_model, write_metrics
from .loss import SoftmaxLoss, auto_product_dtype, interest_similarity_penalty
from .model import MIND, label_aware_attention

__all__ = ["TrainConfig", "TrainResult", "build_model", "build_loss", "build_optimizer", "training_loss",
           "train", "load_trained"]

#: config fields that change the model or the optimisation; a resumed run must match them.
_RESUME_MUST_MATCH = ("dim", "num_interests", "num_iters", "max_len", "recipe", "lr", "weight_decay", "batch_size",
                      "num_negatives", "loss", "seed", "dynamic_interests", "user_feature_dim", "hidden_mult",
                      "softmax_over", "diversity_lambda", "table_optimizer", "table_lr", "sharded_embeddings")

#: "auto" takes the exact softmax up to this many items: the fused loss streams the scores, and on
#: MovieLens-100k the exact softmax beat the sampled one for K = 1 and K = 4 (docs/tried-and-lost.md).
FULL_SOFTMAX_MAX_ITEMS = 20_000

#: histories are routed jagged when at most this share of their slots holds an item.  Measured
#: (one process, alternated, 1 thread, ML-100k): max_len 50 (81% filled) jagged/padded step
#: 0.99x, max_len 200 (45% filled) 1.10x (docs/results/training-speed.md).
JAGGED_MAX_FILL = 0.5


@dataclasses.dataclass
class TrainResult:
    model: MIND
    history: list
    best_epoch: int
    best_metric: float
    valid_metrics: dict
    test_metrics: dict
    out_dir: pathlib.Path


def build_model(data, config: TrainConfig) -> MIND:
    """A fresh MIND sized for ``data`` (items, genres, user features) and ``config``."""
    return MIND(
        num_items=int(data.num_items), item_genres=torch.as_tensor(np.asarray(data.item_genres), dtype=torch.long),
        num_genres=len(data.genre_names), user_feature_cardinalities=list(data.user_feature_cardinalities),
        dim=config.dim, num_interests=config.num_interests, num_iters=config.num_iters,
        user_feature_dim=config.user_feature_dim, hidden_mult=config.hidden_mult,
        dynamic_interests=config.dynamic_interests, backend=config.backend,
        softmax_over=config.softmax_over, h_out_activation=config.h_out_activation)


def resolve_loss(kind: str, num_items: int) -> str:
    """The softmax estimator a config's ``loss`` means for a catalogue of ``num_items``."""
    if kind == "auto":
        return "full" if num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"
    return kind


def build_loss(data, config: TrainConfig, device=None) -> SoftmaxLoss:
    """The training objective of ``config`` for ``data`` (``device``: where the model trains, None = CPU)."""
    return SoftmaxLoss(resolve_loss(config.loss, int(data.num_items)), np.asarray(data.item_counts),
                       config.num_negatives, config.scoring, product_dtype=auto_product_dtype(device))


def build_optimizer(model: torch.nn.Module, config: TrainConfig):
    """AdamW over every parameter, fused (one kernel over all parameters on CPU and CUDA; the same update
    as the per-parameter loop up to float rounding).  With an Adagrad table (``config.table_adagrad``)
    the item-id table gets ``torch.optim.Adagrad`` (``table_lr``, eps :data:`mind.sharded.ADAGRAD_EPS`,
    the update a sharded table gets) and AdamW the rest: a :class:`TableAndDenseOptimizer`."""
    table = [model.item_id_embedding.weight] if config.table_adagrad else []
    params = [p for p in model.parameters() if not any(p is t for t in table)]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    dense = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    if not table:
        return dense
    from .sharded import ADAGRAD_EPS

    return TableAndDenseOptimizer(dense, torch.optim.Adagrad(table, lr=config.table_lr, eps=ADAGRAD_EPS))


class TableAndDenseOptimizer:
    """AdamW on the dense parameters and Adagrad on the item-id table, stepped together."""

    def __init__(self, dense: torch.optim.Optimizer, table: torch.optim.Optimizer):
        self.dense, self.table = dense, table

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.table.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.table.step()

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "table": self.table.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])
        self.table.load_state_dict(state["table"])


#: glibc mallopt settings for training, {parameter: bytes}: -3 = M_MMAP_THRESHOLD, -1 = M_TRIM_THRESHOLD.
MALLOC_SETTINGS = {-3: 32 << 20, -1: 64 << 20}


def tune_malloc() -> bool:
    """glibc: serve blocks up to 32 MiB from the heap (``M_MMAP_THRESHOLD``, the most glibc allows) and
    trim the heap top only past 64 MiB free (``M_TRIM_THRESHOLD``), so a step's temporaries (the batch
    cut from the CSR sequences, an item table's gradient and optimizer temporaries: 17 MB at 65k items)
    reuse pages instead of being mapped, faulted in and unmapped every step.  glibc's own dynamic
    threshold starts at 128 KiB and lags; setting M_TOP_PAD alone (an earlier fix) froze it there, which
    made an epoch on a 65k-item log 1.6x slower than 8b87692's (docs/results/training-speed.md).
    Process-wide; elsewhere a no-op (False)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        return all([mallopt(k, v) == 1 for k, v in MALLOC_SETTINGS.items()])
    except (OSError, AttributeError):
        return False


def routes_jagged(data, max_len: int) -> tuple[bool, float]:
    """(route the training batches jagged?, share of the (examples, max_len) history slots holding an item).

    Example t's window holds min(t, max_len) items, so the share comes from the positions alone.
    """
    positions = np.asarray(data.train_positions)
    if not len(positions):
        return False, 1.0
    fill = float(np.minimum(positions, max_len).mean()) / max_len
    return fill <= JAGGED_MAX_FILL, fill


def training_loss(net, model: MIND, loss_fn: SoftmaxLoss, config: TrainConfig, hist, feats, tgt,
                  jagged: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One batch's loss: the softmax objective (+ lambda * the mean pairwise interest cosine).

    ``net`` is the model or its DDP wrapper (called for the forward, so DDP's hooks run);
    ``model`` the bare MIND (item embeddings).  ``jagged``: route the histories' real
    behaviours only (:meth:`MIND.interests`; the value of :func:`routes_jagged`).

    With the exact softmax the whole item table is embedded once and the histories and
    targets are rows of it (the same values as embedding them apart, one genre pooling
    instead of two, and no data-dependent ``torch.unique``).  Without dynamic interests every
    interest is active, so no mask is applied at all.  ``generator`` draws the sampled softmax's
    negatives (None: the global generator).

    A sharded item table (:mod:`mind.sharded`) is looked up once per step: every id the step needs
    (histories, targets, and the negatives, drawn ahead from a copy of ``generator``) is prefetched.
    """
    table = model.item_embeddings() if loss_fn.needs_item_table() else None
    prefetch = getattr(model.item_id_embedding, "prefetch", None)
    if prefetch is None or table is not None:
        return _training_loss(net, model, loss_fn, config, hist, feats, tgt, jagged, generator, table)
    needed = [hist, tgt]
    if loss_fn.kind == "sampled":
        if generator is None:       # the forward draws from the global generator before the loss would
            raise ValueError("training_loss: a sharded item table needs the negatives' own generator")
        ahead = torch.Generator().manual_seed(0)
        ahead.set_state(generator.get_state())
        needed.append(loss_fn.sampler.sample(loss_fn.num_negatives, generator=ahead, device=tgt.device))
    prefetch(*needed)
    try:
        return _training_loss(net, model, loss_fn, config, hist, feats, tgt, jagged, generator, table)
    finally:
        model.item_id_embedding.end_step()


def _training_loss(net, model, loss_fn, config, hist, feats, tgt, jagged, generator, table) -> torch.Tensor:
    vectors, interest_mask = net(hist, feats, item_table=table, jagged=jagged)
    mask = interest_mask if model.dynamic_interests else None
    if config.scoring == "max":
        loss = loss_fn((vectors, mask), model, tgt, generator=generator, item_table=table)
    else:
        target_emb = model.embed_items(tgt) if table is None else table[tgt]
        user = label_aware_attention(vectors, target_emb, mask, config.attention_p)
        loss = loss_fn(user, model, tgt, generator=generator, item_table=table)
    if config.diversity_lambda > 0:
        loss = loss + config.diversity_lambda * interest_similarity_penalty(vectors, mask)
    return loss


# ----------------------------------------------------------------------------- the steps of train()


@dataclasses.dataclass
class _Progress:
    """Where a run stands between epochs (restored by resume)."""

    start_epoch: int = 1
    history: list = dataclasses.field(default_factory=list)
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0


def _check_resumable(saved: dict, config: TrainConfig, path) -> None:
    diffs = {k: (saved.get(k), getattr(config, k)) for k in _RESUME_MUST_MATCH
             if k in saved and saved.get(k) != getattr(config, k)}
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written with a different config; "
                              f"differences (saved, requested): {diffs}")


@dataclasses.dataclass
class _Local:
    """The model and optimizer of a single-process or DDP run, behind the state accessors that
    :class:`mind.sharded.ShardedTraining` has for a sharded one (there they are collectives)."""

    model: MIND
    optimizer: object

    def plain_state(self) -> dict:
        return self.model.state_dict()

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load(self, model_state: dict, optimizer_state: Optional[dict] = None) -> None:
        self.model.load_state_dict(model_state)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)


def _eval_model(run, data, config: TrainConfig) -> Optional[MIND]:
    """The model rank 0 evaluates: the training model itself, or for a sharded run a single-process
    copy with the table gathered (a collective; None on the other ranks)."""
    if isinstance(run, _Local):
        return run.model
    state = run.plain_state()
    if state is None:
        return None
    with torch.random.fork_rng():          # building it must not move the training's random stream
        model = build_model(data, config)
    model.load_state_dict(state)
    return model


def _resume(path: pathlib.Path, run, config: TrainConfig) -> _Progress:
    state = load_checkpoint(path, required=("model", "optimizer", "epoch", "rng", "config",
                                            "best_metric", "best_epoch", "bad_epochs", "history"))
    if state.get("config_format") != CONFIG_FORMAT:
        raise CheckpointError(f"checkpoint {path} was written by an earlier mind-kernels (config format 1, "
                              f"before training recipes): evaluate and export still read it, but resuming "
                              f"needs the version that wrote it")
    _check_resumable(state["config"], config, path)
    run.load(state["model"], state["optimizer"])
    set_rng_state(state["rng"])
    return _Progress(int(state["epoch"]) + 1, list(state["history"]), float(state["best_metric"]),
                     int(state["best_epoch"]), int(state["bad_epochs"]))


def _train_epoch(net, model, loss_fn, optimizer, config, data, epoch: int, info, jagged: bool,
                 step_batch: int) -> float:
    """One pass over this rank's shard of a (seed, epoch) permutation; the mean batch loss over all ranks.

    Each batch's history windows are cut from the CSR sequences (:meth:`PreparedData.batch`).
    """
    model.train()
    order = torch.randperm(data.num_examples, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    if info.enabled:
        order = D.shard(order, info)
        # per-rank negatives and b0, reproducible from (seed, epoch, rank) alone (see module doc)
        torch.manual_seed((config.seed * 100_003 + epoch) * 1_009 + info.rank)
    dev = info.device if info.enabled else None
    # the sampled softmax's negatives, from their own generator (per epoch and rank), so that a sharded
    # table can draw them ahead of the step (training_loss) without moving the global random stream
    negatives = torch.Generator().manual_seed((config.seed * 100_003 + epoch) * 1_009 + info.rank)
    total, batches = 0.0, 0
    bar = tqdm(range(0, order.shape[0], step_batch), desc=f"epoch {epoch}/{config.epochs}",
               disable=not (config.progress and info.is_main), leave=False)
    for s in bar:
        hist, tgt, rows = data.batch(order[s:s + step_batch].numpy(), config.max_len)
        feats = data.user_features[rows]
        if dev is not None:
            hist, tgt, feats = hist.to(dev), tgt.to(dev), feats.to(dev)
        loss = training_loss(net, model, loss_fn, config, hist, feats, tgt, jagged=jagged, generator=negatives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        batches += 1
        if batches % 20 == 0:
            bar.set_postfix(loss=f"{total / batches:.4f}")
    mean = total / max(batches, 1)
    if info.enabled:  # averaged over ranks (equal batch counts)
        t = torch.tensor([mean], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(t)
        mean = float(t) / info.world_size
    return mean


def _save_epoch(out_dir: pathlib.Path, run, model_config: dict, config, epoch: int, progress: _Progress,
                improved: bool, main: bool) -> None:
    """best.pt when the epoch improved, last.pt always, then the run's metrics and plot (rank 0 writes;
    every rank calls it, since a sharded run gathers its table here)."""
    model_state, optimizer_state = run.plain_state(), run.optimizer_state()
    if not main:
        return
    common = {"model": model_state, "epoch": epoch, "model_config": model_config,
              "config": config.to_dict(), "config_format": CONFIG_FORMAT}
    if improved:
        save_checkpoint({**common, "metric": progress.best_metric}, out_dir / "best.pt")
    save_checkpoint({**common, "optimizer": optimizer_state, "rng": get_rng_state(),
                     "best_metric": progress.best_metric, "best_epoch": progress.best_epoch,
                     "bad_epochs": progress.bad_epochs, "history": progress.history}, out_dir / "last.pt")
    if config.write_files:
        from .plots import plot_learning_curves

        write_metrics(progress.history, str(out_dir / "metrics"))
        plot_learning_curves(progress.history, out_dir / "learning_curves.png")


def _final_evaluation(model, data, config, out_dir: pathlib.Path, best_epoch: int) -> tuple[dict, dict]:
    """Valid and test metrics of the best epoch's weights (rank 0), written to final_metrics.*."""
    ns = tuple(config.eval_ns)
    valid = evaluate_model(model, data, data.valid, ns, config.eval_batch_size)
    test = evaluate_model(model, data, data.test, ns, config.eval_batch_size)
    if config.write_files:
        rows = [{"split": "valid", "epoch": best_epoch, **valid}, {"split": "test", "epoch": best_epoch, **test}]
        write_metrics(rows, str(out_dir / "final_metrics"))
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return valid, test


def train(data, config: TrainConfig, resume: bool = False, log=print,
          dist: Optional[D.DistInfo] = None) -> TrainResult:
    """Train (or resume) a MIND model on ``data``; return the best model and its valid/test metrics.

    ``resume=True`` continues from ``out_dir/last.pt`` and raises CheckpointError if that
    file is missing, corrupt, or was written with a different model/optimisation config.

    ``dist``: the process group from :func:`mind.distributed.setup` for a multi-process run
    (see the module docstring); None = single process.  Every rank returns the same
    TrainResult (metrics broadcast from rank 0); ``log`` is called on rank 0 only.  With
    ``config.sharded_embeddings`` only rank 0's result holds the model (the table gathered there);
    the other ranks' ``model`` is None.
    """
    info = dist or D.SINGLE
    main = info.is_main
    if not main:
        log = lambda *_a, **_k: None  # noqa: E731
    out_dir = pathlib.Path(config.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    key = f"valid_recall@{max(config.eval_ns)}"

    # 1. the model, its optimizer and objective (or the state of an interrupted run)
    tune_malloc()
    seed_everything(config.seed)
    device = info.device if info.enabled else None
    model = build_model(data, config)
    if device is not None:
        model = model.to(device)
    if config.sharded_embeddings:
        from .sharded import shard_model

        with torch.random.fork_rng():                  # sharding must not move the random stream
            run = shard_model(model, config, info)      # the item table now lives in shards
        model, optimizer = run.model, run.dense_optimizer
        log(f"sharded item table: TorchRec over {run.world_size} rank(s), exact Adagrad (lr {config.table_lr}); "
            f"plan:\n{run.plan}")
    else:
        run = _Local(model, build_optimizer(model, config))
        optimizer = run.optimizer
    loss_fn = build_loss(data, config, device)
    progress = _Progress()
    if resume:
        progress = _resume(out_dir / "last.pt", run, config)
        log(f"resumed from {out_dir / 'last.pt'} after epoch {progress.start_epoch - 1} (best {key} "
            f"{progress.best_metric:.4f} at epoch {progress.best_epoch})")
    elif config.write_files and main:
        from .data import save_split
        save_split(data, str(out_dir / "split.json"))
    if loss_fn.product_dtype is not None:
        log("score products in bfloat16 (this CPU multiplies bf16 natively)")

    # 2. the data, and DDP (after loading: its constructor broadcasts rank 0's parameters and buffers)
    jagged, fill = routes_jagged(data, config.max_len)
    log(f"jagged histories: {'on' if jagged else 'off'} ({fill:.0%} of the history slots hold an item; "
        f"on at <= {JAGGED_MAX_FILL:.0%})")
    net = model
    if config.sharded_embeddings:
        net = run.dmp           # DMP: the sharded table, and DDP around the dense part
    elif info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[info.local_rank] if info.backend == "nccl" else None)
        log(f"distributed: {info.world_size} processes ({info.backend}), global batch {config.batch_size} = "
            f"{info.world_size} x {D.per_rank_batch(config.batch_size, info)} per rank")
    step_batch = D.per_rank_batch(config.batch_size, info)

    # 3. epochs with early stopping on valid recall
    for epoch in range(progress.start_epoch, config.epochs + 1):
        if progress.bad_epochs >= config.patience:
            log(f"early stopping after epoch {epoch - 1} of {config.epochs}: {key} has not improved for "
                f"{progress.bad_epochs} epoch(s) (patience {config.patience}); best epoch {progress.best_epoch} "
                f"({progress.best_metric:.4f})")
            break
        t0 = time.time()
        train_loss = _train_epoch(net, model, loss_fn, optimizer, config, data, epoch, info, jagged, step_batch)
        row = improved = None
        eval_model = _eval_model(run, data, config)
        if main:
            valid = evaluate_model(eval_model, data, data.valid, config.eval_ns, config.eval_batch_size)
            row = {"epoch": epoch, "train_loss": train_loss,
                   **{f"valid_{k}": v for k, v in valid.items()}, "seconds": time.time() - t0}
            improved = row[key] > progress.best_metric
        row, improved = D.broadcast_object((row, improved), info)
        progress.history.append(row)
        if improved:
            progress.best_metric, progress.best_epoch, progress.bad_epochs = row[key], epoch, 0
        else:
            progress.bad_epochs += 1
        _save_epoch(out_dir, run, model.config, config, epoch, progress, improved, main)
        log(f"epoch {epoch}: loss {row['train_loss']:.4f}  {key} {row[key]:.4f}"
            f"{'  (best)' if improved else ''}  [{row['seconds']:.1f}s]")
        D.barrier(info)  # checkpoints are on disk before any rank moves on

    # 4. the replicas agree; the best epoch's weights on valid and test
    if info.enabled:
        mine = run.dense_checksum() if config.sharded_embeddings else D.params_checksum(model)
        sums = D.all_gather_object(mine, info)
        if len(set(sums)) != 1:
            raise RuntimeError(f"distributed replicas disagree after training: parameter checksums {sums}")
        log(f"distributed: the {info.world_size} replicas agree (parameter checksum {sums[0]:.6f})")
    model = _eval_model(run, data, config)
    if model is not None:
        model = model.cpu()
        if progress.best_epoch > 0:
            model.load_state_dict(load_checkpoint(out_dir / "best.pt", required=("model",))["model"])
        model.eval()
    valid = test = None
    if main:
        valid, test = _final_evaluation(model, data, config, out_dir, progress.best_epoch)
    valid, test = D.broadcast_object((valid, test), info)
    return TrainResult(model, progress.history, progress.best_epoch, progress.best_metric, valid, test, out_dir)


def load_trained(checkpoint: str | pathlib.Path, data=None) -> tuple[MIND, dict]:
    """The model of a ``best.pt`` / ``last.pt`` in eval mode, and the checkpoint's saved config dict.

    The model is rebuilt from the checkpoint's own ``model_config``, so checkpoints of earlier
    versions load too; ``data`` is not needed (kept for callers that pass it).  A missing or
    corrupt file, or weights that do not fit their config, raise CheckpointError naming the file.
    """
    state = load_checkpoint(checkpoint, required=("model", "config", "model_config"))
    try:
        model = MIND.from_config(state["model_config"])
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        fmt = state.get("config_format", 1)
        raise CheckpointError(f"checkpoint {checkpoint} (config format {fmt}) does not rebuild a MIND model of "
                              f"this version: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return model.eval(), dict(state["config"])
