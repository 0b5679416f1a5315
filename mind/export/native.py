"""``--to native``: the MIND model itself (``model.pt``), served by ``mind.serve.load`` with this package.

Files (with the item side of :mod:`mind.export.items` and :mod:`mind.export.meta`'s meta.json)::

    model.pt              {"model": state_dict, "model_config": MIND.config}  (loads with weights_only=True)
    item_embeddings.npy   } the item side, as for every format
    items.json            }
    items.faiss           } only when an index kind is given (``python -m mind export`` always gives one)
    meta.json             format "mind-export/1"

Unlike a compiled tower, the native model gives the coupling weights that ``mind.explain`` shows.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..model import MIND
from .errors import ModelFormatError, first_line
from .items import write_item_side
from .meta import clear_meta, write_meta

FILE = "model.pt"


def export(model: MIND, data, folder, index: Optional[str] = None) -> pathlib.Path:
    """Write a native export of ``model`` (trained on ``data``) into directory ``folder``.

    ``index``: the items.faiss kind ("exact", "ivf", "hnsw"; needs faiss), or None for no index file
    (serving retrieves exactly either way; ``Recommender.use_index`` builds one at load time)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clear_meta(folder)
    model = model.eval()
    with torch.no_grad():
        table = model.item_embeddings().float().numpy()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config}, folder / FILE)
    item_index = write_item_side(table, data, folder, index)
    write_meta(folder, "native", model, data, item_index=item_index)  # last
    return folder


def load_model(folder) -> MIND:
    """The MIND model in ``folder/model.pt``: CheckpointError for a damaged file, ModelFormatError for
    one whose weights do not fit its own model_config."""
    path = pathlib.Path(folder) / FILE
    state = load_checkpoint(path, required=("model", "model_config"), writer="python -m mind export")
    try:
        model = MIND.from_config(state["model_config"])
        model.load_state_dict(state["model"])
    except Exception as e:  # wrong keys or shapes: a model.pt from elsewhere
        raise ModelFormatError(f"{path} does not hold the model its model_config describes "
                               f"({first_line(e, 160)}); re-export the model") from None
    return model
