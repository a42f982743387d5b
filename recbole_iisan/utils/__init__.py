"""What every part uses: the error model (:mod:`.errors`), the RecBole shims (:mod:`.compat`),
atomic files (:mod:`.files`), tables (:mod:`.tables`) and resource measurement (:mod:`.resources`)."""
