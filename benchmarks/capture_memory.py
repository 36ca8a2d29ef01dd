"""Peak memory of ctxopt's attention capture against a plain SDPA prefill, and against eager attention.

Each measurement runs in a fresh subprocess (a process's RSS never shrinks back to the allocator, so peaks
of earlier runs would hide later ones). Reported: peak RSS during the prefill minus RSS right before it.

Modes, all over the same random prompt of ``--length`` tokens:
- ``plain``: the prefill SDPA runs anyway (the floor every method pays);
- ``window``: the capture SnapKV and SpecPC use, the last ``--window`` queries at every layer, each layer's
  scores reduced to (heads, n) as those stages do;
- ``gemfilter``: the last query at layer ``--layer``, the forward stopped there;
- ``eager``: transformers' eager attention with ``output_attentions=True`` (the n x n matrices per layer) —
  only up to ``--eager-max`` tokens, since it grows quadratically; its n x n bytes are also computed.

    python benchmarks/capture_memory.py --model smollm2-135m --length 2048,8192
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(model_name: str, length: int, mode: str, window: int, layer: int | None) -> dict:
    """Run one mode in this process and return its numbers."""
    import time

    import torch

    from ctxopt.attention import AttentionCapture, capture_attention
    from ctxopt.decoding import prefill
    from ctxopt.measure import PeakRSS
    from ctxopt.models import load_model

    torch.manual_seed(0)
    lm = load_model(model_name, progress=False)
    config = lm.model.config
    ids = torch.randint(0, config.vocab_size, (length,))
    layer = round(0.4 * config.num_hidden_layers) if layer is None else layer
    monitor = PeakRSS()
    began = time.perf_counter()
    with monitor:
        if mode == "plain":
            prefill(lm.model, ids)
        elif mode == "window":
            request = AttentionCapture(window=window, reducer=lambda a: a.probs().sum(dim=1))
            with capture_attention(lm.model, request):
                prefill(lm.model, ids)
        elif mode == "gemfilter":
            request = AttentionCapture(window=1, layers=[layer], stop_after=layer, reducer=lambda a: a.raw.sum(0))
            with capture_attention(lm.model, request):
                prefill(lm.model, ids)
        elif mode == "eager":
            lm.model.config._attn_implementation = "eager"
            with torch.inference_mode():
                lm.model(input_ids=ids.unsqueeze(0), output_attentions=True, logits_to_keep=1)
        else:
            raise ValueError(mode)
    seconds = time.perf_counter() - began
    heads = config.num_attention_heads
    return {
        "mode": mode, "length": length, "window": window, "layer": layer if mode == "gemfilter" else None,
        "seconds": round(seconds, 2), "peak_increase_mib": round((monitor.peak - monitor.start) / 2**20, 1),
        "eager_nxn_mib_all_layers": round(config.num_hidden_layers * heads * length**2 * 4 / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", default="2048,8192")
    parser.add_argument("--modes", default="plain,window,gemfilter,eager")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--layer", type=int, default=None, help="GemFilter layer (default 40%% of depth)")
    parser.add_argument("--eager-max", type=int, default=2048, help="longest prompt to run eager attention on")
    parser.add_argument("--one", nargs=2, metavar=("LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, int(args.one[0]), args.one[1], args.window, args.layer)))
        return 0
    rows = []
    for length in [int(x) for x in args.length.split(",")]:
        for mode in args.modes.split(","):
            if mode == "eager" and length > args.eager_max:
                continue
            command = [sys.executable, __file__, "--model", args.model, "--window", str(args.window),
                       "--one", str(length), mode] + ([] if args.layer is None else ["--layer", str(args.layer)])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| length | mode | peak RSS increase MiB | seconds | eager n x n, all layers, MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['mode']} | {r['peak_increase_mib']} | {r['seconds']} "
              f"| {r['eager_nxn_mib_all_layers']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
