"""``--sharded-embeddings``: the item-id table sharded over the torchrun ranks with TorchRec.

Plain DDP (:mod:`mind.distributed`) holds the whole item table, its optimizer state and its gradient
on every rank.  Here the table becomes a TorchRec ``EmbeddingCollection`` (one table, ``item_id``,
fed by the feature ``item``; a table named ``items`` collides with an attribute inside TorchRec)
and ``DistributedModelParallel`` shards it row-wise (the planner's plan, printed once at start);
everything else -- routing, H layers, genre and profile tables, which are small -- stays
data-parallel inside DMP's DDP wrapper.

Lookups.  :class:`ShardedItemTable` replaces ``MIND.item_id_embedding``.  A lookup sends a
``KeyedJaggedTensor`` with one key whose values are the ids and lengths 1, and gets the rows back
from the ranks that own them (TorchRec's all-to-all).  A training step makes exactly one: the
table's update is fused into the lookup's backward, so two lookups in a step would be two Adagrad
updates with partial gradients.  :func:`mind.train.training_loss` therefore calls
:meth:`ShardedItemTable.prefetch` with every id the step needs -- the histories, the targets and the
sampled-softmax negatives (drawn ahead from a copy of the step's negative generator), each distinct
id once -- and the model's and the loss's lookups in that step are rows of that one result; its
backward brings each row's gradient summed over the step.  (The exact softmax embeds the whole table
once a step anyway.)  Row 0 is padding: its output is multiplied by 0, so it stays 0 and gets no
gradient, as ``padding_idx=0`` does.

Optimizer.  The sharded table's update is fused into TorchRec's backward (FBGEMM's table-batched
embedding); on CPU FBGEMM offers only SGD and (row-wise) Adagrad there, not Adam.  The table is
therefore trained with exact Adagrad (``state += g^2``; ``w -= table_lr * g / (sqrt(state) + eps)``,
``eps`` = :data:`ADAGRAD_EPS`, no weight decay), and the dense part with AdamW as always.  The same
split runs without sharding under ``--table-optimizer adagrad`` (``torch.optim.Adagrad`` on the
dense table): Adagrad leaves rows without gradient untouched, so the dense and the sparse update
are the same update, and both runs give the same numbers up to float rounding.  TorchRec divides
the gradient it brings back to a table row by the world size (its default gradient division), which
is DDP's average.

Checkpoints and evaluation.  Rank 0 evaluates and writes checkpoints as in DDP; the table (and its
Adagrad state) is gathered to rank 0 once for that (``ShardedTensor.gather``), so ``best.pt`` and
``last.pt`` have the single-process layout and ``evaluate`` / ``export`` read them unchanged.  The
price: rank 0 holds the whole float32 table once at those moments; the training state on every
rank (table, optimizer state, gradient) is the rank's shard only.

Initialisation.  Every rank builds the seeded single-process model first, then copies its own rows
of the initial table into its shard: the sharded run starts from the same weights as DDP.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistInfo

TABLE, FEATURE = "item_id", "item"
#: the state-dict key of the plain table, and of the sharded one inside DMP
PLAIN_KEY = "item_id_embedding.weight"
SHARDED_KEY = f"item_id_embedding.ec.embeddings.{TABLE}.weight"
ADAGRAD_EPS = 1e-8
INSTALL = ("--sharded-embeddings needs TorchRec: pip install 'mind-kernels[scale]' "
           "(torchrec 1.9.2 with fbgemm-gpu-cpu 1.8.0, built for torch 2.13; see the README's Install)")


def torchrec_available() -> bool:
    try:
        import torchrec  # noqa: F401
        from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: F401
    except Exception:       # ImportError, or fbgemm's OSError on a torch it was not built for
        return False
    return True


class ShardedItemTable(nn.Module):
    """Drop-in for ``MIND.item_id_embedding``: ids (...,) -> rows (..., d), through a TorchRec
    ``EmbeddingCollection`` (created on the meta device; DMP materialises each rank's shard)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.ec = EmbeddingCollection(tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim,
                                                              num_embeddings=num_embeddings,
                                                              feature_names=[FEATURE])],
                                      device=torch.device("meta"))

        self._step: Optional[tuple] = None      # (sorted distinct ids, their rows) of a prefetched step

    def _lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (n, d) rows: one KJT through the sharded collection (a collective)."""
        from torchrec import KeyedJaggedTensor

        kjt = KeyedJaggedTensor(keys=[FEATURE], values=flat,
                                lengths=torch.ones(flat.shape[0], dtype=torch.int32, device=flat.device))
        rows = self.ec(kjt)[FEATURE].values()
        return rows * (flat != 0).unsqueeze(1).to(rows.dtype)

    def prefetch(self, *ids: torch.Tensor) -> None:
        """Look up the distinct ids among ``ids`` once; until :meth:`end_step`, calls are served from them."""
        uniq = torch.unique(torch.cat([x.reshape(-1) for x in ids]))
        self._step = (uniq, self._lookup(uniq))

    def end_step(self) -> None:
        self._step = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self._step is None:
            rows = self._lookup(flat)
        else:
            uniq, step_rows = self._step
            pos = torch.searchsorted(uniq, flat).clamp_(max=max(len(uniq) - 1, 0))
            if len(flat) and not bool((uniq[pos] == flat).all()):
                raise RuntimeError("ShardedItemTable: an id was looked up that the step did not prefetch")
            rows = step_rows[pos]
        return rows.reshape(*ids.shape, self.embedding_dim)


def ensure_process_group() -> None:
    """DMP needs a process group even for one process: a 1-rank gloo group when none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@dataclasses.dataclass
