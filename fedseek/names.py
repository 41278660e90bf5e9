"""Every list of allowed names, defined once: config validation, error messages and code all read them from here.

One dependency-free module rather than one per layer: the config models need every list, must stay
cheap to import (the privacy layer pulls in Opacus, the data layer pandas), and the runtime, which
owns strategies and simulated attacks, itself imports the config.
"""

from __future__ import annotations

from typing import Literal, get_args

StrategyName = Literal["fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]
PartitionScheme = Literal["iid", "dirichlet", "quantity", "natural"]
DatasetName = Literal["breast_cancer", "digits", "bank_fraud"]
QuantizerName = Literal["none", "fp16", "int8"]  # the value format on the wire ("none" = fp32)
SparseCodecName = Literal["topk", "sparse_mask"]  # codecs that send only some coordinates
CodecName = Literal[QuantizerName, SparseCodecName]  # a dense codec is named for the value format it sends
IndexCoding = Literal["uint32", "delta", "bitmap"]
TopkScope = Literal["layer", "global"]
Attack = Literal["sign_flip", "scale", "noise", "nan", "wrong_shape"]
AccountantName = Literal["rdp", "prv"]
ModelKind = Literal["mlp", "cnn"]
TaskType = Literal["classification", "regression"]  # classification: labels are classes; regression: a number per row
Device = Literal["auto", "cpu", "cuda"]
SitePrecision = Literal["fp32", "bf16"]  # what a deployed site may run (no fp16 GradScaler path)
Precision = Literal[SitePrecision, "fp16"]  # fp16 needs CUDA and no DP-SGD

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"  # a site name is also a file name and a Flower node name

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
PARTITION_SCHEMES: tuple[str, ...] = get_args(PartitionScheme)
DATASETS: tuple[str, ...] = get_args(DatasetName)
CODECS: tuple[str, ...] = get_args(CodecName)
DENSE_CODECS: tuple[str, ...] = get_args(QuantizerName)
SPARSE_CODECS: tuple[str, ...] = get_args(SparseCodecName)
QUANTIZERS: tuple[str, ...] = get_args(QuantizerName)
INDEX_CODINGS: tuple[str, ...] = get_args(IndexCoding)
TOPK_SCOPES: tuple[str, ...] = get_args(TopkScope)
ATTACKS: tuple[str, ...] = get_args(Attack)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
PRECISIONS: tuple[str, ...] = get_args(Precision)
