"""``python -m mind``: prepare, train, evaluate, export, recommend, explain, quality, frontier, serve.

Typical session::

    python -m mind train --data ml-100k --out runs/mind          # fetch MovieLens-100k, train, test
    python -m mind prepare --data-dir LOG --format parquet --out runs/prep   # a large log, once; then
    python -m mind train --data-dir runs/prep --out runs/big      # memory-maps the prepared arrays
    python -m mind export --checkpoint runs/mind/best.pt --out runs/mind/model
    python -m mind export --checkpoint runs/mind/best.pt --out runs/mind/onnx --to onnx   # or --to aoti
    python -m mind recommend --model runs/mind/model --history 50,172,181 -n 10
    python -m mind explain --model runs/mind/model --history 50,172,181,1,121,9
    python -m mind quality --out runs/quality                      # the MostPopular / K=1 / K=4 table
    python -m mind serve --model runs/mind/model --port 8000       # HTTP: /recommend, /metrics, / (mind/service/)
    python -m mind recommend --model runs/mind/model --history 50,172,181 --merge diverse --diversity 0.1
    python -m mind frontier --runs runs/frontier --out runs/frontier/out   # Recall vs Diversity, K=4 vs K=1

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
import pathlib
import sys
import time

from .config import add_config_arguments

DATA_HELP = ("dataset: 'ml-100k' (downloads MovieLens-100k once into ~/.cache/mind-kernels), "
             "'synthetic' (planted-interest toy data), 'planted' (the hard planted-interest control: "
             "many overlapping clusters, far-apart interests, no cluster genre; K=4 must beat K=1), "
             "or 'dir' with --data-dir and --format")


class UsageError(ValueError):
    """A bad combination of command-line arguments; main prints ``error: <message>`` and exits 2."""


def _add_data_args(p: argparse.ArgumentParser, max_len: bool = True) -> argparse._ArgumentGroup:
    """The data options; ``max_len=False`` leaves --max-len to the TrainConfig flags (train)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="ml-100k", choices=["ml-100k", "synthetic", "planted", "dir"], help=DATA_HELP)
    g.add_argument("--data-dir", help="folder (or .csv / .parquet file) with your own data, or a folder written by "
                                      "`python -m mind prepare` (recognised by its meta.json); implies --data dir")
    g.add_argument("--format", default="recbole", choices=["recbole", "movielens", "comirec", "parquet"],
                   help="format of --data-dir: RecBole atomic files (.inter/.item/.user), raw MovieLens "
                        "(u.data / ratings.dat), a ComiRec csv (user,item,category,timestamp), or Parquet "
                        "(columns user_id, item_id, timestamp, optional category)")
    if max_len:
        g.add_argument("--max-len", type=int, default=20,
                       help="history length (evaluate/export take the checkpoint's own; default 20)")
    g.add_argument("--split-seed", type=int, default=2020, help="seed of the 8:1:1 user split (default 2020)")
    g.add_argument("--users", type=int, default=None,
                   help="users of a generated dataset (default: 300 for --data synthetic, 4000 for planted)")
    g.add_argument("--items", type=int, default=None,
                   help="items of a generated dataset (default: 400 for --data synthetic, 2048 for planted)")
    g.add_argument("--planted-clusters", type=int, default=128,
                   help="clusters of --data planted, on a 3-d latent sphere (default 128; use --dim 16 << clusters)")
    g.add_argument("--planted-kappa", type=float, default=float("inf"),
                   help="spill-over of an interest onto nearby clusters, P ~ exp(kappa cos) (default inf: none)")
    g.add_argument("--planted-seed", type=int, default=0, help="seed of the --data planted generator (default 0)")
    return g


