"""Where the peak RSS of one bench_hf_memory.py configuration goes: glibc heap in use, heap
free-but-retained, mmapped chunks, arena count, and the rest of the process, sampled while the
Trainer runs.

Runs bench_hf_memory.py's worker for one configuration in this process with one extra
Trainer callback: from `on_train_begin` a sampler thread reads VmRSS (/proc/self/statm) every
`--interval` ms and, each time the resident set reaches a new maximum (by more than 4 MiB),
records glibc's mallinfo2 and malloc_info (the number of arenas and each one's size) and the
phase of the step (the module whose forward runs, backward, optimizer).

    PYTHONPATH=. python benchmarks/probe_hf_heap.py mixtral270m-full-fp32-b2s512 --json p.json

The sampler reads the heap a few milliseconds after the resident set moved: the split is of
the sampled maximum, which is at or below VmHWM (both are printed).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_hf_memory as bench

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = bench.MallInfo2
LIBC.fmemopen.restype = ctypes.c_void_p
LIBC.fmemopen.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
LIBC.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
LIBC.fflush.argtypes = [ctypes.c_void_p]
LIBC.fclose.argtypes = [ctypes.c_void_p]
INFO_BUF = ctypes.create_string_buffer(1 << 20)


def heap_state() -> dict:
    """mallinfo2 (every arena) in MiB and malloc_info's per-arena system bytes."""
    m = LIBC.mallinfo2()
    ctypes.memset(INFO_BUF, 0, len(INFO_BUF))
    f = LIBC.fmemopen(ctypes.cast(INFO_BUF, ctypes.c_void_p), len(INFO_BUF), b"w")
    LIBC.malloc_info(0, f)
    LIBC.fflush(f)
    LIBC.fclose(f)
    xml = INFO_BUF.value.decode(errors="replace")
    arenas = []
    for heap in re.findall(r'<heap nr="\d+">(.*?)</heap>', xml, re.S):
        cur = re.search(r'<system type="current" size="(\d+)"/>', heap)
        total_free = re.search(r'<total type="rest" count="\d+" size="(\d+)"/>', heap)
        arenas.append({"system_mib": int(cur.group(1)) / MIB if cur else None,
                       "free_bins_mib": int(total_free.group(1)) / MIB if total_free else None})
    return {"arena_mib": m.arena / MIB, "in_use_mib": m.uordblks / MIB,
            "free_mib": m.fordblks / MIB, "top_releasable_mib": m.keepcost / MIB,
            "mmapped_mib": m.hblkhd / MIB, "mmapped_chunks": m.hblks,
            "free_chunks": m.ordblks, "arenas": arenas}


def rss_bytes(fd: int) -> int:
    return int(os.pread(fd, 128, 0).split()[1]) * PAGE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--interval", type=float, default=2.0, help="ms between samples")
    ap.add_argument("--ckpt-dir", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    ckpt_dir = Path(args.ckpt_dir or Path(bench.tempfile.gettempdir()) / "nvfree-hf-ckpt-bf16")
    row = {r["name"]: r for r in bench.MATRIX}[args.config]
    bench.save_checkpoint(ckpt_dir, row["arch"])

    import torch
    import transformers

    state = {"phase": "init", "step": 0, "peak": 0, "samples": [], "begin": None,
             "stop": False, "trace": []}
    fd = os.open("/proc/self/statm", os.O_RDONLY)

    def sampler():
        last_detail = 0
        while not state["stop"]:
            rss = rss_bytes(fd)
            if rss > state["peak"]:
                state["peak"] = rss
                if rss > last_detail + 4 * MIB:
                    last_detail = rss
                    s = {"rss_mib": rss / MIB, "phase": state["phase"], "step": state["step"],
                         "t": time.perf_counter(), **heap_state()}
                    s["rss_after_mib"] = rss_bytes(fd) / MIB
                    state["samples"].append(s)
            state["trace"].append((time.perf_counter(), rss / MIB, state["phase"]))
            time.sleep(args.interval / 1000)

    def pre(module, _inputs):
        state["phase"] = f"forward {state['names'].get(id(module), type(module).__name__)}"

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, a, s, c, model=None, **kw):
            state["names"] = {id(m): n for n, m in model.named_modules()}
            torch.nn.modules.module.register_module_forward_pre_hook(pre)
            state["begin"] = {"rss_mib": rss_bytes(fd) / MIB, **heap_state()}
            threading.Thread(target=sampler, daemon=True).start()

        def on_step_begin(self, a, s, c, **kw):
            state["step"] = s.global_step + 1
            state["phase"] = "step begin"

        def on_pre_optimizer_step(self, a, s, c, **kw):
            state["phase"] = "optimizer"

        def on_optimizer_step(self, a, s, c, **kw):
            state["phase"] = "after optimizer"

        def on_step_end(self, a, s, c, **kw):
            state["phase"] = "step end"

    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        state["phase"] = "backward"
        return orig_backward(self, *a, **k)

    torch.Tensor.backward = backward
    orig_init = transformers.Trainer.__init__

    def init(self, *a, callbacks=None, **k):
        orig_init(self, *a, callbacks=[*(callbacks or []), Probe()], **k)

    transformers.Trainer.__init__ = init
    out = bench.worker(row, ckpt_dir / row["arch"], args.steps)
    state["stop"] = True
    time.sleep(0.05)
    best = max(state["samples"], key=lambda s: s["rss_mib"]) if state["samples"] else {}
    result = {"config": args.config, "threads": torch.get_num_threads(),
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC")},
              "vmhwm_mib": out["peak_kib"] / 1024, "train_begin": state["begin"],
              "peak_sample": best, "measured": out,
              "samples": state["samples"]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        Path(args.json + ".trace").write_text("\n".join(
            f"{t:.4f} {r:.1f} {p}" for t, r, p in state["trace"]))
    b = state["begin"]
    print(f"{args.config}: threads {result['threads']} VmHWM {result['vmhwm_mib']:.0f} MiB, "
          f"sampled max {best.get('rss_mib', 0):.0f} MiB in {best.get('phase')} "
          f"(step {best.get('step')})")
    for name, s in (("train begin", b), ("peak", best)):
        print(f"  {name:11}: rss {s['rss_mib']:7.0f}  heap arena {s['arena_mib']:7.0f} "
              f"in use {s['in_use_mib']:7.0f} free {s['free_mib']:7.0f} "
              f"(top {s['top_releasable_mib']:.0f})  mmapped {s['mmapped_mib']:7.0f} "
              f"({s['mmapped_chunks']} chunks)  arenas {len(s['arenas'])}: "
              + ", ".join(f"{x['system_mib']:.0f}" for x in s["arenas"] if x["system_mib"]))


if __name__ == "__main__":
    main()
