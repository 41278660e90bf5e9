"""fedseek.data: built-in offline tasks, site loaders (CSV/Parquet/images) and simulation partitioners."""

from fedseek.data.arrays import ArrayDataset, DataError
from fedseek.data.builtin import (
    BANK_FRAUD_FEATURES,
    bank_fraud,
    breast_cancer,
    digits,
    load_builtin,
)
from fedseek.data.loaders import load_image_folder, load_table
from fedseek.data.partition import partition_indices

__all__ = [
    "ArrayDataset",
    "BANK_FRAUD_FEATURES",
    "DataError",
    "bank_fraud",
    "breast_cancer",
    "digits",
    "load_builtin",
    "load_image_folder",
    "load_table",
    "partition_indices",
]
