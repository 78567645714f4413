"""Files and their safety: reading inputs (:mod:`~minipeft.files.input_files`: regular files only, size-limited,
JSON duplicate keys refused) and writing outputs (:mod:`~minipeft.files.safe_files`: atomically
(:mod:`~minipeft.files.atomic`), into folders minipeft marked as its own (:mod:`~minipeft.files.manifest`), under a
lock (:mod:`~minipeft.files.lock`), never touching others' files)."""
