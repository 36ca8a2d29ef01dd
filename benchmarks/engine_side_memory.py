"""What the ctxopt side of a serving engine holds for each kind of method: resident memory and load seconds
after ``load_model(MODEL, prefill_only=True)`` (the tokenizer and config only) and after what a method then reads
(GemFilter's first layers, a SpecPC draft, the whole model). Each case runs in a fresh process.

    OMP_NUM_THREADS=1 python benchmarks/engine_side_memory.py qwen2.5-coder-1.5b \\
        tokenizer first17 draft:qwen2.5-coder-0.5b whole

Cases: ``tokenizer``; ``firstN`` (``LoadedModel.first_layers(N)``: GemFilter at layer N-1); ``draft:NAME`` (the
draft SpecPC loads); ``whole`` (``load_weights()``, what every method loaded before).
"""
from __future__ import annotations

import subprocess
import sys

CASE = r"""
import json, sys, time
from ctxopt.models import load_model

model, case = sys.argv[1], sys.argv[2]
began = time.perf_counter()
lm = load_model(model, prefill_only=True, progress=False)
if case == "whole":
    lm.load_weights()
elif case.startswith("first"):
    lm.first_layers(int(case.removeprefix("first")))
elif case.startswith("draft:"):
    load_model(case.removeprefix("draft:"), lm.device, lm.dtype, progress=False)
elif case != "tokenizer":
    sys.exit(f"unknown case {case!r}: tokenizer, firstN, draft:NAME or whole")
seconds = time.perf_counter() - began
resident = int(open("/proc/self/statm").read().split()[1]) * 4096
print(json.dumps({"case": case, "load_s": round(seconds, 1), "resident_gb": round(resident / 2**30, 2),
                  "dtype": str(lm.dtype).removeprefix("torch."), "whole_model_loaded": lm.loaded}))
"""


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    model = sys.argv[1]
    for case in sys.argv[2:]:
        done = subprocess.run([sys.executable, "-c", CASE, model, case], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
