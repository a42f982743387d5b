"""What a *tower* is: one view of an item (a text built from item fields, or the item's image)
plus the frozen encoder that reads it. IISAN has two towers; their names are the config key
``towers`` (default ``[text, image]``).

Config keys per tower ``<t>`` (``<t>`` is a tower name):
- ``image``: ``image_encoder`` (hub name or local path), ``image_dir`` / the LMDB store made by
  ``prepare --images``; ``missing_image: error | zeros``.
- any other name is a text tower: ``<t>_encoder``, ``<t>_fields`` (item fields joined into the
  text; default the title field), ``<t>_max_length`` (default ``text_max_length``, 30),
  ``<t>_pooling`` (``auto`` = first token for encoder-only models, masked mean for decoders;
  or ``cls`` | ``mean`` | ``last`` | ``mean_unmasked``).
- ``image_pooling`` likewise for the image tower (``auto`` = first token); ``image_backend``
  (``auto | pil | torchvision``) decodes and resizes its images (``towers/image_transform.py``).

The paper's multimodal-text setting (two text views) is ``towers: [text, text2]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping
from recbole_iisan.towers.image_transform import IMAGE_BACKENDS
from recbole_iisan.utils.files import optional, setting

POOLINGS = ("auto", "cls", "mean", "last", "mean_unmasked")
DEFAULT_TITLE_FIELDS = ("title", "movie_title")


from recbole_iisan.utils.errors import TowerConfigError  # noqa: F401


@dataclass(frozen=True)
class TowerSpec:
    """One tower: its name, kind ('text' or 'image'), encoder and inputs."""

    name: str
    kind: str
    encoder: str
    fields: tuple[str, ...] = ()
    max_length: int = 30
    pooling: str = "auto"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.kind == "image"




def tower_specs(config: Mapping, item_fields: list[str] | None = None) -> list[TowerSpec]:
    """The towers a config asks for, validated.

    ``item_fields`` (the columns of the dataset's ``.item`` file) lets the default text field be
    found (``title`` for prepared Amazon data, ``movie_title`` for ml-100k) and unknown fields be
    reported by name.
    """
    names = _tower_names(config)
    if len(names) != 2 or len(set(names)) != 2:
        raise TowerConfigError(f"config key 'towers': expected two different tower names, got {names!r}")
    return [_tower_spec(config, name, item_fields) for name in names]


def _tower_names(config: Mapping) -> list[str]:
    names = setting(config, "towers")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return list(names or [])


def _per_tower(config: Mapping, name: str, suffix: str, fallback: str) -> Any:
    """``<tower><suffix>`` (``text2_pooling``), else the yaml's key for every tower (``pooling``)."""
    value = optional(config, f"{name}{suffix}")
    return setting(config, fallback) if value is None else value


def _tower_spec(config: Mapping, name: str, item_fields: list[str] | None) -> TowerSpec:
    encoder = optional(config, f"{name}_encoder")
    if not encoder:
        raise TowerConfigError(f"config key '{name}_encoder' is not set: give a Hugging Face name or a local path "
                               f"for tower '{name}'")
    pooling = str(_per_tower(config, name, "_pooling", "pooling"))
    if pooling not in POOLINGS:
        raise TowerConfigError(f"config key '{name}_pooling': expected one of {POOLINGS}, got {pooling!r}")
    if name == "image":
        backend = str(setting(config, "image_backend"))
        if backend not in IMAGE_BACKENDS:
            raise TowerConfigError(f"config key 'image_backend': expected one of {IMAGE_BACKENDS}, got {backend!r}")
        return TowerSpec(name, "image", str(encoder), pooling=pooling, extra={"image_backend": backend})
    fields = optional(config, f"{name}_fields")
    if fields is None:
        found = [f for f in DEFAULT_TITLE_FIELDS if item_fields is None or f in item_fields]
        if not found:
            raise TowerConfigError(f"config key '{name}_fields' is not set and the item file has no title field "
                                   f"(it has {item_fields})")
        fields = [found[0]]
    if isinstance(fields, str):
        fields = [f.strip() for f in fields.split(",") if f.strip()]
    if item_fields is not None:
        missing = [f for f in fields if f not in item_fields]
        if missing:
            raise TowerConfigError(f"config key '{name}_fields': {missing} not in the item file (it has {item_fields})")
    max_length = int(_per_tower(config, name, "_max_length", "text_max_length"))
    return TowerSpec(name, "text", str(encoder), tuple(fields), max_length, pooling)


def resolve_towers(config: Any) -> list[str]:
    """Apply the one rule that changes the towers: with ``image_dir`` set and no ``image`` tower
    configured, the second tower becomes the image tower (``--image_dir`` turns a two-text-tower
    default into text + image). Works on a RecBole Config or a dict; returns the tower names."""
    names = _tower_names(config)
    if setting(config, "image_dir") and "image" not in names and len(names) == 2:
        import logging

        logging.getLogger().info(f"image_dir is set: towers {names} -> {[names[0], 'image']}")
        names = [names[0], "image"]
    config["towers"] = names
    return names