def load_raw(args, progress: bool = False):
    """The RawData of the data arguments (``progress``: say so while reading a large file)."""
    from . import data as D

    kind = "dir" if args.data_dir else args.data
    if kind == "ml-100k":
        raw = D.load_recbole(D.fetch_movielens_100k())
    elif kind == "synthetic":
        raw, _ = D.make_synthetic(**D.generated_size("synthetic", args.users, args.items))
    elif kind == "planted":
        raw, _ = D.make_planted(**D.generated_size("planted", args.users, args.items),
                                num_clusters=args.planted_clusters, kappa=args.planted_kappa,
                                seed=args.planted_seed)
    else:
        if not args.data_dir:
            raise UsageError("--data dir needs --data-dir PATH (a folder, or a .csv file for --format comirec)")
        loader = {"recbole": D.load_recbole, "movielens": D.load_movielens_raw,
                  "comirec": D.load_comirec_csv, "parquet": D.load_parquet}[args.format]
        t0 = time.time()
        try:
            raw = loader(args.data_dir)
        except ImportError as e:      # --format parquet without pyarrow
            raise UsageError(str(e)) from None
        if progress:
            print(f"[prepare] read {len(raw.inter):,} interactions from {args.data_dir} ({time.time() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    return raw


def load_data(args, progress: bool = False):
    """PreparedData from the data arguments: a prepared folder is memory-mapped, anything else prepared here."""
    from . import data as D

    if args.data_dir and D.is_prepared(args.data_dir):
        return D.load_prepared(args.data_dir, max_len=args.max_len)
    return D.prepare(load_raw(args, progress), max_len=args.max_len, seed=args.split_seed, progress=progress)


def _threads(n: int) -> None:
    """``--threads``: torch's CPU threads, and faiss's for this thread (mind.ann.match_threads);
    onnxruntime takes torch's count when a tower is opened (mind/export/load.py)."""
    import torch

    from .ann import match_threads
    torch.set_num_threads(max(1, n))
    match_threads(n)


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
    from .config import config_from_args
    from .train import train

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.sharded_embeddings:
        from .sharded import INSTALL, torchrec_available
        if not torchrec_available():
            raise UsageError(INSTALL)
    _threads(args.threads)
    if not info.is_main:
        D.barrier(info)        # rank 0 loads first (it may download and cache the dataset)
    data = load_data(args)
    if info.is_main:
        D.barrier(info)
    say = print if info.is_main else (lambda *a, **k: None)
    say(f"data: {json.dumps(data.summary())}")
    result = train(data, cfg, resume=args.resume, dist=info)
    if not info.is_main:
        return 0
    print(f"\nbest epoch {result.best_epoch} (valid recall@50 {result.best_metric:.4f}); mean ± s.e. over users:")
    print(_fmt_metrics([("valid", result.valid_metrics), ("test", result.test_metrics)]))
    out = result.out_dir
    print(f"\nresults: {out}/final_metrics.csv, per-epoch {out}/metrics.csv, curves {out}/learning_curves.png")
    print(f"checkpoints: {out}/best.pt (best epoch), {out}/last.pt (resume with --resume)")
    from .data import is_prepared
    data_args = f" --data-dir {args.data_dir}" + ("" if is_prepared(args.data_dir) else f" --format {args.format}") \
        if args.data_dir else ("" if args.data == "ml-100k" else f" --data {args.data}")
    print(f"next: python -m mind export --checkpoint {out}/best.pt{data_args} --out {out}/model")
    return 0


def _model_from_checkpoint(args):
    """(model in eval mode, the data it was trained on, its max_len and eval cut-offs) of --checkpoint."""
    from .checkpoint import CheckpointError
    from .train import load_trained

    model, saved = load_trained(args.checkpoint)
    args.max_len = int(saved.get("max_len", args.max_len))
    data = load_data(args)
    if int(data.num_items) != model.num_items or len(data.user_feature_cardinalities) != len(
            model.user_feature_embeddings):
        raise CheckpointError(f"checkpoint {args.checkpoint} does not fit this data ({model.num_items} items "
                              f"trained, {data.num_items} here): pass the data options it was trained with")
    return model, data, tuple(saved.get("eval_ns", (20, 50)))


def cmd_prepare(args) -> int:
    from . import data as D

    t0 = time.time()
    if args.data_dir and D.is_prepared(args.data_dir):
        raise UsageError(f"{args.data_dir} is already a prepared dataset; pass the interaction log it came from")
    args.max_len = 1        # a prepared folder holds no history length: windows are cut per batch
    data = load_data(args, progress=not args.no_progress)
    folder = D.write_prepared(data, args.out)
    summary = {k: v for k, v in data.summary().items() if k != "max_len"}
    print(f"prepared {json.dumps(summary)} into {folder} in {time.time() - t0:.1f} s")
    print(f"next: python -m mind train --data-dir {folder} --out runs/mind")
    return 0


def _merge_args(args) -> tuple[str, float, int]:
    """--merge, --diversity, --candidates checked by mind.merge (a bad value is an ``error:`` line)."""
    from .merge import check_merge

    try:
        merge, lam = check_merge(args.merge, args.diversity, candidates=args.candidates)
    except ValueError as e:
        raise UsageError(f"--{e}") from None       # every message starts with the argument's name
    return merge, lam, args.candidates


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge", default="max", help="how the interests' lists are merged (mind/merge.py): 'max' "
                   "(each item by its best interest; default), 'quota' (the interests take turns) or 'diverse' "
                   "(ComiRec's greedy: score + LAMBDA x the number of listed items of a different category)")
    p.add_argument("--diversity", default="0", metavar="LAMBDA",
                   help="lambda >= 0 of --merge diverse (default 0: the 'max' list)")
    p.add_argument("--candidates", type=_positive_int, default=200,
                   help="items per interest that --merge quota/diverse choose from (default 200)")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_model, write_metrics

    merge, lam, cands = _merge_args(args)
    _threads(args.threads)
    model, data, ns = _model_from_checkpoint(args)
    valid = evaluate_model(model, data, data.valid, ns, merge=merge, diversity=lam, candidates=cands)
    test = evaluate_model(model, data, data.test, ns, merge=merge, diversity=lam, candidates=cands)
    print(_fmt_metrics([("valid", valid), ("test", test)], ns))
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

    merge, lam, cands = _merge_args(args)
    rec = load(args.model)
    try:
        items = rec.recommend(_history(args.history), n=args.n, exclude_history=not args.include_history,
                              merge=merge, diversity=lam, candidates=cands)
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


