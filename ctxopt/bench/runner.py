"""The benchmark runner: every method x budget on the same seeded samples of every task x length.

For each task and length the samples are loaded once, with the target model's tokenizer, and every
configuration answers exactly those samples. Per sample it records the score (``metrics.score``), TTFT,
decode tokens/s, end-to-end seconds, peak memory, KV bytes and token counts; timings are medians over
``repeats`` runs of the same sample, the prediction and score come from the first run. Results go to the
folder layout of ``ctxopt.bench.report`` (predictions.csv + metrics.json per configuration); a
configuration whose metrics.json exists is skipped unless ``overwrite``.

How a sample becomes a ``Pipeline.ask`` call (``ask_inputs``):
- the sample's ``instruction`` (RULER's task instruction with its in-context example, HotpotQA's and the
  needle test's instruction) becomes the pipeline's instruction, so it sits before the context in the
  prompt, outside the compressible context: no method can drop the task description;
- the context is the sample's passages when it has them (HotpotQA, RULER qa: one Passage per document, so
  passage-level methods see documents), else its ``context`` text as one document (long-document mode);
- the question is the sample's question without RULER's leading "Question:" (the prompt adds its own);
- the answer prefix (RULER) goes to ``answer_prefix=``, after the chat template's assistant turn;
- ``max_new_tokens`` is the task's ``tokens_to_generate`` (32 for HotpotQA) unless given.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from ..errors import InputError
from ..methods import DRAFT, METHODS, build_stages, options_for
from ..models import LoadedModel, load_model
from ..pipeline import Context, Pipeline, as_passages, check_engine_stages, order_stages
from ..prompting import DEFAULT_INSTRUCTION
from ..types import Answer, Stats
from .datasets import Sample, load_task, ruler_tasks
from .memo import PrefillMemo
from .metrics import score
from .report import (
    BASELINE,
    METRICS,
    baseline_rows,
    budget_label,
    config_dir,
    task_dir,
    write_config,
)

HOTPOTQA_NEW_TOKENS = 32  # RULER's tokens_to_generate for its qa tasks


# -- checks before any work -----------------------------------------------------------------------------
def check_tasks(tasks: Iterable[str]) -> None:
    """Every task spec must name a known task: "ruler/<task>", "hotpotqa", "needle" or "needle/hard"."""
    known = {f"ruler/{t}" for t in ruler_tasks()} | {"hotpotqa", "needle", "needle/hard"}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(f"Unknown task(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(sorted(known))}.")


def check_methods(methods: Iterable[str]) -> None:
    """Every method must be registered in METHODS and its factory importable; the error names the method."""
    for method in methods:
        spec = METHODS.get(method)
        if spec is None:
            raise InputError(f"Unknown method {method!r}; registered methods: {', '.join(sorted(METHODS))}.")
        try:
            for part in spec.parts or (method,):
                METHODS[part].load()
        except Exception as error:  # an import can fail in any way (missing dependency, syntax error, ...)
            raise InputError(
                f"Method {method!r} cannot be loaded: importing {METHODS[part].target} failed "
                f"({type(error).__name__}: {error})."
            ) from error


def plan(
    methods: Sequence[str], budgets: Sequence[int | float], include_full: bool = True,
) -> list[tuple[str, int | float | None]]:
    """The (method, budget) configurations in run order: the baseline first, then each method at each budget.

    A method that takes no budget (full, refrag, color) runs once; one whose budget is optional (rapid) runs at
    each budget given, or once at its own default when none is.
    """
    names = list(dict.fromkeys(([BASELINE] if include_full else []) + list(methods)))
    names.sort(key=lambda name: name != BASELINE)
    configs: list[tuple[str, int | float | None]] = []
    for name in names:
        spec = METHODS[name]
        if not spec.takes_budget or (not spec.needs_budget and not budgets):
            configs.append((name, None))
        elif not budgets:
            raise InputError(f"Method {name!r} needs a budget: pass --budget 512 (or several: 512,1024).")
        else:
            configs += [(name, budget) for budget in budgets]
    return configs


# -- one sample -----------------------------------------------------------------------------------------
def ask_inputs(sample: Sample) -> tuple[str, Context, str, str]:
    """(question, context, answer_prefix, instruction) for ``Pipeline.ask``; see the module docstring."""
    question = sample.question.strip()
    if question.startswith("Question:"):
        question = question.removeprefix("Question:").strip()
    context: Context = sample.passages if sample.passages else sample.context
    return question, context, sample.answer_prefix, sample.instruction or DEFAULT_INSTRUCTION


def sample_max_new_tokens(sample: Sample, override: int | None = None) -> int:
    """``override`` if given, else the task's ``tokens_to_generate``, else 32 (HotpotQA)."""
    return override or int(sample.metadata.get("tokens_to_generate") or HOTPOTQA_NEW_TOKENS)


