"""MIND's data layer: loaders -> `RawData`, `prepare` -> `PreparedData` (ComiRec protocol).

    raw = load_recbole(fetch_movielens_100k())      # or load_movielens_raw / load_comirec_csv / make_synthetic
    data = prepare(raw, max_len=20)                 # 5-core filter, 8:1:1 user split, CSR sequences
    write_prepared(data, "prepared/"); data = load_prepared("prepared/", max_len=20)   # on disk, memory-mapped
"""

from .fetch import fetch_movielens_100k
from .loaders import (DataFormatError, RawData, age_bucket, load_comirec_csv, load_movielens_raw,
                      load_recbole)
from .parquet import load_parquet
from .prepare import EvalSplit, PreparedData, load_split, prepare, right_align, save_split
from .prepared import is_prepared, load_prepared, write_prepared
from .synthetic import generated_size, make_planted, make_synthetic

__all__ = [
    "DataFormatError", "EvalSplit", "PreparedData", "RawData", "age_bucket", "fetch_movielens_100k", "generated_size",
    "is_prepared", "load_comirec_csv", "load_movielens_raw", "load_parquet", "load_prepared", "load_recbole",
    "load_split", "make_planted", "make_synthetic", "prepare", "right_align", "save_split", "write_prepared",
]