def cmd_frontier(args) -> int:
    from .frontier import run_frontier

    _threads(args.threads)
    run_frontier(args, load_data, error=UsageError)
    return 0


def cmd_serve(args) -> int:
    """Serve --model over HTTP until SIGINT / SIGTERM (mind/service/, the [serve] extra; docs/serving.md)."""
    try:
        from .service import Limits, ServiceConfig, serve
        from .service.app import token_from_env
    except ImportError as e:
        raise UsageError(f"serve needs the [serve] extra ({e}); pip install starlette uvicorn prometheus-client") from None
    _threads(args.threads)
    token = args.admin_token or token_from_env()
    if args.admin_expose and not token:
        raise UsageError("--admin-expose needs a token: --admin-token TOKEN or $MIND_SERVE_ADMIN_TOKEN")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_history=args.max_history, max_users=args.max_users,
                    max_n=args.max_n)
    serve(ServiceConfig(model=args.model, host=args.host, port=args.port, index=args.index,
                        max_wait_ms=args.max_wait_ms, max_batch=1 if args.no_batching else args.max_batch,
                        max_queue=args.max_queue, limits=limits, admin_token=token, admin_expose=args.admin_expose))
    return 0


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
    groups = {"data": _add_data_args(p, max_len=False), "model and training": p.add_argument_group("model and training")}
    add_config_arguments(p, groups)
    g = groups["model and training"]
    g.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="filter, split and index a log once; train/evaluate/export map the result",
                       description="Run the ComiRec protocol (5-core filter, 8:1:1 user split, id maps, time-sorted "
                                   "sequences) once and write plain arrays plus meta.json into --out; "
                                   "`--data-dir OUT` then memory-maps them (every torchrun rank shares the pages).")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier prepared dataset)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    _add_data_args(p, max_len=False)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on valid and test",
                       description="Recall/HitRate/NDCG @20,@50 of a checkpoint (best.pt or last.pt) on the valid "
                                   "and test users of the same data (pass the same data options as for training).")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train")
    p.add_argument("--out", help="write <out>.json and <out>.csv")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    _add_merge_args(p)
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
    _add_merge_args(p)
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

    p = sub.add_parser("frontier", help="Recall@50 against Diversity@50 of the merge rules, K=4 vs K=1, over seeds",
                       description="Sweep the diverse merge's lambda for MIND K=4 and K=1 (the same re-ranking of "
                                   "one vector's candidates) over seeds: Recall@50, NDCG@50, Diversity@50, "
                                   "Coverage@50 per lambda on valid and test, lambda chosen on valid; writes "
                                   "frontier.md/.csv/.json/.png into --out (mind/frontier.py). Missing models in "
                                   "--runs are trained first, one at a time.")
    p.add_argument("--runs", required=True, help="folder of the K{4,1}_seed{S}/best.pt runs (missing ones are trained)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0 1 2 3 4)")
    p.add_argument("--lambdas", type=float, nargs="+", default=None,
                   help="lambdas of the diverse merge (default: 16 from 0 to 5, mind/frontier.py DEFAULT_LAMBDAS)")
    p.add_argument("--candidates", type=_positive_int, default=200,
                   help="m: items per interest in K=4's pool; K=1's baseline pool is 4 x m (default 200)")
    p.add_argument("--train-args", default=None,
                   help="extra flags for training a missing run (default: none; '--dim 16 --lr 0.01' for planted)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    _add_data_args(p)
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("serve", help="serve an export folder over HTTP (recommend, batch, metrics, hot swap)",
                       description="Serve a folder written by export (native, aoti or onnx) on an ASGI stack "
                                   "(Starlette + uvicorn): POST /recommend and /recommend/batch, GET /healthz, "
                                   "/readyz, /metrics (Prometheus), / (a page to try it), POST /admin/reload "
                                   "(hot swap; SIGHUP reloads the same folder). Concurrent requests are batched "
                                   "into one model call. See docs/serving.md.")
    p.add_argument("--model", required=True, help="folder written by export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--index", default="export", choices=["export", "none", "exact", "ivf", "hnsw"],
                   help="retrieval index: the kind meta.json records for items.faiss (export, default), exact "
                        "brute force without faiss (none), or a kind with mind.ann's defaults")
    p.add_argument("--max-wait-ms", type=float, default=1.0,
                   help="dynamic batching: longest wait for more requests before a model call (default 1.0)")
    p.add_argument("--max-batch", type=_positive_int, default=64, help="users per model call (default 64)")
    p.add_argument("--no-batching", action="store_true", help="one model call per request (= --max-batch 1)")
    p.add_argument("--max-queue", type=_positive_int, default=4096,
                   help="users waiting at most; beyond, 503 (default 4096)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20,
                   help="largest request body, else 413 (default 1 MiB)")
    p.add_argument("--max-history", type=_positive_int, default=10_000, help="ids in one history (default 10000)")
    p.add_argument("--max-users", type=_positive_int, default=1_000, help="users in one batch request (default 1000)")
    p.add_argument("--max-n", type=_positive_int, default=1_000, help="largest n (default 1000)")
    p.add_argument("--admin-expose", action="store_true",
                   help="let non-loopback clients use /admin/* (needs --admin-token)")
    p.add_argument("--admin-token", default=None,
                   help="token the admin routes require (Authorization: Bearer ...); default $MIND_SERVE_ADMIN_TOKEN")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(func=cmd_serve)

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
            return int(args.func(args) or 0)
        except (CheckpointError, DataFormatError, DataNotFoundError, ModelFormatError, UsageError) as e:
            # never a traceback (nor a silent fresh start) for a bad file: say which file and why
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # an --out that is a file, a folder without write permission, a full disk
            print(f"error: {_os_error(e)}", file=sys.stderr)
            return 2
