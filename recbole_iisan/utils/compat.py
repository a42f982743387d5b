"""Every shim that RecBole 1.2.1 needs on today's numpy / torch / Ray, in one place.

docs/installation.md has the table (symptom, RecBole issue, test) of every patch here. None
changes a number: each restores what RecBole computed on the stack it was written for.

numpy 2 (:func:`_numpy_aliases`): RecBole's ``Config.compatibility_settings`` re-creates numpy's
removed aliases (``np.float = np.float_`` ...) and its metrics, ``Interaction`` and ``Dataset``
then use ``np.float`` / ``np.bool``. ``np.float_``, ``np.complex_`` and ``np.unicode_`` are gone in
numpy 2, so every ``Config(...)`` fails with "`np.float_` was removed in the NumPy 2.0 release".
We set the same aliases to the same types (``np.float`` -> ``np.float64``, which is what
``np.float_`` was) at import, also in Ray workers (they import this package), and make
``compatibility_settings`` do exactly that. pandas 3 is not shimmed: ``pandas<3`` is pinned
(setup.py; docs/installation.md says why).

RecBole 1.2.1 reads config strings with ``eval()`` (``Config._convert_config_dict``, applied to
the command line and to ``config_dict``, where a Ray Tune trial's values arrive): a value such as
``__import__("os").system(...)`` runs. :func:`_convert_config_dict` reads them as data instead
(:func:`recbole_iisan.utils.values.literal_value`: Python literals, ``true``/``false``, anything
else stays a string); the values RecBole users write (``2e-4``, ``[10,20]``, ``{'a': 1}``,
``True``, ``None``, ``Hit@10``) convert as before.

RecBole's ``KD_DAGFM`` builds its teacher network with ``eval(config["teacher"])``;
:func:`_teacher_by_name` gives that module an ``eval`` that only looks a name up among the
network classes the module defines (``DAGFM``, ``CrossNet``, ``CIN``): anything else is one line.
RecBole's own ``HyperTuning`` (``eval`` of ``hyper.test`` choices) is not used by the plugin
(``recbole_iisan.trainer.hyper_tuning`` reads them with ``ast.literal_eval``).

RecBole's ``data_preparation`` loads ``<checkpoint_dir>/<dataset>-for-<model>-dataloader.pth``
(or ``dataloaders_save_path``) with ``pickle.load`` whenever that file exists, so a shared
``saved/`` folder could run code. :func:`_load_split_dataloaders` never reads it: the split is
rebuilt (as RecBole does when the file is absent), with a warning naming the file.

Checkpoints: the plugin reads and writes its own (``recbole_iisan.trainer.checkpoint``: safetensors +
JSON, never a pickle), so RecBole's ``torch.load`` call sites are not reached
(``PluginTrainer.resume_checkpoint`` and ``PluginTrainer.evaluate`` replace them) and torch's
``weights_only=True`` default is left in force for everything else.

Known third-party warnings that a user cannot act on (:data:`QUIET_WARNINGS`: RecBole's pandas
``fillna`` and ``GradScaler`` deprecations, numpy's ``__array_wrap__`` deprecation met in RecBole's
``Interaction.sort``, ``torch.jit``'s deprecation in ``--export``) are filtered where they are raised
(``warnings.filterwarnings`` with the module and the message); Ray's ``RayDeprecationWarning``
by its category once Ray is imported (:func:`quiet_ray_warnings`). docs/robustness.md lists them.

RecBole 1.2.1's DDP mode (``--nproc``) is CUDA-only: ``Config._init_device`` asserts one
``gpu_id`` per process, calls ``init_process_group(backend="nccl")`` and ``torch.cuda.set_device``,
and ``AbstractTrainer`` wraps the model in ``DistributedDataParallel(device_ids=[local_rank])``.
Without CUDA, :func:`_init_device_cpu_ddp` joins the process group with ``gloo`` on the CPU
device instead (everything else RecBole does there is kept: ``single_spec``, quiet ranks > 0),
and RecBole's trainer module gets a ``DistributedDataParallel`` that leaves ``device_ids`` out
for a CPU model. With CUDA, RecBole's own code runs unchanged.

RecBole's ``Trainer.fit`` selects epochs with ``recbole.utils.early_stopping``, where a tie with
the best score so far is an improvement (``>=``: the later epoch is kept and patience restarts).
The authors' code keeps the first epoch and counts a tie as no improvement (strict ``>``). The
trainer module's ``early_stopping`` is wrapped so that, inside :func:`strict_improvement`
(``selection_rule: authors``), a tie is no improvement; outside it RecBole's function runs as is.

``apply()`` is idempotent and is called when ``recbole_iisan`` is imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

import torch

from recbole_iisan.utils.errors import UserError

_APPLIED = False

#: numpy's removed aliases as RecBole 1.2.1 sets them (``Config.compatibility_settings``), each
#: to the type it named before numpy 2 removed it (``np.float_`` was ``np.float64``, ...)
NUMPY_ALIASES = {
    "bool": "bool_",
    "int": "int_",
    "float": "float64",
    "complex": "complex128",
    "object": "object_",
    "str": "str_",
    "long": "int_",
    "unicode": "str_",
}

RECBOLE_MISSING = (
    "RecBole 1.2.1 is not installed: run 'pip install --no-deps recbole==1.2.1' (without its "
    "declared dependencies: its ray<=2.6.3 pin cannot be installed beside a current Ray), or "
    "install everything with 'bash install.sh' (docs/installation.md)"
)


class RecBoleNotInstalled(UserError, ImportError):
    """RecBole itself is missing (``pip install .`` does not bring it: see setup.py)."""


def require_recbole() -> None:
    """Raise :class:`RecBoleNotInstalled` (a one-line user error) when RecBole cannot be imported."""
    try:
        import recbole  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "recbole":
            raise
        raise RecBoleNotInstalled(RECBOLE_MISSING) from None


def _numpy_aliases() -> None:
    """Set RecBole's numpy aliases (``np.float`` ...) to numpy-2-valid types, where numpy lacks them."""
    import numpy as np

    for alias, target in NUMPY_ALIASES.items():
        if alias not in np.__dict__:  # numpy 2 has np.bool and np.long of its own: kept
            setattr(np, alias, getattr(np, target))


