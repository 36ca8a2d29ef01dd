"""NVIDIA kvpress's SnapKVPress and ExpectedAttentionPress on ctxopt's benchmark samples, side by side.

Runs in its OWN virtual environment (kvpress pins transformers < 5.3; ctxopt needs >= 5): see README.md
beside this file. It never imports ctxopt: the samples come from ``ctxopt bench dump-samples`` (JSONL), and
two standard-library-only files of this repository are loaded by path, ``ctxopt/bench/metrics.py`` (the same
scoring) and ``ctxopt/bench/report.py`` (the same predictions.csv / metrics.json layout), so that
``ctxopt bench report OUT`` shows ctxopt's and kvpress's configurations in one table.

Per sample, through kvpress's own "kv-press-text-generation" pipeline (greedy decoding):
- Prompt: the user message ctxopt builds (instruction, "Context:", the context or its "[i]"-numbered
  passages, "Question: ..."), through the model's chat template, then the answer prefix. Query-aware by
  default: the whole user message is kvpress's ``context`` (so the press sees the question, as ctxopt's
  methods do) and kvpress's ``question`` is empty; ``--no-query-aware`` gives kvpress the question apart,
  uncompressed, as its own evaluation does by default.
- Budget -> kvpress ``compression_ratio``: 1 - (budget - question tokens) / context tokens, clipped to [0, 1),
  so the cache holds about ``budget`` positions when decoding starts, as for ctxopt's methods.
- Timings (forward hooks, no change to kvpress's code): TTFT from the start of the context prefill to the
  end of the forward that yields the first answer token; decode tokens/s over the remaining forwards;
  end to end is the whole pipeline call (tokenization included).
- Memory: KV bytes measured from the cache tensors right after the context prefill (kvpress compresses
  layer by layer inside the prefill, so this is already compressed: "prefill KV") and after the last decode
  step; peak memory is the process RSS (CPU) or torch's peak allocation (CUDA).
Configurations: "kvpress-full" (no press: the baseline these rows' ratios are paired with),
"kvpress-snapkv-<budget>", "kvpress-expected-attention-<budget>".
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
import transformers
from kvpress import ExpectedAttentionPress, SnapKVPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

REPO = Path(__file__).resolve().parents[2]
PRESSES = {"snapkv": SnapKVPress, "expected-attention": ExpectedAttentionPress}
BASELINE = "kvpress-full"


def load_by_path(name: str, path: Path) -> ModuleType:
    """Import one standard-library-only file of the repository without importing ctxopt."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and type hints look the module up by name
    spec.loader.exec_module(module)
    return module


def user_message(record: dict[str, Any], query_aware: bool) -> str:
    """ctxopt's user message (prompting._user_message) for the dumped sample."""
    passages = [p["text"] for p in record["passages"]] or [record["context"]]
    numbered = [f"[{i}] {text}" if len(passages) > 1 else text for i, text in enumerate(passages, start=1)]
    text = record["ask_instruction"] + "\n\n" + "Context:\n" + "".join(p + "\n\n" for p in numbered)
    return text + ("Question: " + record["ask_question"] if query_aware else "")


def press_reads_prompt_tail(pipe: Any) -> None:
    """Make kvpress prefill (and so press) the chat template's generation prompt and the answer prefix too.

    kvpress compresses the context before it reads the "question" part (the template's assistant header and
    the answer prefix), so its observation window ends at the user message; ctxopt's cache stages, like the
    SnapKV paper's code, prefill the whole prompt and observe its last tokens. This moves every question token
    but the last into the context, so both presses observe the same window (the last token, fed after
    compression, gives the first answer logits).
    """
    preprocess = pipe.preprocess

    def with_tail_in_context(*args: Any, **kwargs: Any) -> dict[str, Any]:
        ids = preprocess(*args, **kwargs)
        question = ids["questions_ids"][0]
        ids["context_ids"] = torch.cat([ids["context_ids"], question[:, :-1]], dim=1)
        ids["questions_ids"] = [question[:, -1:]]
        return ids

    pipe.preprocess = with_tail_in_context


