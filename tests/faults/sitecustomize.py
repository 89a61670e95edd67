"""Fault injection from outside the trainer (tests/test_train_resume.py): put this directory first on
PYTHONPATH and set UNIMOE_TEST_FAIL_WRITE="RANK:PATTERN"; in the process whose RANK is RANK, torch.save
raises OSError(ENOSPC) for any file whose path contains PATTERN, as a full disk would. Python imports
sitecustomize at start-up, so every process of a run (launcher, each rank) sees it; only that rank acts."""

import os

_spec = os.environ.get("UNIMOE_TEST_FAIL_WRITE", "")
if _spec and os.environ.get("RANK") == _spec.split(":", 1)[0]:
    import errno

    import torch

    _pattern = _spec.split(":", 1)[1]
    _original_save = torch.save

    def _failing_save(obj, f, *args, **kwargs):
        name = str(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
        if _pattern in name:
            raise OSError(errno.ENOSPC, "No space left on device (injected by tests/faults)", name)
        return _original_save(obj, f, *args, **kwargs)

    torch.save = _failing_save
