"""Doctest collection (``--doctest-modules`` over fsam_fused/) without the optional
frameworks: the integration modules import theirs at the top, so leave them out when the
``hf`` extra is not installed (their tests skip themselves)."""

import importlib.util


def _missing(*names):
    return any(importlib.util.find_spec(n) is None for n in names)


collect_ignore = []
if _missing("accelerate"):
    collect_ignore.append("fsam_fused/integrations/accelerate.py")
if _missing("transformers", "accelerate"):
    collect_ignore.append("fsam_fused/integrations/huggingface.py")
