"""``python -m recbole_iisan.report DIR``: the comparison table of a results folder; see
:mod:`recbole_iisan.quick_start.results`."""
import sys

from recbole_iisan.quick_start.results import main


def __getattr__(name: str):  # the 0.1 module held tables, memory and TPME: say where they went
    from recbole_iisan.utils.moved import moved_attribute

    where = {"markdown_table": "recbole_iisan.utils.tables", "write_csv": "recbole_iisan.utils.tables",
             "peak_memory": "recbole_iisan.utils.resources", "peak_megabytes": "recbole_iisan.utils.resources",
             "tpme": "recbole_iisan.evaluator.efficiency", "write_result": "recbole_iisan.quick_start.results",
             "metric_keys": "recbole_iisan.quick_start.results", "format_gates": "recbole_iisan.quick_start.results"}
    raise moved_attribute(__name__, name, where)


if __name__ == "__main__":
    sys.exit(main())
