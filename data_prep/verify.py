"""`unimoe data verify PATH`: the full integrity check (readers only do the cheap one when opening a shard).

PATH = a prep output directory: the size and sha256 of every file listed in shards.json, and that the list
covers every shard of the manifest. PATH = a mix.json: the sha256 of its index file, then every source
directory as above, and that each shard's files still match what the index recorded. Exit 0 when all is
well, 1 naming each problem, 2 when PATH cannot be read.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from data_prep.mix_index import open_index, shard_expect
from data_prep.shard_reader import check_files
from data_prep.shards import sha256_file, shard_name, verify_dir


def verify_mix(mix_json: str, log=print) -> list[tuple[str, str]]:
    with open(mix_json, encoding="utf-8") as f:
        mix = json.load(f)
    base = os.path.dirname(os.path.abspath(mix_json))
    if mix.get("version", 1) < 2:
        dirs = list(dict.fromkeys(src["dir"] for src in mix["sources"]))
        return [problem for d in dirs for problem in verify_dir(d, log)]
    index_path = os.path.join(base, mix["index"]["file"])
    if not os.path.isfile(index_path) or sha256_file(index_path) != mix["index"]["sha256"]:
        problem = (index_path, "missing, or sha256 differs from mix.json: run `unimoe data mix` again")
        log(f"{problem[0]}: {problem[1]}")
        return [problem]
    dirs = [os.path.normpath(os.path.join(base, d)) for d in mix["dirs"]]
    sha256 = functools.cache(sha256_file)  # the .idx files verify_dir hashed are not hashed again below
    bad = [problem for d in dirs for problem in verify_dir(d, log, sha256)]
    stale = []  # shard files that no longer match what the index recorded
    arrays = open_index(index_path, mix["index"])
    for t in range(len(arrays["shard_index"])):
        name = shard_name(int(arrays["shard_index"][t]))
        prefix = os.path.join(dirs[int(arrays["shard_dir"][t])], name)
        for path, check, _ in check_files(prefix, shard_expect(arrays, t, name), sha256):
            stale.append((path, f"differs from the mixture index ({check}): run `unimoe data mix` again"))
    for path, err in stale:
        log(f"{path}: {err}")
    return bad + stale


def run_cli(args) -> int:
    try:
        if os.path.isdir(args.path):
            bad = verify_dir(args.path, log=lambda m: print(m))
        else:
            bad = verify_mix(args.path)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot verify {args.path}: {e}", file=sys.stderr)
        return 2
    print(f"[verify] {args.path}: {'FAILED (' + str(len(bad)) + ' problems)' if bad else 'ok'}")
    return 1 if bad else 0
