"""RecBole atomic files, downloads, images, datasets and the encoder caches."""


def __getattr__(name: str):  # ``from recbole_iisan.data import prepare``: say where a 0.1 module went
    from recbole_iisan.utils.moved import moved_submodule

    raise moved_submodule(__name__, name)