def measurements(answer: Answer, pipe: Pipeline, e2e_seconds: float) -> dict[str, float | None]:
    """The numbers of one run, read off its Stats records.

    TTFT: Stats.ttft_seconds (every record before the decoder's, plus its first-token time). e2e: the ask's
    wall time plus the shared work it reused (``Stats.reused_seconds``). tokens_prefilled: what the prefill (or
    input stage) ran on; tokens_kept: the cache length the decoder started from; kv_bytes: the cache after
    decoding.
    """
    stats: Stats = answer.stats
    decode = stats.decode_record()
    at = stats.stages.index(decode)
    input_stage = pipe.generator.input_stage  # None for an engine that reads token ids
    prefill_record = stats.get(input_stage.name) if input_stage is not None else None
    if prefill_record is None and pipe.engine is not None:
        prefill_record = decode  # the engine prefills inside its request: tokens_in is what it prefilled
    peaks = [r.peak_memory_bytes for r in stats.stages if r.peak_memory_bytes is not None]
    return {
        "ttft_s": stats.ttft_seconds,
        "decode_tokens_per_s": decode.extra.get("tokens_per_second"),
        "e2e_s": e2e_seconds + stats.reused_seconds,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "kv_bytes": decode.kv_bytes,
        "prefill_kv_bytes": prefill_record.kv_bytes if prefill_record else None,
        "tokens_prefilled": prefill_record.tokens_in if prefill_record else None,
        "tokens_kept": stats.stages[at - 1].tokens_out if at else None,
        "new_tokens": decode.tokens_out,
    }


