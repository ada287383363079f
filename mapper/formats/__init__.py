"""One file per checkpoint format the mapper reads or writes; ``mapper.checkpoint`` detects which and dispatches.

Each reader returns ``{key in the file: Stored}``: every tensor's stored shape and a function that reads it, so
names and shapes are checked against the config before any data is read (``mapper.checkpoint``).
"""
