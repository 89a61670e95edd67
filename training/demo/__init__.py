"""`unimoe demo`: the whole pipeline on the built-in corpus (run), within a wall-clock budget (budget)."""