def kv_bytes(cache: Any) -> int:
    """Bytes of the key and value tensors held by a transformers cache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


class PeakMemory:
    """Peak process RSS sampled by a thread (CPU), or torch's peak allocation (CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()


class Clock:
    """Forward hooks that timestamp the context prefill (inner model) and every answer-token forward (outer)."""

    def __init__(self, model: Any, cache: Any):
        self.model, self.cache = model, cache
        self.start: float | None = None
        self.prefill_kv_bytes: int | None = None
        self.prefill_length: int | None = None
        self.steps: list[float] = []
        self.final_kv_bytes: int | None = None
        self._handles = []

    def _now(self) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def _inner_start(self, *_: Any) -> None:
        if self.start is None:
            self.start = self._now()

    def _inner_end(self, *_: Any) -> None:
        if self.prefill_kv_bytes is None:
            self.prefill_kv_bytes, self.prefill_length = kv_bytes(self.cache), self.cache.get_seq_length()

    def _outer_end(self, *_: Any) -> None:
        self.steps.append(self._now())
        self.final_kv_bytes = kv_bytes(self.cache)

    def __enter__(self) -> "Clock":
        inner = self.model.model
        self._handles = [inner.register_forward_pre_hook(self._inner_start),
                         inner.register_forward_hook(self._inner_end),
                         self.model.register_forward_hook(self._outer_end)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def run_once(pipe: Any, record: dict[str, Any], press_name: str | None, budget: int | None,
             query_aware: bool, max_new_tokens: int) -> tuple[str, dict[str, Any]]:
    """One pipeline call: the answer and its measurements."""
    context = user_message(record, query_aware)
    question = "" if query_aware else record["ask_question"]
    ids = pipe.preprocess(context, questions=[question], answer_prefix=record["answer_prefix"],
                          max_context_length=10**10)
    context_tokens, question_tokens = ids["context_ids"].shape[1], ids["questions_ids"][0].shape[1]
    press = None
    if press_name is not None:
        ratio = min(max(1.0 - (budget - question_tokens) / context_tokens, 0.0), 0.999)
        press = PRESSES[press_name](compression_ratio=ratio)
    cache = DynamicCache()
    device = pipe.model.device
    with PeakMemory(device) as memory, Clock(pipe.model, cache) as clock:
        began = time.perf_counter()
        answer = pipe(context, question=question, answer_prefix=record["answer_prefix"], press=press,
                      max_new_tokens=max_new_tokens, cache=cache)["answer"]
        e2e = time.perf_counter() - began
    steps = clock.steps
    return answer.strip(), {
        "ttft_s": steps[0] - clock.start,
        "decode_tokens_per_s": (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else None,
        "e2e_s": e2e,
        "peak_memory_bytes": memory.peak,
        "kv_bytes": clock.final_kv_bytes,
        "prefill_kv_bytes": clock.prefill_kv_bytes,
        "tokens_in": context_tokens + question_tokens,
        "tokens_prefilled": context_tokens + question_tokens,
        "tokens_kept": clock.prefill_length + question_tokens,
        "new_tokens": len(steps),
    }


def run_sample(pipe: Any, metrics: ModuleType, record: dict[str, Any], press_name: str | None,
               budget: int | None, repeats: int, query_aware: bool, max_new_tokens: int | None) -> dict[str, Any]:
    """One CSV row: the first run's answer and scores, medians of the runs' measurements; errors caught."""
    row: dict[str, Any] = {"sample_id": record["id"], "question": record["question"], "answers": record["answers"]}
    try:
        runs = []
        for attempt in range(repeats):
            answer, numbers = run_once(pipe, record, press_name, budget, query_aware,
                                       max_new_tokens or record["max_new_tokens"])
            runs.append(numbers)
            if attempt == 0:
                sample = SimpleNamespace(task=record["task"], answers=record["answers"], metadata=record["metadata"])
                row.update(prediction=answer, **metrics.score(sample, answer))
        for key in runs[0]:
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = statistics.median(values) if values else None
    except Exception as error:  # one sample's failure must not abort the run
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="JSONL written by `ctxopt bench dump-samples`")
    parser.add_argument("--model", default=str(Path("~/.cache/ctxopt/models/smollm2-135m").expanduser()),
                        help="model folder (ctxopt's converted registry models live in ~/.cache/ctxopt/models/)")
    parser.add_argument("--model-name", default=None, help="name recorded in metrics.json (default: folder name)")
    parser.add_argument("--out", required=True, help="results folder (the same one as `ctxopt bench --out`)")
    parser.add_argument("--budget", required=True, help="comma-separated token budgets, e.g. 512,1024")
    parser.add_argument("--presses", default=",".join(PRESSES), help=f"comma-separated, from {sorted(PRESSES)}")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the sample's max_new_tokens (the task's); use ctxopt bench's value")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--no-query-aware", action="store_true", help="keep the question out of the press")
    parser.add_argument("--no-full", action="store_true", help="skip the no-press baseline")
    parser.add_argument("--press-prompt-tail", action="store_true",
                        help="let the press observe the generation prompt and answer prefix, as ctxopt's does")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--repo", default=str(REPO), help="the ctxopt checkout to read metrics.py/report.py from")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Steps: load the repo's metrics/report files, the samples and the model; then per task x length, per
    configuration not done yet, answer every sample and write predictions.csv + metrics.json."""
    args = parse_args(argv)
    bench = Path(args.repo) / "ctxopt" / "bench"
    metrics = load_by_path("ctxopt_bench_metrics", bench / "metrics.py")
    report = load_by_path("ctxopt_bench_report", bench / "report.py")
    records = [json.loads(line) for line in Path(args.samples).read_text(encoding="utf-8").splitlines() if line.strip()]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["length"])].append(record)
    unknown = [p for p in args.presses.split(",") if p not in PRESSES]
    if unknown:
        raise SystemExit(f"unknown press(es) {unknown}; choose from {sorted(PRESSES)}")
    configs = ([] if args.no_full else [(None, None)]) + [
        (press, int(b)) for press in args.presses.split(",") for b in args.budget.split(",")]

    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=device)
    if args.press_prompt_tail:
        press_reads_prompt_tail(pipe)
    model_name = args.model_name or Path(args.model).name
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "kvpress": importlib.metadata.version("kvpress"),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    for (task, length), group in groups.items():
        for press_name, budget in configs:
            method = BASELINE if press_name is None else f"kvpress-{press_name}"
            folder = report.config_dir(args.out, task, length, method, budget)
            if (folder / report.METRICS).exists() and not args.overwrite:
                print(f"skip {folder}: metrics.json exists (--overwrite to redo)", file=sys.stderr)
                continue
            rows = []
            for index, record in enumerate(group, start=1):
                rows.append(run_sample(pipe, metrics, record, press_name, budget, args.repeats,
                                       not args.no_query_aware, args.max_new_tokens))
                print(f"{task}-{length} {folder.name} {index}/{len(group)} "
                      f"{rows[-1].get('error') or 'score %.2f' % rows[-1]['score']}", flush=True)
            baseline = rows if method == BASELINE else report.baseline_rows(args.out, task, length, BASELINE)
            info = {
                "task": task, "length": length, "method": method, "budget": budget, "config": folder.name,
                "model": model_name, "draft": None, "options": {
                    "query_aware": not args.no_query_aware, "press_prompt_tail": args.press_prompt_tail},
                "samples_requested": len(group), "repeats": args.repeats, "seed": group[0].get("seed"),
                "max_new_tokens": args.max_new_tokens, "command": shlex.join([sys.executable, *sys.argv]),
                "machine": machine,
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "baseline": BASELINE,
            }
            report.write_config(folder, rows, baseline, info)
            print(f"wrote {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