class ShardedTraining:
    """The DMP-wrapped model, its bare module (the MIND whose item table is sharded) and the dense
    part's optimizer; the table's optimizer is fused into the backward."""

    dmp: nn.Module
    model: nn.Module
    dense_optimizer: torch.optim.Optimizer
    plan: str
    world_size: int

    # ------------------------------------------------------------------ the table's shards
    def _weight(self):
        return self.dmp.state_dict()[SHARDED_KEY]           # ShardedTensor (num_items + 1, d)

    def _momentum(self):
        state = self.dmp.fused_optimizer.state_dict()["state"][SHARDED_KEY]
        return state[f"{TABLE}.momentum1"]

    @staticmethod
    def _gather(sharded) -> Optional[torch.Tensor]:
        """The whole ShardedTensor on rank 0 (None elsewhere); a collective."""
        out = torch.empty(sharded.shape, dtype=sharded.dtype) if dist.get_rank() == 0 else None
        sharded.gather(dst=0, out=out)
        return out

    @staticmethod
    def _scatter(sharded, full: torch.Tensor) -> None:
        """Copy this rank's rows of ``full`` into its local shards of ``sharded``."""
        with torch.no_grad():
            for shard in sharded.local_shards():
                r, c = shard.metadata.shard_offsets
                n, d = shard.tensor.shape
                shard.tensor.copy_(full[r:r + n, c:c + d].to(shard.tensor.dtype))

    # ------------------------------------------------------------------ plain (single-process) form
    def dense_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if k != SHARDED_KEY}

    def plain_state(self) -> Optional[dict]:
        """The single-process state dict on rank 0 (None elsewhere), the table gathered; a collective."""
        table = self._gather(self._weight())
        if table is None:
            return None
        state = self.dense_state()
        return {**{k: v.clone() for k, v in state.items()}, PLAIN_KEY: table}

    def optimizer_state(self) -> Optional[dict]:
        """{"dense": AdamW's state dict, "table_sum": the gathered Adagrad state} on rank 0; a collective."""
        table_sum = self._gather(self._momentum())
        if table_sum is None:
            return None
        return {"dense": self.dense_optimizer.state_dict(), "table_sum": table_sum}

    def load(self, plain_state: dict, optimizer_state: Optional[dict] = None) -> None:
        """Restore from a single-process layout (every rank reads the same checkpoint)."""
        state = {k: v for k, v in plain_state.items() if k != PLAIN_KEY}
        state[SHARDED_KEY] = self._weight()         # TorchRec's load hook wants its own key: itself, for now
        self.model.load_state_dict(state)
        self._scatter(self._weight(), plain_state[PLAIN_KEY])
        if optimizer_state is not None:
            self.dense_optimizer.load_state_dict(optimizer_state["dense"])
            self._scatter(self._momentum(), optimizer_state["table_sum"])

    def bytes_per_rank(self) -> dict:
        """Bytes this rank holds of the item table, its optimizer state, and table-sized gradients
        (none: the fused backward updates the rows of a batch in place)."""
        weight = sum(s.tensor.numel() * s.tensor.element_size() for s in self._weight().local_shards())
        state = sum(s.tensor.numel() * s.tensor.element_size() for s in self._momentum().local_shards())
        return {"table": weight, "optimizer_state": state, "gradient": 0}

    def dense_checksum(self) -> float:
        """Sum of the replicated (dense) parameters and their squares: equal on every rank."""
        with torch.no_grad():
            return float(sum(p.double().sum() + p.double().pow(2).sum()
                             for k, p in self.dense_state().items() if p.is_floating_point()))


def shard_model(model: nn.Module, config, info: DistInfo) -> ShardedTraining:
    """Shard ``model``'s item table over the process group (``model`` is the seeded single-process
    MIND, identical on every rank); returns the DMP wrapper, the bare module and the dense AdamW."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    ensure_process_group()
    world = dist.get_world_size()
    initial = model.item_id_embedding.weight.detach()
    model.item_id_embedding = ShardedItemTable(initial.shape[0], initial.shape[1])
    device = torch.device(info.device)
    sharders = [EmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD,
                                                         "learning_rate": config.table_lr, "eps": ADAGRAD_EPS})]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type),
        constraints={TABLE: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])})
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    out = ShardedTraining(dmp, dmp.module, None, str(plan), world)
    out._scatter(out._weight(), initial)
    del initial
    dense = [p for n, p in dmp.named_parameters() if "item_id_embedding." not in n]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in dense)
    out.dense_optimizer = torch.optim.AdamW(dense, lr=config.lr, weight_decay=config.weight_decay,
                                            fused=fused or None)
    return out
