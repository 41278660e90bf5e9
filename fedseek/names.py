"""Every list of allowed names, defined once: config validation, error messages and code all read them from here."""

from __future__ import annotations

from typing import Literal, get_args

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]
PartitionScheme = Literal["iid", "dirichlet", "quantity", "natural"]
DatasetName = Literal["breast_cancer", "digits", "bank_fraud"]
CodecName = Literal["none", "fp16", "int8", "topk", "sparse_mask"]
QuantizerName = Literal["none", "fp16", "int8"]
IndexCoding = Literal["uint32", "delta", "bitmap"]
TopkScope = Literal["layer", "global"]
Attack = Literal["sign_flip", "scale", "noise", "nan", "wrong_shape"]
AccountantName = Literal["rdp", "prv"]
ModelKind = Literal["mlp", "cnn"]

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
PARTITION_SCHEMES: tuple[str, ...] = get_args(PartitionScheme)
DATASETS: tuple[str, ...] = get_args(DatasetName)
CODECS: tuple[str, ...] = get_args(CodecName)
QUANTIZERS: tuple[str, ...] = get_args(QuantizerName)
INDEX_CODINGS: tuple[str, ...] = get_args(IndexCoding)
TOPK_SCOPES: tuple[str, ...] = get_args(TopkScope)
ATTACKS: tuple[str, ...] = get_args(Attack)
