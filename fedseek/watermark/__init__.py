"""Watermarking of the shared model: secret trigger keys, embedding, black-box detection."""

from fedseek.watermark.core import (
    SCHEME_VERSION,
    EmbedReport,
    VerifyResult,
    WatermarkKey,
    commitment,
    default_n_triggers,
    embed,
    keygen,
    load_key,
    p_value,
    save_key,
    site_key,
    trigger_set,
    verify,
    verify_file,
    verify_model,
)

__all__ = [
    "SCHEME_VERSION",
    "EmbedReport", "VerifyResult", "WatermarkKey", "commitment", "default_n_triggers", "embed", "keygen", "load_key",
    "p_value", "save_key", "site_key", "trigger_set", "verify", "verify_file", "verify_model",
]
