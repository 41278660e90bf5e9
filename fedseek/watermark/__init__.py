"""Coordinator-side trigger-set watermark (WAFFLE-style) with an exact binomial verification test.

Scheme ``fedseek-wm-v1`` (reference/anchors.md, section A.2):

* **Key.** A 256-bit secret seed. Everything else (the trigger inputs, their labels, the
  synthetic inputs used while embedding) is derived from it deterministically, with
  ``numpy.random.Generator`` streams seeded from ``SHA-256(domain || purpose || seed)``.
  Trigger labels are drawn i.i.d. uniform on ``{0..K-1}`` from their own stream, independently
  of the inputs. A model produced without the seed therefore matches each trigger label with
  probability exactly ``1/K``, whatever it is, and the number of matches on ``n`` triggers is
  ``Binomial(n, 1/K)`` under the null: the p-value ``P(Bin(n, 1/K) >= m)`` is exact, not
  asymptotic. The false-positive rate is at most ``alpha`` by construction.
* **Commitment.** ``SHA-256`` over the seed, the trigger-set bytes and the key metadata. It can be
  published when the key is made (it reveals nothing usable about the 256-bit seed) and checked
  when the seed is revealed to a verifier, which stops a key being forged after the fact.
* **Embedding.** After aggregation the coordinator fine-tunes the global model on the trigger
  set (cross-entropy) with an L2 pull towards the pre-embed weights and distillation towards the
  pre-embed model's outputs on seeded synthetic inputs (standard-normal records for tabular
  models, smooth random blobs for images; or caller-supplied public inputs). Gradients are taken
  at randomly perturbed weights so the mark survives pruning and fine-tuning better
  (Yu et al. 2024, Gan et al. 2023), clipped, and applied with SGD + momentum, so each step is
  proportional to the gradient; it stops as soon as the trigger accuracy reaches the target, and a
  model already at the target is left untouched. **No site data is used**: the embedding is
  post-processing of the (DP) aggregate, so it costs zero privacy budget and leaves every site's
  (epsilon, delta) unchanged. Re-embed after every aggregation (sites' local training erodes the
  mark; in practice the mark mostly survives a round, so later re-embeddings take a few steps).
* **Verification.** Black-box: query the suspect model on the triggers, count top-1 matches
  ``m``, report ``p = scipy.stats.binom.sf(m - 1, n, 1/K)`` and ``detected = p <= alpha``.
  Use ``alpha = 1e-6`` for evidence, ``1e-3`` for an internal alert, and divide ``alpha`` by
  the number of keys/models tested (Bonferroni). Revealed triggers are burned: an adversary who
  has seen them can unlearn them; ``verify(..., indices=...)`` checks a subset so the rest stays
  secret (the test stays exact on any key-independent subset).

Model files for ``verify_file``: a plain ``torch.save``-d state_dict (``model.pt``) plus a JSON
sidecar (default: the same path with suffix ``.json``, i.e. ``model.json``) holding
``{"kind", "input_shape", "num_classes", "hidden"}`` as written by the coordinator. Any of these can
be passed explicitly instead (arguments win over the sidecar). The key itself does not store the
architecture: one key can mark models of several architectures for the same task.

Claims are limited to what the benchmark measures (``benchmarks/watermark.py``): limited-data
fine-tuning and magnitude pruning. Trigger-set watermarks are not robust to model extraction or
distillation by a determined adversary with data (Lukas et al., SoK, S&P 2022).
"""

from fedseek.watermark.detection import VerifyResult, p_value, verify, verify_file, verify_model
from fedseek.watermark.embedding import EmbedReport, embed
from fedseek.watermark.keys import SCHEME_VERSION, WatermarkKey, commitment, default_n_triggers, keygen, load_key, save_key, site_key
from fedseek.watermark.triggers import trigger_set

__all__ = [
    "SCHEME_VERSION", "EmbedReport", "VerifyResult", "WatermarkKey", "commitment", "default_n_triggers", "embed", "keygen",
    "load_key", "p_value", "save_key", "site_key", "trigger_set", "verify", "verify_file", "verify_model",
]
