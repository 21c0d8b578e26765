"""The lowest layer, used by every other: files (:mod:`.files`: cache location, atomic writes,
strict JSON), output folders (:mod:`.output_dir`), input validation (:mod:`.validation`) and
collectives between processes (:mod:`.distributed`). Nothing here imports the rest of sdm_hf."""
