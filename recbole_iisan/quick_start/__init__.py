"""From a command line to results: one run (:mod:`.pipeline`), comparisons over models and seeds
(:mod:`.compare`), their tables (:mod:`.results`) and the command lines (:mod:`.cli`, :mod:`.commands`)."""
from recbole_iisan.quick_start.pipeline import prepare_inputs, run

__all__ = ["prepare_inputs", "run"]
