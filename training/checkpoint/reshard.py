"""`unimoe ckpt reshard`: the training state of a checkpoint for another expert-/data-parallel size."""

from __future__ import annotations

import glob
import json
import os
import shutil

from training.checkpoint.save import CKPT_SUBDIR, COMPLETE, find_checkpoint, read_meta, write_atomic


def reshard_cli(args) -> int:
    """Same training state for another EP (and DP) size: the portable state is layout-independent, so
    the new tag holds it (+ client state and meta with the target layout); DeepSpeed's own flat files are
    not copied (they only load at their own layout). Resume with `--resume OUT parallel.ep=N`."""
    tag_dir = find_checkpoint(args.ckpt)
    if tag_dir is None:
        print(f"error: {args.ckpt}: no complete checkpoint found")
        return 2
    if not glob.glob(os.path.join(tag_dir, "portable", "tp*_rank*.pt")):
        print(f"error: {tag_dir} has no portable/ state (written by every save of this trainer)")
        return 2
    meta = read_meta(tag_dir)
    layout = dict(meta["layout"])
    moe = meta["config"].get("moe")
    n_exp = (moe or {}).get("num_routed_experts", 8) if moe else None
    dp = args.dp or layout["world_size"] // layout["tp"]
    if moe is None and args.ep != 1:
        print("error: a dense checkpoint has no experts: use --ep 1")
        return 2
    if n_exp is not None and n_exp % args.ep:
        print(f"error: --ep {args.ep} must divide the number of routed experts {n_exp}")
        return 2
    if dp % args.ep:
        print(f"error: --ep {args.ep} must divide the data-parallel size {dp} (set --dp)")
        return 2
    out_tag = os.path.join(args.out, CKPT_SUBDIR, os.path.basename(tag_dir))
    if os.path.exists(out_tag):
        shutil.rmtree(out_tag)
    os.makedirs(out_tag)
    shutil.copytree(os.path.join(tag_dir, "portable"), os.path.join(out_tag, "portable"))
    clients = sorted(glob.glob(os.path.join(tag_dir, "client", "rank*.pt")))
    os.makedirs(os.path.join(out_tag, "client"))
    for f in clients[: dp * layout["tp"]]:
        shutil.copy(f, os.path.join(out_tag, "client"))
    meta["resharded_from"] = {"checkpoint": os.path.abspath(tag_dir), "layout": layout}
    meta["layout"] = {**layout, "ep": args.ep, "world_size": dp * layout["tp"]}
    meta["config"]["parallel"]["ep"] = args.ep
    write_atomic(os.path.join(out_tag, "meta.json"), json.dumps(meta, indent=1, default=str))
    write_atomic(os.path.join(out_tag, COMPLETE), f"{meta['step']}\n")
    write_atomic(os.path.join(args.out, CKPT_SUBDIR, "latest"), os.path.basename(out_tag))
    print(f"resharded {tag_dir} (ep={layout['ep']}, dp={layout['world_size'] // layout['tp']}) -> {out_tag} "
          f"(ep={args.ep}, dp={dp}); continue with: unimoe train --config ... --resume {args.out} "
          f"parallel.ep={args.ep}")
    return 0
