"""A pickle payload for the tests that check files are loaded without running their code."""


class RunsCode:
    """Unpickling this calls exec(...), which would create the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)
