"""The one source of MIND's training settings: :class:`TrainConfig`, its recipes, and the ``train`` flags.

Every field carries its help text; ``python -m mind train``'s flags are generated from the
fields marked with a ``flag`` (:func:`add_config_arguments`), so a default lives in one place.
The model (:class:`mind.model.MIND`) and the loss (:class:`mind.loss.SoftmaxLoss`) are built
from a config by :func:`mind.train.build_model` / :func:`mind.train.build_loss`.

Recipes (``recipe``) name how a user's K interests meet the items in training:

* ``"default"``: every item, target and negatives alike, is scored by the user's best interest,
  ``s(u, i) = max_k V_k . e_i`` (what serving ranks by), and the last H layer is linear.  This is
  the recipe that won the choice on MovieLens-100k valid (docs/tried-and-lost.md).
* ``"paper"``: the paper's setting: label-aware attention with p = inf (the target picks its
  interest, v_u = V_argmax) scores every item through v_u, and the last H layer has a ReLU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional

#: recipe -> (training scoring, label-aware attention power p, activation of the last H layer)
RECIPES = {
    "default": dict(scoring="max", p=None, h_out_activation="linear"),
    "paper": dict(scoring="attention", p=math.inf, h_out_activation="relu"),
}
LOSSES = ("auto", "full", "sampled", "in_batch")
ROUTING_AXES = ("interests", "behaviors")
TABLE_OPTIMIZERS = ("auto", "adamw", "adagrad")
#: format of the dict a checkpoint stores under "config" (1: before recipes, written by mind-kernels
#: 0.1.0 up to the commit that introduced this file; 2: this TrainConfig)
CONFIG_FORMAT = 2


def _field(default, help: str, flag: Optional[str] = None, group: str = "model and training", choices=None):
    """A dataclass field with its CLI flag (None: not on the CLI), argparse group, help and choices."""
    meta = dict(help=help, flag=flag, group=group, choices=choices)
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run; the defaults are ``python -m mind train``'s."""

    # --- the model
    dim: int = _field(64, "embedding and interest size d", "--dim")
    num_interests: int = _field(4, "number of interests K", "--interests")
    dynamic_interests: bool = _field(False, "K'_u = max(1, min(K, floor(log2 n_u))) interests per user",
                                     "--dynamic-interests")
    softmax_over: str = _field("interests", "routing softmax axis: 'interests' (MIND) or 'behaviors' (ComiRec)",
                               "--routing-axis", choices=ROUTING_AXES)
    recipe: str = _field("default", "'default': every item scored by its best interest, linear last H layer; "
                                    "'paper': label-aware attention (p = inf), ReLU last H layer",
                         "--recipe", choices=tuple(RECIPES))
    num_iters: int = _field(3, "routing iterations r")
    max_len: int = _field(20, "history length fed to the model", "--max-len", group="data")
    user_feature_dim: int = _field(16, "embedding size of each user-profile feature")
    hidden_mult: int = _field(4, "hidden width of the H layers, in multiples of d")
    # --- the objective and the optimisation
    loss: str = _field("auto", "softmax estimator: 'auto' = exact ('full') up to 20,000 items, else 'sampled' "
                               "(log-uniform negatives + logQ); 'in_batch' = the other rows' targets",
                       "--loss", choices=LOSSES)
    num_negatives: int = _field(200, "negatives per batch of the sampled softmax", "--negatives")
    diversity_lambda: float = _field(0.1, "weight of the mean pairwise cosine of a user's interests in the loss",
                                     "--diversity-lambda")
    lr: float = _field(3e-3, "AdamW learning rate", "--lr")
    weight_decay: float = _field(1e-4, "AdamW weight decay", "--weight-decay")
    batch_size: int = _field(256, "global batch size (split evenly over torchrun processes)", "--batch-size")
    epochs: int = _field(20, "maximum epochs", "--epochs")
    patience: int = _field(3, "early stopping: epochs without a better valid recall@50", "--patience")
    seed: int = _field(0, "seed of everything (initialisation, order, negatives)", "--seed")
    table_optimizer: str = _field("auto", "optimizer of the item-id table: 'adamw' (like the rest), 'adagrad' "
                                          "(exact Adagrad, what a sharded table trains with), 'auto' = adagrad "
                                          "with --sharded-embeddings, else adamw",
                                  "--table-optimizer", choices=TABLE_OPTIMIZERS)
    table_lr: float = _field(0.05, "Adagrad learning rate of the item-id table (table optimizer adagrad)")
    # --- how it runs
    sharded_embeddings: bool = _field(False, "under torchrun, shard the item-id table row-wise over the ranks "
                                             "with TorchRec (the [scale] extra); the rest stays data-parallel",
                                      "--sharded-embeddings")
    backend: str = _field("auto", "routing backend: auto, reference, cpp, triton, cuda", "--backend")
    out_dir: str = _field("runs/mind", "output folder", "--out")
    progress: bool = _field(True, "progress bars", "--no-progress")
    eval_ns: tuple = _field((20, 50), "cut-offs N of the evaluation metrics")
    eval_batch_size: int = _field(1024, "users per batch in evaluation")
    write_files: bool = _field(True, "write metrics, plots and the split beside the checkpoints")

    def __post_init__(self):
        self.eval_ns = tuple(int(n) for n in self.eval_ns)
        for name in ("dim", "num_interests", "num_iters", "max_len", "user_feature_dim", "hidden_mult",
                     "num_negatives", "batch_size", "epochs", "patience", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "weight_decay", "diversity_lambda", "table_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, allowed in (("recipe", tuple(RECIPES)), ("loss", LOSSES), ("softmax_over", ROUTING_AXES),
                              ("table_optimizer", TABLE_OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.eval_ns or min(self.eval_ns) < 1:
            raise ValueError(f"eval_ns must be cut-offs >= 1, got {self.eval_ns!r}")
        if self.sharded_embeddings and self.dim % 4:
            raise ValueError(f"dim must be a multiple of 4 with sharded_embeddings (FBGEMM's tables), got {self.dim}")
        if self.sharded_embeddings and self.table_optimizer == "adamw":
            raise ValueError("table_optimizer 'adamw' cannot train a sharded table: its update is fused into "
                             "TorchRec's backward, where FBGEMM offers Adagrad but not Adam on CPU; use 'adagrad'")

    @property
    def table_adagrad(self) -> bool:
        """Is the item-id table trained with Adagrad (table_optimizer, resolved)?"""
        return self.table_optimizer == "adagrad" or (self.table_optimizer == "auto" and self.sharded_embeddings)

    @property
    def scoring(self) -> str:
        """How training scores an item: "max" (best interest) or "attention" (label-aware v_u)."""
        return RECIPES[self.recipe]["scoring"]

    @property
    def attention_p(self) -> Optional[float]:
        """The label-aware attention power of the recipe (None where it does not attend)."""
        return RECIPES[self.recipe]["p"]

    @property
    def h_out_activation(self) -> str:
        return RECIPES[self.recipe]["h_out_activation"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_ns"] = list(self.eval_ns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of :meth:`to_dict` (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def add_config_arguments(parser: argparse.ArgumentParser, groups: dict) -> None:
    """Add one flag per flagged TrainConfig field; ``groups`` maps a field's group name to an argparse group
    (missing ones are created).  Each flag's dest is the field's name and its default the field's default."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if f.type in ("bool", bool):
            negated = meta["flag"].startswith("--no-")
            group.add_argument(meta["flag"], dest=f.name, action="store_false" if negated else "store_true",
                               default=f.default, help=f"no {meta['help']}" if negated else meta["help"])
            continue
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        group.add_argument(meta["flag"], dest=f.name, type=kind, default=f.default, choices=meta["choices"],
                           help=f"{meta['help']} (default: {f.default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``train`` arguments (fields without a flag keep their defaults)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if f.metadata.get("flag")})
