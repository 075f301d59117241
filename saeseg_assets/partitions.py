"""The partitions of the class-wise assets: one static partition per ADE20K class, keyed `NNN_slug`.
Keys and indices come from the core class table, so assets and core can never disagree."""

from __future__ import annotations

import dagster as dg

from .core.ade20k import CLASSES, class_by_index, class_by_key

class_partitions = dg.StaticPartitionsDefinition([c.key for c in CLASSES])


def class_index_for_key(key: str) -> int:
    return class_by_key(key).index


def key_for_class_index(index: int) -> str:
    return class_by_index(index).key