def _compatibility_settings(self) -> None:
    """``Config.compatibility_settings`` without the names numpy 2 removed (``np.float_`` ...)."""
    _numpy_aliases()


def _convert_config_dict(self, config_dict: dict) -> dict:
    """``Config._convert_config_dict`` without ``eval``: each string value read as data."""
    from recbole_iisan.utils.values import literal_value

    for key, value in config_dict.items():
        if isinstance(value, str):
            config_dict[key] = literal_value(value)
    return config_dict


def _teacher_by_name(module):
    """``eval`` for RecBole's ``kd_dagfm`` module: a class name of that module, nothing else."""

    def lookup(text: Any, *args: Any) -> Any:
        names = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, torch.nn.Module) and v.__module__ == module.__name__
                       and n != "KD_DAGFM")
        if not isinstance(text, str) or text.strip() not in names:
            raise UserError(f"config key 'teacher' must be one of {names}, got {text!r}")
        return vars(module)[text.strip()]

    lookup.__wrapped__ = eval  # type: ignore[attr-defined]
    return lookup


def _load_split_dataloaders(config: Any) -> None:
    """RecBole's ``load_split_dataloaders`` without ``pickle.load``: always None (the split is built
    from the dataset); a saved dataloader file that is there is named and left unread."""
    path = config["dataloaders_save_path"] or os.path.join(
        config["checkpoint_dir"], f'{config["dataset"]}-for-{config["model"]}-dataloader.pth')
    if os.path.isfile(path):
        import logging

        logging.getLogger().warning(f"{path} is not read: RecBole's saved dataloaders are a pickle, which can run "
                                    f"code when loaded; the split is rebuilt from the dataset (delete the file "
                                    f"to silence this)")
    return None


