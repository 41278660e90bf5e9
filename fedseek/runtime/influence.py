"""Bounded influence of one site on the aggregate, and a check of the aggregate itself.

Screening (`wire.screening`) judges each reply alone; these bounds need the whole round and
come from the `validation` config:

- update norm (`norm_bound: adaptive`): a reply whose update norm is above `norm_multiple` x
  the round's reference norm is rejected, not clipped (a sign-flipped update clipped to the
  bound would still pull the model backwards). The reference is the lower median of the
  round's norms (the ceil(n/2)-th smallest): fewer than half of the replies can move it
  outside the range of the honest ones. That needs three or more replies: with two, the lower
  median is simply the smaller norm, which one hostile site sets (a near-zero update would get
  the honest one rejected), so a round with fewer than three replies uses the last reference
  from a round that had three or more, and has no norm bound before there is one.
- weight (`weight_multiple`, `max_examples`): a reply counts for at most `weight_multiple` x
  the round's lower median num-examples, and at most its site's declared maximum; the reported
  count stays in the metrics, the bound is logged, audited and listed in the metrics row.
- the aggregate (`max_global_abs`): non-finite, collapsed to all zeros, or a weight above the
  bound -> discarded and the previous global model kept, with the reason recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedseek.config import ValidationSpec
from fedseek.wire.screening import Issue, Screened, SiteReply

log = logging.getLogger(__name__)
MIN_REPLIES_FOR_REFERENCE = 3  # fewer replies: one hostile site would be (half of) the median


def lower_median(values: Sequence[float]) -> float | None:
    """The ceil(n/2)-th smallest value (None for no values): fewer than half of them cannot move it out of the others' range."""
    if not values:
        return None
    return float(sorted(values)[(len(values) - 1) // 2])


class InfluenceBounds:
    """The round-level bounds of `ValidationSpec`; keeps the last reference norm (checkpointed)."""

    def __init__(self, spec: ValidationSpec) -> None:
        self.spec = spec
        self.reference: float | None = None  # the last round's reference update norm

    def apply(self, screened: Screened) -> list[Issue]:
        """Reject updates above the round's norm bound, then bound the weights; returns the replies whose weight was bounded."""
        self._reject_outliers(screened)
        return self._cap_weights(screened.accepted)

    def norm_bound(self, norms: Sequence[float]) -> tuple[float | None, str]:
        """(the round's adaptive norm bound or None, how it was set); updates the reference when the round has 3+ replies."""
        if self.spec.norm_bound == "off":
            return None, ""
        if len(norms) >= MIN_REPLIES_FOR_REFERENCE:
            ref, source = lower_median(norms), "the round's median update norm"
            self.reference = ref if ref else self.reference
        else:
            ref, source = self.reference, "the last round's median update norm"
        if not ref:
            return None, ""
        m = self.spec.norm_multiple
        return m * ref, f"{m:g}x {source} {ref:.3g}"

    def _reject_outliers(self, screened: Screened) -> None:
        bound, why = self.norm_bound([r.update_norm for r in screened.accepted])
        if bound is None:
            return
        kept: list[SiteReply] = []
        for r in screened.accepted:
            if r.update_norm <= bound:
                kept.append(r)
                continue
            reason = f"update norm {r.update_norm:.3g} above bound {bound:.3g} ({why})"
            screened.rejected.append(Issue(r.node_id, r.site, reason))
            screened.bytes_up -= r.payload_bytes
            screened.wire_bytes_up -= r.wire_bytes
            log.warning("rejected update from site %s (node %s): %s", r.site, r.node_id, reason)
        screened.accepted[:] = kept

    def _cap_weights(self, accepted: list[SiteReply]) -> list[Issue]:
        multiple, declared = self.spec.weight_multiple, self.spec.max_examples
        median = lower_median([r.num_examples for r in accepted])
        bounded = []
        for r in accepted:
            limits = []
            if multiple is not None and median is not None:
                limits.append((max(1, int(multiple * median)), f"{multiple:g}x the round's median num-examples {median:g}"))
            if r.site in declared:
                limits.append((declared[r.site], f"the declared max_examples of site {r.site!r}"))
            if not limits:
                continue
            limit, why = min(limits)
            if r.num_examples > limit:
                r.weight = limit
                issue = Issue(r.node_id, r.site, f"num-examples {r.num_examples} counted as {limit} ({why})")
                bounded.append(issue)
                log.warning("bounded the weight of site %s (node %s): %s", r.site, r.node_id, issue.reason)
        return bounded

    def check_aggregate(self, new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> str:
        """Why an aggregate must not become the global model ("" when it may)."""
        if set(new) != set(old) or any(np.shape(new[k]) != np.shape(old[k]) for k in old):
            return "the aggregate's tensors or shapes differ from the global model's"
        arrays = [np.asarray(a, dtype=np.float64) for a in new.values()]
        if not all(np.all(np.isfinite(a)) for a in arrays):
            return "non-finite weights (NaN/Inf) in the aggregate"
        peak = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
        limit = self.spec.max_global_abs
        if limit is not None and peak > limit:
            return f"aggregate weight magnitude {peak:.3g} above max_global_abs {limit:g}"
        if peak == 0.0 and any(np.any(np.asarray(a) != 0) for a in old.values()):
            return "the aggregate collapsed to all-zero weights"
        return ""

    def state_dict(self) -> dict[str, Any]:
        """The last reference norm."""
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.reference = state.get("reference")
