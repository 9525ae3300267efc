"""``import heft.launcher.lm_eval_model`` registers the lm-evaluation-harness model ``heft``.

The public import path the README gives; the model itself is ``evaluate/lm_eval_model.py``."""

from heft.launcher.evaluate.lm_eval_model import HeftLM, main  # noqa: F401  (importing registers it)
