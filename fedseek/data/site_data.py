"""A deployed site's training data, loaded as its site config says (built-in partition, table or image folder)."""

from __future__ import annotations

from fedseek.config import SiteConfig
from fedseek.data.arrays import ArrayDataset


def load_site_data(cfg: SiteConfig) -> ArrayDataset:
    """A deployed site's training data (fedseek.data.ArrayDataset) as its config says; DataError/ValueError in one line."""
    from fedseek.data import load_builtin, load_image_folder, load_table, partition_indices

    d = cfg.data
    if d.builtin is not None:
        train, _ = load_builtin(d.builtin, d.seed, test_fraction=d.test_fraction, **d.options)
        parts = partition_indices(train.y, int(d.num_partitions or 1), d.scheme, alpha=d.alpha, seed=d.seed,
                                  min_partition_size=d.min_partition_size, groups=getattr(train, "groups", None))
        return train.subset(parts[int(d.partition or 0)])
    if d.image_size is not None:
        return load_image_folder(str(d.path), d.image_size, grayscale=d.grayscale, classes=d.classes)
    return load_table(str(d.path), str(d.label_column), d.feature_columns, standardize=d.standardize, classes=d.classes,
                      preprocessing=d.preprocessing, task=d.task)
