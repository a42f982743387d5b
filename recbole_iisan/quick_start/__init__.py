"""From a command line to results: one run (:mod:`.pipeline`), comparisons over models and seeds
(:mod:`.compare`), their tables (:mod:`.results`), the Ray Tune search (:mod:`.tune`) and the
command lines (:mod:`.cli`, :mod:`.commands`).

``from recbole_iisan.quick_start import run`` (RecBole's ``run_recbole`` for plugin and RecBole
models) is imported on first use, so that the command line can say in one line when RecBole itself
is missing."""

__all__ = ["prepare_inputs", "run"]


def __getattr__(name: str):
    if name == "run":
        from recbole_iisan.quick_start.pipeline import run

        return run
    if name == "prepare_inputs":
        from recbole_iisan.data.utils import prepare_inputs

        return prepare_inputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
