"""How the cost of one network pass depends on the passes per forward call, and on threads (CPU).

    python benchmarks/passes_per_call.py [--work /tmp/unetrpp-own-data] [--nets ct_self,hippocampus,synapse]
        [--calls 1,2,4,8] [--rounds 2]

Networks: the ones ``benchmarks/own_data.py`` trained (``ct_self``: 32 x 96 x 96, ``hippocampus``: 32 x 64 x 32)
and the Synapse preset at 64 x 128 x 128 (random weights; time only). Each setting runs in a process of its
own, interleaved with the others, ``--rounds`` rounds: ``seq B`` is one call of B windows after another with
every intra-op thread; ``threads B`` is two Python threads, one intra-op thread each, each making calls of B
(what a multi-threaded driver would do). Prints milliseconds per window pass and the peak RSS. This chose
:func:`unetrpp.inference.sliding_window.passes_per_call` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def child(net_name: str, mode: str, per_call: int, windows: int, work: Path) -> dict:
    import resource
    import threading
    import time

    import torch

    from unetrpp.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    if net_name == "synapse":
        from unetrpp.network.presets import create_model

        net = create_model("synapse")
    else:
        from unetrpp.inference.predictor import Predictor

        ckpt = work / net_name / "results" / "unetrpp_fold0" / "checkpoint_final.pt"
        if not ckpt.exists():
            raise SystemExit(f"{ckpt}: not there; run benchmarks/own_data.py first")
        net = Predictor.from_checkpoint(ckpt, device="cpu").model
    net.eval()
    net.deep_supervision = False
    x = torch.randn(per_call, 1, *net.config.img_size)
    calls = max(1, windows // per_call)
    with torch.inference_mode():
        net(x)  # warm-up
        if mode == "seq":
            t = time.perf_counter()
            for _ in range(calls):
                net(x)
            done = calls * per_call
        else:
            torch.set_num_threads(1)
            net(x)

            def work_():
                with torch.inference_mode():
                    for _ in range(max(1, calls // 2)):
                        net(x)

            t = time.perf_counter()
            threads = [threading.Thread(target=work_) for _ in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            done = 2 * max(1, calls // 2) * per_call
        seconds = time.perf_counter() - t
    return {"net": net_name, "mode": mode, "per_call": per_call, "ms_per_window": 1000 * seconds / done,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/unetrpp-own-data"))
    ap.add_argument("--nets", default="ct_self,hippocampus,synapse")
    ap.add_argument("--calls", default="1,2,4,8")
    ap.add_argument("--modes", default="seq,threads")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        net_name, mode, per_call = args.child
        windows = {"synapse": 8}.get(net_name, 32)
        print("RESULT " + json.dumps(child(net_name, mode, int(per_call), windows, args.work)), flush=True)
        return
    for r in range(args.rounds):
        for net_name in args.nets.split(","):
            for mode in args.modes.split(","):
                for b in (int(v) for v in args.calls.split(",")):
                    if net_name == "synapse" and b > 4:
                        continue  # 4 windows of 64 x 128 x 128 already take 4 GB
                    out = subprocess.run([sys.executable, str(HERE), "--work", str(args.work), "--child",
                                          net_name, mode, str(b)], capture_output=True, text=True)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        raise SystemExit(f"{net_name} {mode} {b} failed:\n{out.stderr[-2000:]}")
                    res = json.loads(line[7:])
                    print(f"round {r} {net_name:12s} {mode:8s} {b} per call: {res['ms_per_window']:7.1f} ms per "
                          f"window, peak {res['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
