"""Fault injection from outside the trainer, for the end-to-end checkpoint tests. Put this directory first
on PYTHONPATH (tests.train_runs.fault_env); Python imports sitecustomize at start-up in every process.

    UNIMOE_TEST_FAIL_WRITE="RANK:PATTERN"   in the rank RANK only, torch.save raises OSError(ENOSPC) for
                                            any file whose path contains PATTERN, as a full disk would
    UNIMOE_TEST_DISK_FREE="BYTES"           shutil.disk_usage reports BYTES free (every process)
"""

import os

_fail = os.environ.get("UNIMOE_TEST_FAIL_WRITE", "")
if _fail and os.environ.get("RANK") == _fail.split(":", 1)[0]:
    import errno

    import torch

    _pattern = _fail.split(":", 1)[1]
    _original_save = torch.save

    def _failing_save(obj, f, *args, **kwargs):
        name = str(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
        if _pattern in name:
            raise OSError(errno.ENOSPC, "No space left on device (injected by tests/faults)", name)
        return _original_save(obj, f, *args, **kwargs)

    torch.save = _failing_save

_free = os.environ.get("UNIMOE_TEST_DISK_FREE")
if _free:
    import shutil

    _original_usage = shutil.disk_usage

    def _full_disk(path):
        return _original_usage(path)._replace(free=int(_free))

    shutil.disk_usage = _full_disk
