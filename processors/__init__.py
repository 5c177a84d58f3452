"""Pure stage logic: no I/O, no Faust."""
