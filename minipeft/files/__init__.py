"""Files and their safety: reading inputs (:mod:`~minipeft.files.input_files`: regular files only, size-limited,
JSON duplicate keys refused) and writing outputs (:mod:`~minipeft.files.safe_files`: atomically, into folders
minipeft marked as its own, under a lock, never touching others' files)."""
