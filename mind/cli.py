"""``python -m mind``: train, evaluate, export, recommend, explain, quality.

Typical session::

    python -m mind train --data ml-100k --out runs/mind          # fetch MovieLens-100k, train, test
    python -m mind export --checkpoint runs/mind/best.pt --out runs/mind/model
    python -m mind export --checkpoint runs/mind/best.pt --out runs/mind/onnx --to onnx   # or --to aoti
    python -m mind recommend --model runs/mind/model --history 50,172,181 -n 10
    python -m mind explain --model runs/mind/model --history 50,172,181,1,121,9
    python -m mind quality --out runs/quality                      # the MostPopular / K=1 / K=4 table
    python -m mind sweep --out runs/sweep                          # choose the recipe on valid, test once

Multi-process training: run ``train`` under torchrun, e.g.
``torchrun --nproc_per_node 4 -m mind train --data ml-100k --out runs/ddp`` (gloo on CPUs, NCCL
on GPUs; ``--batch-size`` is the global batch, split evenly over the processes; rank 0 writes
every file and prints; see mind/train.py).

Errors: a user's mistake never shows a traceback. A missing, truncated or corrupt checkpoint
or model folder, a missing or malformed data file, or a bad argument prints
``error: <message naming the file and the problem>`` on stderr and exits with status 2.
Checkpoints and exports always load with weights_only=True.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

DATA_HELP = ("dataset: 'ml-100k' (downloads MovieLens-100k once into ~/.cache/mind-kernels), "
             "'synthetic' (planted-interest toy data), 'planted' (the hard planted-interest control: "
             "many overlapping clusters, far-apart interests, no cluster genre; K=4 must beat K=1), "
             "or 'dir' with --data-dir and --format")


class UsageError(ValueError):
    """A bad combination of command-line arguments; main prints ``error: <message>`` and exits 2."""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="ml-100k", choices=["ml-100k", "synthetic", "planted", "dir"], help=DATA_HELP)
    g.add_argument("--data-dir", help="folder (or .csv file for comirec) with your own data; implies --data dir")
    g.add_argument("--format", default="recbole", choices=["recbole", "movielens", "comirec"],
                   help="format of --data-dir: RecBole atomic files (.inter/.item/.user), raw MovieLens "
                        "(u.data / ratings.dat), or a ComiRec csv (user,item,category,timestamp)")
    g.add_argument("--max-len", type=int, default=20, help="history length fed to the model (default 20)")
    g.add_argument("--split-seed", type=int, default=2020, help="seed of the 8:1:1 user split (default 2020)")
    g.add_argument("--synthetic-users", type=int, default=300, help="users of --data synthetic (default 300)")
    g.add_argument("--synthetic-items", type=int, default=400, help="items of --data synthetic (default 400)")
    g.add_argument("--planted-users", type=int, default=4000, help="users of --data planted (default 4000)")
    g.add_argument("--planted-items", type=int, default=2048, help="items of --data planted (default 2048)")
    g.add_argument("--planted-clusters", type=int, default=128,
                   help="clusters of --data planted, on a 3-d latent sphere (default 128; use --dim 16 << clusters)")
    g.add_argument("--planted-kappa", type=float, default=float("inf"),
                   help="spill-over of an interest onto nearby clusters, P ~ exp(kappa cos) (default inf: none)")
    g.add_argument("--planted-seed", type=int, default=0, help="seed of the --data planted generator (default 0)")


def load_data(args):
    """RawData -> PreparedData from the data arguments."""
    from . import data as D

    kind = "dir" if args.data_dir else args.data
    if kind == "ml-100k":
        raw = D.load_recbole(D.fetch_movielens_100k())
    elif kind == "synthetic":
        raw, _ = D.make_synthetic(num_users=getattr(args, "synthetic_users", 300),
                                  num_items=getattr(args, "synthetic_items", 400))
    elif kind == "planted":
        raw, _ = D.make_planted(num_users=args.planted_users, num_items=args.planted_items,
                                num_clusters=args.planted_clusters, kappa=args.planted_kappa,
                                seed=args.planted_seed)
    else:
        if not args.data_dir:
            raise UsageError("--data dir needs --data-dir PATH (a folder, or a .csv file for --format comirec)")
        loader = {"recbole": D.load_recbole, "movielens": D.load_movielens_raw,
                  "comirec": D.load_comirec_csv}[args.format]
        raw = loader(args.data_dir)
    return D.prepare(raw, max_len=args.max_len, seed=args.split_seed)


def _threads(n: int) -> None:
    import torch
    torch.set_num_threads(max(1, n))


def _fmt_metrics(rows: list[tuple[str, dict]], ns=(20, 50)) -> str:
    names = [f"{m}@{n}" for n in ns for m in ("recall", "hit_rate", "ndcg")]
    out = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, m in rows:
        out.append(f"| {label} | " + " | ".join(f"{m[k]:.4f} ± {m[k + '_se']:.4f}" for k in names) + " |")
    n = max(ns)
    beside = [("interest cosine", "interest_cosine"), (f"diversity@{n}", f"diversity@{n}"),
              (f"coverage@{n}", f"coverage@{n}"), (f"recall@{n}, top genre-entropy tercile", f"recall@{n}_entropy_high")]
    for label, m in rows:   # mind/diversity.py's measures; None where they do not apply (one interest)
        cells = [f"{name} {'n/a' if m.get(key) is None else format(m[key], '.3f')}" for name, key in beside]
        out.append(f"{label}: " + ", ".join(cells))
    return "\n".join(out)


def cmd_train(args) -> int:
    from . import distributed as D

    info = D.setup()
    try:
        code = _train(args, info)
        # Leave together: a rank that tears its process group down while rank 0 is still
        # printing can make rank 0's gloo threads abort at exit (seen once in CI: SIGABRT,
        # "terminate called without an active exception").
        D.barrier(info)
        return code
    finally:
        D.teardown(info)


def _train(args, info) -> int:
    from . import distributed as D
    from .train import TrainConfig, train

    if args.hard_negative_beta > 0 and args.loss != "sampled":
        print(f"error: --hard-negative-beta reweights sampled negatives; it needs --loss sampled, not {args.loss}",
              file=sys.stderr)
        return 2
    _threads(args.threads)
    if not info.is_main:
        D.barrier(info)        # rank 0 loads first (it may download and cache the dataset)
    data = load_data(args)
    if info.is_main:
        D.barrier(info)
    say = print if info.is_main else (lambda *a, **k: None)
    say(f"data: {json.dumps(data.summary())}")
    cfg = TrainConfig(dim=args.dim, num_interests=args.interests, max_len=args.max_len, p=args.p, lr=args.lr,
                      weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
                      num_negatives=args.negatives, loss=args.loss, patience=args.patience, seed=args.seed,
                      dynamic_interests=args.dynamic_interests, backend=args.backend, out_dir=args.out,
                      softmax_over=args.routing_axis, routing_init_std=args.routing_init_std,
                      logit_scale=args.logit_scale, h_out_activation=args.h_out, scoring=args.scoring,
                      hard_negative_beta=args.hard_negative_beta, diversity_lambda=args.diversity_lambda,
                      stochastic_selection=args.stochastic_selection, target_window=args.target_window,
                      optimizer=args.optimizer, compile=args.compile, jagged=args.jagged, score_dtype=args.score_dtype,
                      keep_freed_memory=args.keep_freed_memory, item_table=args.item_table, pad_items=args.pad_items,
                      split_h=args.split_h, genre_matmul=args.genre_matmul, fused_loss=args.fused_loss,
                      h_dtype=args.h_dtype, gather_index_add=args.gather == "index_add",
                      progress=not args.no_progress)
    result = train(data, cfg, resume=args.resume, dist=info)
    if not info.is_main:
        return 0
    print(f"\nbest epoch {result.best_epoch} (valid recall@50 {result.best_metric:.4f}); mean ± s.e. over users:")
    print(_fmt_metrics([("valid", result.valid_metrics), ("test", result.test_metrics)]))
    out = result.out_dir
    print(f"\nresults: {out}/final_metrics.csv, per-epoch {out}/metrics.csv, curves {out}/learning_curves.png")
    print(f"checkpoints: {out}/best.pt (best epoch), {out}/last.pt (resume with --resume)")
    print(f"next: python -m mind export --checkpoint {out}/best.pt --out {out}/model")
    return 0


def _model_from_checkpoint(args):
    from .checkpoint import CheckpointError, load_checkpoint
    from .train import TrainConfig, build_model

    state = load_checkpoint(args.checkpoint, required=("model", "config"))
    cfg = TrainConfig.from_dict(state["config"])
    args.max_len = cfg.max_len
    data = load_data(args)
    model = build_model(data, cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:  # shapes of another catalogue: the data options differ from training's
        raise CheckpointError(f"checkpoint {args.checkpoint} does not fit this data ({data.num_items} items): pass "
                              f"the data options it was trained with") from None
    return model.eval(), data, cfg


def cmd_evaluate(args) -> int:
    from .evaluate import write_metrics
    from .train import evaluate_model

    _threads(args.threads)
    model, data, cfg = _model_from_checkpoint(args)
    valid = evaluate_model(model, data, data.valid, cfg.eval_ns)
    test = evaluate_model(model, data, data.test, cfg.eval_ns)
    print(_fmt_metrics([("valid", valid), ("test", test)], cfg.eval_ns))
    if args.out:
        paths = write_metrics([{"split": "valid", **valid}, {"split": "test", **test}], args.out)
        print(f"written: {paths[0]}, {paths[1]}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    if args.to == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--to onnx needs the packages onnx and onnxscript ({e}); "
                             f"pip install onnx onnxscript onnxruntime") from None
    model, data, _ = _model_from_checkpoint(args)
    path = export(model, data, args.out, to=args.to, index=args.index, threads=args.threads)
    print(f"exported {data.num_items} items and the {args.to} user tower to {path}")
    print(f"try: python -m mind recommend --model {path} --history {','.join(str(x) for x in data.item_raw_ids[1:4])}")
    return 0


def _history(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_recommend(args) -> int:
    from .serve import load

    rec = load(args.model)
    try:
        items = rec.recommend(_history(args.history), n=args.n, exclude_history=not args.include_history)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for rank, (raw, title, score) in enumerate(items, 1):
        print(f"{rank:3d}. [{raw}] {title}  (score {score:.3f})")
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    from .serve import load

    rec = load(args.model)
    png = args.png if args.png is not None else pathlib.Path(args.model) / "explain.png"
    try:
        out = explain(rec, _history(args.history), png=png, top_n=args.top)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out["text"])
    return 0


def cmd_quality(args) -> int:
    from .quality import run_quality

    _threads(args.threads)
    run_quality(out_dir=args.out, seeds=tuple(range(args.seeds)), epochs=args.epochs, progress=not args.no_progress)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    if args.seeds < 2 or not 1 <= args.screen_seeds <= args.seeds or args.finalists < 1 or args.jobs < 1:
        print("error: sweep needs --seeds >= 2, 1 <= --screen-seeds <= --seeds, --finalists >= 1 and --jobs >= 1",
              file=sys.stderr)
        return 2
    run_sweep(out_dir=args.out, screen_seeds=tuple(range(args.screen_seeds)), seeds=tuple(range(args.seeds)),
              finalists=args.finalists, jobs=args.jobs, threads=args.threads, max_cosine=args.max_cosine,
              progress=not args.no_progress)
    return 0


def _float_at_least(low: float, strict: bool):
    """argparse type: a finite float > low (strict) or >= low."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"want a finite number {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"want an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mind", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train MIND, evaluate on valid/test, write metrics, plots and checkpoints",
                       description="Train MIND with early stopping on valid recall@50, then evaluate the best "
                                   "epoch on test. Writes checkpoints, metrics (JSON/CSV) and learning curves "
                                   "into --out.")
    _add_data_args(p)
    g = p.add_argument_group("model and training")
    g.add_argument("--out", default="runs/mind", help="output folder (default runs/mind)")
    g.add_argument("--dim", type=int, default=64, help="embedding size d (default 64)")
    g.add_argument("--interests", type=int, default=4, help="number of interests K (default 4)")
    g.add_argument("--dynamic-interests", action="store_true", help="K'_u = max(1, min(K, log2 n_u)) per user")
    g.add_argument("--routing-axis", default="interests", choices=["interests", "behaviors"],
                   help="routing softmax axis: 'interests' (MIND, default) or 'behaviors' (ComiRec)")
    g.add_argument("--p", type=float, default=0.0,
                   help="label-aware attention power, with --scoring attention: 0 = mean of interests (default), "
                        "1/2 = softmax of (signed powers of) inner products, inf = hard argmax")
    g.add_argument("--routing-init-std", type=_float_at_least(0, strict=True), default=1.0,
                   help="sigma of the initial routing logits (default 1.0, the paper's; 0.1 lets the interests "
                        "collapse onto one)")
    g.add_argument("--logit-scale", type=_float_at_least(0, strict=True), default=1.0,
                   help="s of the routing update b += s * c . u (default 1; EasyRec uses 20)")
    g.add_argument("--h-out", default="linear", choices=["relu", "linear"],
                   help="activation of the last H layer (default linear; relu, the paper's, keeps every "
                        "interest in the non-negative orthant)")
    g.add_argument("--scoring", default="max", choices=["attention", "max"],
                   help="training logits: 'max' (default) = every item scored by its best interest, as serving "
                        "ranks; 'attention' = label-aware v_u (--p) for every item, the paper's")
    g.add_argument("--hard-negative-beta", type=_float_at_least(0, strict=False), default=0.0,
                   help="interest-aware hard negatives (REMI): reweight sampled negatives by "
                        "exp(beta * score) (default 0 = off; sampled loss only)")
    g.add_argument("--diversity-lambda", type=_float_at_least(0, strict=False), default=0.1,
                   help="add lambda * mean pairwise cosine of a user's interests to the loss (default 0.1)")
    g.add_argument("--stochastic-selection", action="store_true",
                   help="BaM: draw the target's interest from softmax(V e) instead of attention (training)")
    g.add_argument("--target-window", type=_positive_int, default=1,
                   help="train each step on an item drawn from the next W of the sequence instead of the "
                        "next one (default 1)")
    g.add_argument("--epochs", type=int, default=20, help="max epochs (default 20)")
    g.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (default 3)")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    g.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    g.add_argument("--loss", default="auto", choices=["auto", "sampled", "full", "in_batch"],
                   help="softmax estimator: auto (default) = the exact softmax up to 20,000 items, else "
                        "sampled (log-uniform negatives + logQ)")
    g.add_argument("--negatives", type=int, default=200, help="sampled negatives per batch (default 200)")
    g.add_argument("--seed", type=int, default=0, help="seed for everything (default 0)")
    g.add_argument("--backend", default="auto", help="routing backend: auto, reference, cpp, triton, cuda")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "rowwise"],
                   help="adamw (default) or rowwise: embedding tables updated on the rows a step touched only "
                        "(pays for large catalogues with --loss sampled)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (one graph; compiling takes tens of seconds on a CPU)")
    g.add_argument("--score-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the exact softmax's score products (--scoring max) in this dtype; auto (default): "
                        "bfloat16 on a CPU with AVX512-BF16 or AMX, else float32")
    g.add_argument("--jagged", default="auto", choices=["auto", "on", "off"],
                   help="route only each history's real items (values + offsets) instead of the padded batch; "
                        "auto (default): on when at most half the history slots hold an item, and not --compile")
    g.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=False,
                   help="CPU on glibc: keep freed heap memory in the process, so each step's big temporaries "
                        "are not mapped and faulted in anew (default off; the resident size stays at its peak)")
    g.add_argument("--item-table", default="loss", choices=["loss", "auto"],
                   help="loss (default): embed the whole item table once a step only for the exact softmax; "
                        "auto: also for the sampled / in-batch softmax when num_items + 1 <= batch x max_len")
    g.add_argument("--pad-items", type=int, default=16,
                   help="exact softmax: pad the scored items to a multiple of this (default 16; 1 = off)")
    g.add_argument("--h-dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the H layers' products in training (default float32; bfloat16 was 1.08x "
                        "faster per step but lowered valid recall; auto: bfloat16 where the CPU multiplies bf16 natively)")
    g.add_argument("--gather", default="index_add", choices=["index_add", "embedding"],
                   help="rows of the item table for the histories: index_select with an index_add_ backward "
                        "(default) or F.embedding")
    g.add_argument("--no-fused-loss", dest="fused_loss", action="store_false",
                   help="exact softmax with --scoring max: unfused score tensors + cross_entropy (default: "
                        "mind_kernels.best_interest_cross_entropy, loss and gradients in one pass per user)")
    g.add_argument("--no-split-h", dest="split_h", action="store_false",
                   help="first H layer on the concatenated [C_k ; p_u] (default: profile part once per user)")
    g.add_argument("--no-genre-matmul", dest="genre_matmul", action="store_false",
                   help="genre pooling by gather + mean (default: one matmul with the item-genre matrix)")
    g.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this small model trains fastest single-threaded)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on valid and test",
                       description="Recall/HitRate/NDCG @20,@50 of a checkpoint (best.pt or last.pt) on the valid "
                                   "and test users of the same data (pass the same data options as for training).")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train")
    p.add_argument("--out", help="write <out>.json and <out>.csv")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    _add_data_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a checkpoint for serving (item vectors, ids, titles, model)",
                       description="Write a serving folder: item embeddings, raw ids, titles, genres, a faiss index "
                                   "and the user tower that turns a history into interest vectors (native, "
                                   "AOTInductor or ONNX; see mind/export/). Use the training data options.")
    p.add_argument("--checkpoint", required=True, help="best.pt written by train")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--to", default="native", choices=["native", "aoti", "onnx"],
                   help="user-tower format: native (model.pt, served by this package; default), aoti "
                        "(AOTInductor .pt2: torch + mind_kernels only) or onnx (onnxruntime only); every "
                        "format also writes item_embeddings.npy, items.json and a faiss index items.faiss")
    p.add_argument("--index", default="exact", choices=["exact", "ivf", "hnsw"],
                   help="kind of the faiss index items.faiss (mind.ann; default exact)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="--to aoti: threads compiled into the package's kernels (default: torch's)")
    _add_data_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recommend", help="top-n items for a history of raw item ids",
                       description="Recommend for a comma-separated history of raw item ids (oldest first). "
                                   "Unknown ids are dropped with a warning; seen items are excluded.")
    p.add_argument("--model", required=True, help="folder written by export")
    p.add_argument("--history", required=True, help="raw item ids, oldest first, e.g. 50,172,181")
    p.add_argument("-n", type=int, default=20, help="how many items (default 20)")
    p.add_argument("--include-history", action="store_true", help="allow items of the history in the list")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("explain", help="show which history items formed each interest",
                       description="For a history, print each interest with the items routed to it (argmax of "
                                   "the coupling weights), their genres and the interest's own top items; "
                                   "save a heatmap of the coupling weights.")
    p.add_argument("--model", required=True, help="folder written by export")
    p.add_argument("--history", required=True, help="raw item ids, oldest first")
    p.add_argument("--png", default=None, help="heatmap path (default <model>/explain.png)")
    p.add_argument("--top", type=int, default=5, help="recommendations shown per interest (default 5)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("quality", help="MostPopular vs MIND K=1 vs MIND K=4 on MovieLens-100k",
                       description="Train MIND K=1 and K=4 with several seeds on MovieLens-100k and compare with "
                                   "MostPopular on valid and test; writes quality.md/.csv/.json into --out.")
    p.add_argument("--out", default="runs/quality", help="output folder (default runs/quality)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs per run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("sweep", help="choose the training recipe (K=1 and K=4) on valid, report test once",
                       description="Screen every candidate recipe of mind/sweep.py on MovieLens-100k valid, retrain "
                                   "the best per group (K=1, K>1) with more seeds, choose on valid only and read test "
                                   "for the two chosen recipes; writes sweep.md/.json/.png into --out.")
    p.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    p.add_argument("--screen-seeds", type=int, default=1, help="seeds per candidate in the screen (default 1)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per finalist (default 5)")
    p.add_argument("--finalists", type=int, default=2, help="finalists per group (default 2)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--max-cosine", type=float, default=0.8,
                   help="a K>1 recipe is a finalist only if its valid interest cosine is at most this (default 0.8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """The CLI shows a warning (e.g. unknown item ids dropped) as one ``warning: ...`` line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _os_error(e: OSError) -> str:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e)
    return f"{where}: {what}" if where else what


def main(argv=None) -> int:
    """Run one verb; a user's mistake (bad path, file, format or argument) is ``error: ...`` + exit 2."""
    import warnings

    from .checkpoint import CheckpointError
    from .data.loaders import DataFormatError, DataNotFoundError
    from .serve import ModelFormatError

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            if getattr(args, "p", None) is not None and math.isnan(args.p):
                raise UsageError("--p must be a number or inf")
            if getattr(args, "jagged", None) == "on" and getattr(args, "compile", False):
                raise UsageError("--jagged on cannot be compiled (the jagged gather has a data-dependent size); "
                                 "drop --compile, or use --jagged auto/off")
            return int(args.func(args) or 0)
        except (CheckpointError, DataFormatError, DataNotFoundError, ModelFormatError, UsageError) as e:
            # never a traceback (nor a silent fresh start) for a bad file: say which file and why
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # an --out that is a file, a folder without write permission, a full disk
            print(f"error: {_os_error(e)}", file=sys.stderr)
            return 2
