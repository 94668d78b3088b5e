"""The captions table read whole or by row range at a pinned version, for work split over workers
(``tasks/graph_query.py``): every reader of one job sees the same rows in the same order."""

from __future__ import annotations

import numpy as np

from pogdiff.index import CaptionGraph
from storage.vectors import CAPTIONS, VECTOR, connect, matrix, open_table


def caption_table_version(uri: str) -> int:
    """The captions table's version now (to pin), or FileNotFoundError naming the store."""
    table = open_table(connect(uri), CAPTIONS)
    if table is None:
        raise FileNotFoundError(f"LanceDB at {uri} has no captions table; run `pogdiff index` first")
    return table.version


def read_captions(uri: str, version: int) -> CaptionGraph:
    """The captions of the table at ``version`` in table order, with their vectors and counts and no
    neighbours (``mode`` none), as a graph is built from; every vector must be of one embedder."""
    t = open_table(connect(uri), CAPTIONS, version).to_arrow().select(["caption_id", "caption", "embedder", VECTOR, "count"])
    embedders = sorted(set(t.column("embedder").to_pylist()))
    if len(embedders) != 1:
        raise ValueError(f"the captions table at {uri} holds vectors of {len(embedders)} embedders {embedders}: "
                         "run `pogdiff index` to embed them all with one")
    n = t.num_rows
    counts = t.column("count").to_numpy().copy()
    return CaptionGraph(ids=t.column("caption_id").to_pylist(), captions=t.column("caption").to_pylist(),
                        vectors=matrix(t.column(VECTOR), n).copy(), counts=counts, nb_index=np.zeros((n, 0), np.int64),
                        nb_sims=np.zeros((n, 0), np.float32), density=counts.astype(np.float64), embedded=0, reused=n,
                        embedder=embedders[0], mode="none")


def read_caption_rows(uri: str, version: int, start: int, stop: int) -> tuple[list[str], np.ndarray]:
    """Caption ids and vectors ``[stop - start, D]`` of rows ``start:stop`` of the captions table at ``version``."""
    t = open_table(connect(uri), CAPTIONS, version).take_offsets(list(range(start, stop))).select(["caption_id", VECTOR]).to_arrow()
    return t.column("caption_id").to_pylist(), matrix(t.column(VECTOR), t.num_rows)
