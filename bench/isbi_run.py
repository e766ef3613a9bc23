"""Train the paper's network on ISBI 2012 for a fixed time on the GPU and summarise the run as
``OUTDIR/isbi.json`` (collect_results.py copies it into the results JSON as ``"isbi"``).

    python3 bench/isbi_run.py --data PATH/TO/isbi2012 --out OUTDIR --minutes 4

The run is ``python -m unet_cuda.train`` with its GPU defaults (64 base channels, depth 5, 572 px
tiles, 20% of the slices held out) and ``--time-limit``; its checkpoints stay in OUTDIR/isbi-run,
so a later call with ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's unet_cuda


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train-volume.tif and train-labels.tif")
    p.add_argument("--out", required=True, help="output folder (isbi.json and the run's folder go here)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time (default 4)")
    p.add_argument("--val-every", type=int, default=500, help="validate every N steps (default 500)")
    p.add_argument("--resume", action="store_true", help="continue the run already in OUT/isbi-run")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--train-args", default="", help="further options for unet_cuda.train, e.g. a smaller "
                   "network: \"--base-channels 8 --depth 3 --tile 92\"")
    args = p.parse_args(argv)

    from unet_cuda.train import main as train_main

    out = Path(args.out)
    run_dir = out / "isbi-run"
    started = time.time()
    if args.resume:
        argv_train = ["--out", str(run_dir), "--resume", "--steps", "1000000"]
    else:
        argv_train = ["--data", args.data, "--device", args.device, "--out", str(run_dir), "--steps", "1000000",
                      "--val-every", str(args.val_every)] + args.train_args.split()
    code = train_main(argv_train + ["--time-limit", str(args.minutes), "--quiet", "--no-plots"])
    summary: dict = {"exit_code": code, "wall_seconds": round(time.time() - started, 1)}
    history_path = run_dir / "history.json"
    if history_path.is_file():
        history = json.loads(history_path.read_text())
        val = history.get("val") or []
        summary.update({
            "steps": history["loss"][-1][0] if history.get("loss") else 0,
            "train_seconds": round(history.get("seconds", 0.0), 1),
            "final_loss": history["loss"][-1][1] if history.get("loss") else None,
            "validation": val[-1] if val else None,
            "best_pixel_error": min((v["pixel_error"] for v in val), default=None),
            "validation_history": val,
        })
        from unet_cuda.checkpoint import load_checkpoint

        meta = load_checkpoint(run_dir / "last.ckpt")["meta"]
        summary["config"] = {k: meta["config"][k] for k in ("base_channels", "depth", "tile", "lr",
                                                             "warmup_steps", "momentum", "val_fraction", "seed")}
        summary["dataset"] = meta.get("dataset")
    (out / "isbi.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "validation_history"}, indent=1))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
