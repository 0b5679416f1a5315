"""Run under torchrun by tests/test_sharded.py: `python -m mind train`'s training with every step's loss
recorded, written to OUT/losses_rank<R>.json (argv: OUT, then train flags)."""

import json
import os
import pathlib
import sys

import mind.train as T
from mind.cli import main

out = pathlib.Path(sys.argv[1])
losses = []
_loss = T.training_loss


def recording(*args, **kwargs):
    loss = _loss(*args, **kwargs)
    losses.append(float(loss.detach()))
    return loss


T.training_loss = recording
code = main(["train", "--out", str(out), *sys.argv[2:]])
(out / f"losses_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(losses))
sys.exit(code)
