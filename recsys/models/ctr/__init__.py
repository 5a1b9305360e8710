"""Click-through-rate models: each receives its embedding collection and returns (B,) logits.

Shapes: B batch rows, F sparse fields, D embedding dimension. The training task is
``recsys.training.ctr.CTRTask``; ``conf/model/{dlrm,dcnv2,deepfm}.yaml`` configure it.

Example:
    >>> from recsys.models.ctr import DCNv2, DLRM, DeepFM, field_specs  # doctest: +SKIP
"""

from __future__ import annotations

from recsys.models.ctr.dcnv2 import Cross, DCNv2
from recsys.models.ctr.deepfm import DeepFM, factorization_machine
from recsys.models.ctr.dlrm import DLRM
from recsys.models.ctr.fields import FIRST_ORDER_SUFFIX, FIRST_ORDER_WIDTH, field_specs

FAMILY = "ctr"  # the family name of CTR model packages (DLRM, DCNv2, DeepFM)

__all__ = ["FAMILY", "Cross", "DCNv2", "DLRM", "DeepFM", "FIRST_ORDER_SUFFIX", "FIRST_ORDER_WIDTH", "factorization_machine",
           "field_specs"]