#: (category, module regex, message regex) of the third-party warnings filtered at import
QUIET_WARNINGS = (
    # pandas 2.3 on RecBole's chained df[col].fillna(..., inplace=True) (Dataset._fill_nan / _load_feat)
    (FutureWarning, r"recbole\.data\.dataset\.dataset",
     r"A value is trying to be set on a copy of a DataFrame or Series through chained assignment"),
    # torch on RecBole's Trainer.__init__: amp.GradScaler(enabled=...) (a no-op on CPU)
    (FutureWarning, r"recbole\.trainer\.trainer", r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated"),
    # numpy 2 on np.argsort(<torch tensor>) in RecBole's Interaction.sort
    (DeprecationWarning, r"numpy\._core\.fromnumeric", r"__array_wrap__ must accept context and return_scalar"),
    # torch >= 2.10 on TorchScript, which --export writes (torch.jit.script / trace / save / load)
    (DeprecationWarning, r"torch\.jit\.", r"`torch\.jit\.\w+` is deprecated"),
)


def _quiet_known_warnings() -> None:
    import warnings

    for category, module, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_ray_warnings() -> None:
    """Ray's notes on its own deprecated API (its ``RayDeprecationWarning``, raised in Ray's modules
    or attributed to the plugin's call): filtered once Ray is imported (``trainer.hyper_tuning``),
    so that importing the plugin never imports Ray."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=r"(ray|recbole_iisan)\.")


def _cuda_ddp(config_dict: dict) -> bool:
    """Whether RecBole's own (NCCL, one GPU per rank) DDP set-up applies."""
    return bool(torch.cuda.is_available() and config_dict.get("use_gpu", True)
                and str(config_dict.get("gpu_id", "")) != "")


def _init_device_cpu_ddp(original):
    """``Config._init_device`` that, for a DDP rank without CUDA, joins with ``gloo`` on the CPU."""

    def _init_device(self) -> None:
        d = self.final_config_dict
        if "local_rank" not in d or _cuda_ddp(d):
            return original(self)
        import torch.distributed as dist

        d["gpu_id"] = ""
        if not dist.is_initialized():
            dist.init_process_group(
                backend="gloo",
                rank=d["local_rank"] + d.get("offset", 0),
                world_size=d["world_size"],
                init_method=f"tcp://{d['ip']}:{d['port']}",
            )
        d["device"] = torch.device("cpu")
        d["single_spec"] = False
        if d["local_rank"] != 0:  # as RecBole: only rank 0 logs and shows progress
            d["state"] = "error"
            d["show_progress"] = False
            d["verbose"] = False

    _init_device.__wrapped__ = original  # type: ignore[attr-defined]
    return _init_device


def non_persistent_buffers(module: torch.nn.Module) -> list[str]:
    """Qualified names of the buffers kept out of ``state_dict`` (IISAN's cached item states and
    log-popularity: identical on every rank, derived from the data, never trained)."""
    out = []
    for prefix, sub in module.named_modules():
        for name in getattr(sub, "_non_persistent_buffers_set", ()):
            out.append(f"{prefix}.{name}" if prefix else name)
    return out


def _ddp_for_device(ddp_class):
    """``DistributedDataParallel`` that drops ``device_ids`` for a model on the CPU (torch refuses
    them there; RecBole always passes ``[local_rank]``), and that does not broadcast the
    non-persistent buffers: RecBole calls the DDP forward once per training step
    (``set_reduce_hook``), and with ``broadcast_buffers`` every call would send rank 0's copy of
    all cached item states (GBs at scale; into every rank's copy-on-write map with
    ``state_storage: mmap``)."""

    def make(module, *args, **kwargs):
        if next(module.parameters()).device.type == "cpu":
            kwargs.pop("device_ids", None)
            kwargs.pop("output_device", None)
        ignore = non_persistent_buffers(module)
        if ignore:
            ddp_class._set_params_and_buffers_to_ignore_for_model(module, ignore)
        return ddp_class(module, *args, **kwargs)

    make.__wrapped__ = ddp_class  # type: ignore[attr-defined]
    return make


def sync_checkpoint_path(trainer: Any) -> None:
    """In DDP, make every rank load the checkpoint rank 0 saved (RecBole names it by each rank's
    own clock, and only rank 0 writes it) and wait until it is written. No-op in one process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    name = [getattr(trainer, "saved_model_file", None)]
    dist.broadcast_object_list(name, src=0)
    trainer.saved_model_file = name[0]
    dist.barrier()


_STRICT_IMPROVEMENT = contextvars.ContextVar("recbole_iisan_strict_improvement", default=False)


@contextlib.contextmanager
def strict_improvement(enabled: bool = True) -> Iterator[None]:
    """Inside, RecBole's early stopping counts a tie with the best score as no improvement."""
    token = _STRICT_IMPROVEMENT.set(bool(enabled))
    try:
        yield
    finally:
        _STRICT_IMPROVEMENT.reset(token)


def _early_stopping_with_strict_rule(original):
    def early_stopping(value, best, cur_step, max_step, bigger=True):
        if _STRICT_IMPROVEMENT.get() and value == best:
            cur_step += 1
            return best, cur_step, cur_step > max_step, False
        return original(value, best, cur_step, max_step, bigger=bigger)

    early_stopping.__wrapped__ = original  # type: ignore[attr-defined]
    return early_stopping


def apply() -> None:
    """Install the shims (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    try:
        import recbole  # noqa: F401
    except ModuleNotFoundError as exc:  # reported in one line by recbole_iisan.config (require_recbole)
        if exc.name == "recbole":
            return
        raise
    # numpy 2: RecBole's aliases, before anything of RecBole's runs (metrics need them in Ray workers)
    _numpy_aliases()
    from recbole.config.configurator import Config

    if Config.compatibility_settings is not _compatibility_settings:
        _compatibility_settings.__wrapped__ = Config.compatibility_settings  # type: ignore[attr-defined]
        Config.compatibility_settings = _compatibility_settings
    # config strings read as data, never eval()'d
    if Config._convert_config_dict is not _convert_config_dict:
        _convert_config_dict.__wrapped__ = Config._convert_config_dict  # type: ignore[attr-defined]
        Config._convert_config_dict = _convert_config_dict
    import recbole.data.utils as rb_data_utils
    import recbole.trainer.trainer as rb_trainer

    if rb_data_utils.load_split_dataloaders is not _load_split_dataloaders:
        _load_split_dataloaders.__wrapped__ = rb_data_utils.load_split_dataloaders  # type: ignore[attr-defined]
        rb_data_utils.load_split_dataloaders = _load_split_dataloaders
    import recbole.model.context_aware_recommender.kd_dagfm as kd_dagfm

    if not hasattr(vars(kd_dagfm).get("eval"), "__wrapped__"):
        kd_dagfm.eval = _teacher_by_name(kd_dagfm)
    _quiet_known_warnings()
    # DDP on CPU (gloo): see the module docstring
    if not hasattr(Config._init_device, "__wrapped__"):
        Config._init_device = _init_device_cpu_ddp(Config._init_device)
    if not hasattr(rb_trainer.early_stopping, "__wrapped__"):
        rb_trainer.early_stopping = _early_stopping_with_strict_rule(rb_trainer.early_stopping)
    if not hasattr(rb_trainer.DistributedDataParallel, "__wrapped__"):
        rb_trainer.DistributedDataParallel = _ddp_for_device(rb_trainer.DistributedDataParallel)
    _APPLIED = True
