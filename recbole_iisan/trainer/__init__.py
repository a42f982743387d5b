"""Training: the trainer every model uses (:class:`PluginTrainer`), its checkpoints
(:mod:`.checkpoint`) and the Ray Tune search (:mod:`.tuning`)."""
from recbole_iisan.trainer.trainer import PluginTrainer

__all__ = ["PluginTrainer"]