def run_sample(
    lm: LoadedModel, stages: list, sample: Sample, repeats: int = 1, max_new_tokens: int | None = None, seed: int = 0,
    prefill_memo: PrefillMemo | None = None, engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One CSV row: the first run's prediction and scores, the medians of ``repeats`` runs' measurements.

    An exception is caught into the row's ``error`` column instead of stopping the benchmark. With a
    ``prefill_memo``, the prefill is shared with the other configurations that answer this sample.
    """
    question, context, answer_prefix, instruction = ask_inputs(sample)
    pipe = Pipeline(lm, stages=stages, instruction=instruction, prefill_memo=prefill_memo, **(engine or {}))
    row: dict[str, Any] = {"sample_id": sample.id, "question": sample.question, "answers": sample.answers}
    try:
        row["tokens_in"] = len(pipe.build_prompt(question, as_passages(context), answer_prefix))
        runs = []
        for attempt in range(repeats):
            torch.manual_seed(seed)
            began = time.perf_counter()
            answer = pipe.ask(question, context=context, answer_prefix=answer_prefix,
                              max_new_tokens=sample_max_new_tokens(sample, max_new_tokens))
            runs.append(measurements(answer, pipe, time.perf_counter() - began))
            if attempt == 0:
                row.update(prediction=answer.text, **score(sample, answer.text))
        for key in runs[0]:
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = statistics.median(values) if values else None
    except Exception as error:  # one sample's failure must not abort the whole benchmark
        row["error"] = f"{type(error).__name__}: {error}"
    return row


# -- the whole benchmark --------------------------------------------------------------------------------
def machine_info(lm: LoadedModel) -> dict[str, Any]:
    """What the numbers were measured on."""
    on_cuda = lm.device.type == "cuda"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(lm.device) if on_cuda else None,
    }


def _method_options(method: str, options: dict[str, Any], draft: LoadedModel | None) -> dict[str, Any]:
    """The user's options this method takes, plus the draft if it takes one."""
    spec = METHODS[method]
    return {**options_for(spec, options), **({DRAFT: draft} if draft is not None and spec.takes_draft else {})}


def _uses_draft(methods: Iterable[str]) -> bool:
    return any(METHODS[m].takes_draft for m in methods)


def check_options(methods: Iterable[str], options: dict[str, Any]) -> None:
    """Each option is passed to the methods that take it; one that none of them takes is a mistake."""
    methods = list(methods)
    unknown = sorted(name for name in options if not any(name in METHODS[m].options for m in methods))
    if unknown:
        raise InputError(f"No method of {', '.join(methods)} takes the option {', '.join(map(repr, unknown))}; "
                         "`ctxopt methods` lists each method's options.")


def run_configs(
    lm: LoadedModel, stage_lists: Sequence[list], names: Sequence[str], loaded: Sequence[Sample], where: str, *,
    repeats: int, max_new_tokens: int | None, seed: int, share_prefill: bool, progress: bool,
    engine: dict[str, Any] | None = None,
) -> list[list[dict[str, Any]]]:
    """Every configuration's rows on the same samples, one list per entry of ``stage_lists``.

    Without ``share_prefill``: configuration by configuration, sample by sample. With it: sample by sample,
    every configuration on the sample in turn through one ``PrefillMemo``, those with cache stages first (their
    prefill carries the attention capture that the others can reuse, and not the other way round).
    """
    if not share_prefill:
        return [
            [run_sample(lm, stages, sample, repeats, max_new_tokens, seed, engine=engine)
             for sample in tqdm(loaded, desc=f"{where} {name}", unit="sample", disable=not progress)]
            for stages, name in zip(stage_lists, names)
        ]
    order = sorted(range(len(stage_lists)), key=lambda i: not any(s.kind == "cache" for s in stage_lists[i]))
    rows: list[list[dict[str, Any]]] = [[] for _ in stage_lists]
    memo = PrefillMemo()
    desc = f"{where} {len(names)} configs, shared prefill"
    for sample in tqdm(loaded, desc=desc, unit="sample", disable=not progress):
        memo.clear()
        for i in order:
            rows[i].append(run_sample(lm, stage_lists[i], sample, repeats, max_new_tokens, seed, memo, engine))
    return rows


def run_benchmark(
    tasks: Sequence[str],
    lengths: Sequence[int],
    methods: Sequence[str],
    budgets: Sequence[int | float] = (),
    out: str | Path = "bench-out",
    *,
    model: str | LoadedModel = "smollm2-135m",
    draft: str | LoadedModel | None = None,
    samples: int = 10,
    repeats: int = 1,
    seed: int = 0,
    max_new_tokens: int | None = None,
    include_full: bool = True,
    overwrite: bool = False,
    share_prefill: bool = False,
    engine: str | None = None,
    engine_model: str | None = None,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every configuration of ``plan(methods, budgets)`` on every task x length; return their metrics.

    Steps: check tasks and methods (before loading anything); load the model and, if a chosen method takes
    one, the draft (once, shared by every sample); then per task x length load the samples once and run
    each configuration not already done (``run_configs``), writing its predictions.csv and metrics.json.
    Ratios to the baseline are paired by sample with the baseline's predictions.csv in the same task folder.

    ``share_prefill``: configurations that prefill the same prompt (full context and cache stages such as
    SnapKV at every budget) run it once per sample (``PrefillMemo``), and a stage's budget-free pass
    (``Run.shared``: GemFilter's early layers, SpecPC's draft prefill, SpecKV's draft answer) runs once for
    all budgets; each still reports those passes' measured time in its TTFT. The results of a task x length
    are then written when all its samples are done.

    ``engine``: generation goes to that OpenAI-compatible server (``Pipeline(engine=...)``), the `full` row
    included, so every ratio is against the engine's own full-context run; methods that need the KV cache in
    hand are refused before anything runs.
    """
    check_tasks(tasks)
    check_methods(methods)
    options = dict(options or {})
    check_options(methods, options)
    if samples < 1 or repeats < 1:
        raise InputError(f"--samples and --repeats must be >= 1; got {samples} and {repeats}.")
    configs = plan(methods, budgets, include_full)
    if engine is not None:  # refuse what an engine cannot run before loading anything
        for method, budget in configs:
            check_engine_stages(order_stages(build_stages(method, budget, **_method_options(method, options, None))))
    command = command or shlex.join(sys.argv)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device, dtype,
                                                                  prefill_only=engine is not None)
    draft_lm = None
    if draft is not None and _uses_draft(m for m, _ in configs):
        draft_lm = lm if draft == "self" else draft if isinstance(draft, LoadedModel) else load_model(
            draft, lm.device, lm.dtype)
    machine = machine_info(lm)
    engine_options = None if engine is None else {"engine": engine, "engine_model": engine_model}
    if engine is not None:
        machine["engine"] = engine
    results = []
    for task in tasks:
        for length in lengths:
            todo = []
            for method, budget in configs:
                folder = config_dir(out, task, length, method, budget)
                if (folder / METRICS).exists() and not overwrite:
                    print(f"skip {task} {length} {method}-{budget_label(budget)}: {folder / METRICS} exists "
                          "(--overwrite to redo)", file=sys.stderr)
                    results.append(json.loads((folder / METRICS).read_text(encoding="utf-8")))
                else:
                    todo.append((method, budget, folder))
            if not todo:
                continue
            loaded = load_task(task, length, lm.tokenizer, samples, seed)
            stage_lists = [build_stages(m, b, **_method_options(m, options, draft_lm)) for m, b, _ in todo]
            for stage in (stage for stages in stage_lists for stage in stages):
                stage.prepare(lm)  # what loads on first use loads now, outside every timed request
            names = [folder.name for _, _, folder in todo]
            all_rows = run_configs(lm, stage_lists, names, loaded, task_dir("", task, length), repeats=repeats,
                                   max_new_tokens=max_new_tokens, seed=seed, share_prefill=share_prefill,
                                   engine=engine_options,
                                   progress=progress)
            for (method, budget, folder), rows in zip(todo, all_rows):  # plan order: the baseline is written first
                for row in rows:
                    if row.get("error"):
                        print(f"error {folder.name} {row['sample_id']}: {row['error']}", file=sys.stderr)
                info = {
                    "task": task, "length": length, "method": method, "budget": budget, "config": folder.name,
                    "model": lm.name, "draft": draft_lm.name if draft_lm and _uses_draft([method]) else None,
                    "options": dict(options), "samples_requested": samples, "repeats": repeats, "seed": seed,
                    "max_new_tokens": max_new_tokens, "share_prefill": share_prefill, "engine": engine,
                    "command": command,
                    "machine": machine, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                }
                baseline = rows if method == BASELINE else baseline_rows(out, task, length)
                results.append(write_config(folder, rows, baseline, info))
    return results


def dump_samples(
    tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int, tokenizer: Any, path: str | Path
) -> int:
    """Write the benchmark's samples as JSONL (one object per sample) for runners outside ctxopt; returns
    the count. Each object holds the raw sample and the exact ``Pipeline.ask`` inputs the runner uses
    (``ask_question``, ``ask_instruction``, ``answer_prefix``, ``max_new_tokens``)."""
    check_tasks(tasks)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for task in tasks:
            for length in lengths:
                for sample in load_task(task, length, tokenizer, samples, seed):
                    question, _, answer_prefix, instruction = ask_inputs(sample)
                    record = {
                        "task": task, "length": length, "seed": seed, "id": sample.id,
                        "question": sample.question, "answers": sample.answers, "context": sample.context,
                        "passages": [{"text": p.text, "source": p.source, "title": p.metadata.get("title")}
                                     for p in sample.passages or []],
                        "instruction": sample.instruction, "answer_prefix": answer_prefix,
                        "ask_question": question, "ask_instruction": instruction,
                        "max_new_tokens": sample_max_new_tokens(sample), "metadata": sample.metadata,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                    count += 1
    return count
