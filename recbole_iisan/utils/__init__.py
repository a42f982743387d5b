"""What every part uses: the error model (:mod:`.errors`), the RecBole shims (:mod:`.compat`),
atomic files and config access (:mod:`.files`), tables (:mod:`.tables`) and resource measurement
(:mod:`.resources`)."""


def __getattr__(name: str):
    from recbole_iisan.utils.moved import moved_attribute

    raise moved_attribute(__name__, name, {n: "recbole_iisan.utils.files" for n in (
        "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "properties_dir", "bundled_dataset_dir",
        "cli_logging", "PathLike")})
