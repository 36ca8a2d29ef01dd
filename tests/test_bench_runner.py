"""The benchmark runner, its results folder and report, the CLI wiring, and benchmarks/gpu_speed.py --smoke.

Real runs use the tiny random Llama of conftest.py on tiny RULER samples (ruler/niah_single_1 at 512 tokens of
the MiniLM tokenizer); nothing here asserts on timings.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxopt.bench import report as rep
from ctxopt.bench.runner import ask_inputs, check_methods, dump_samples, plan, run_benchmark
from ctxopt.cli import main
from ctxopt.errors import InputError
from ctxopt.methods import METHODS, MethodSpec
from ctxopt.stages import TokenStage

REPO = Path(__file__).resolve().parents[1]
TASK, LENGTH = "ruler/niah_single_1", 512
REQUIRED_COLUMNS = {"sample_id", "question", "answers", "prediction", "score", "ttft_s", "decode_tokens_per_s",
                    "e2e_s", "peak_memory_bytes", "kv_bytes", "prefill_kv_bytes", "tokens_in", "tokens_prefilled",
                    "tokens_kept", "new_tokens", "error"}
REQUIRED_KEYS = {"task", "length", "method", "budget", "model", "command", "machine", "date", "n", "n_errors",
                 "accuracy", "scores", "medians", "ratios_to_full", "seed", "repeats"}


def bench(tiny_lm, out: Path, methods=("truncate",), budgets=(192,), **kwargs):
    """A tiny benchmark: 2 samples, 3 new tokens, no progress bars."""
    return run_benchmark([TASK], [LENGTH], list(methods), list(budgets), out, model=tiny_lm, samples=2,
                         max_new_tokens=3, progress=False, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def ran(tiny_lm, tmp_path_factory):
    """One real run of full + truncate, shared by the tests that only read its folder."""
    out = tmp_path_factory.mktemp("bench")
    return out, bench(tiny_lm, out)


def test_runner_writes_well_formed_csv_and_json(ran):
    out, results = ran
    assert [(m["method"], m["budget"]) for m in results] == [("full", None), ("truncate", 192)]
    for method, budget in (("full", None), ("truncate", 192)):
        folder = rep.config_dir(out, TASK, LENGTH, method, budget)
        rows = read_csv(folder / "predictions.csv")
        assert len(rows) == 2 and REQUIRED_COLUMNS <= set(rows[0])
        assert all(not row["error"] for row in rows), rows
        assert all(json.loads(row["answers"]) for row in rows)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert REQUIRED_KEYS <= set(metrics)
        assert metrics["n"] == 2 and metrics["n_errors"] == 0 and 0.0 <= metrics["accuracy"] <= 1.0
        assert {"platform", "cpu_count", "torch", "transformers", "device", "dtype"} <= set(metrics["machine"])
        assert metrics["ratios_to_full"]["ttft_s"] is not None
    truncated = rep.read_predictions(rep.config_dir(out, TASK, LENGTH, "truncate", 192) / "predictions.csv")
    assert all(r["tokens_prefilled"] <= 192 < r["tokens_in"] and r["new_tokens"] == 3 for r in truncated)
    assert rep.load_results(out)[0]["ratios_to_full"]["ttft_s"] == 1.0  # full against itself


def test_every_method_answers_the_same_samples(ran):
    out, _ = ran
    full, truncated = (read_csv(rep.config_dir(out, TASK, LENGTH, m, b) / "predictions.csv")
                       for m, b in (("full", None), ("truncate", 192)))
    assert [(r["sample_id"], r["question"], r["answers"]) for r in full] == \
           [(r["sample_id"], r["question"], r["answers"]) for r in truncated]


def test_done_configurations_are_skipped_unless_overwrite(ran, tiny_lm, monkeypatch):
    out, first = ran
    import ctxopt.bench.runner as runner

    def fail(*args, **kwargs):
        raise AssertionError("a finished configuration ran again")

    monkeypatch.setattr(runner, "run_sample", fail)
    again = bench(tiny_lm, out)
    assert [m["date"] for m in again] == [m["date"] for m in first]
    monkeypatch.undo()
    metrics = rep.config_dir(out, TASK, LENGTH, "truncate", 192) / "metrics.json"
    before = metrics.stat().st_mtime_ns
    bench(tiny_lm, out, methods=("truncate",), include_full=False, overwrite=True)
    assert metrics.stat().st_mtime_ns != before


def test_shared_prefill_gives_the_same_rows_with_one_prefill_per_sample(tiny_lm, tmp_path, monkeypatch):
    import ctxopt.stages as stages  # the token prefill (TokenPrefill) runs decoding.prefill from there

    prefills = []
    real_prefill = stages.prefill

    def counting_prefill(model, input_ids, **kwargs):
        prefills.append(input_ids.shape[-1])
        return real_prefill(model, input_ids, **kwargs)

    monkeypatch.setattr(stages, "prefill", counting_prefill)
    runs = {}
    for share in (False, True):
        prefills.clear()
        out = tmp_path / f"share-{share}"
        results = bench(tiny_lm, out, methods=("snapkv",), budgets=(128, 256), share_prefill=share)
        runs[share] = {m["config"]: read_csv(rep.config_dir(out, TASK, LENGTH, m["method"], m["budget"])
                                             / "predictions.csv") for m in results}
        assert len(prefills) == (2 if share else 6)  # 2 samples x (full, snapkv-128, snapkv-256)
    keys = ("sample_id", "prediction", "score", "tokens_prefilled", "tokens_kept", "kv_bytes", "error")
    assert list(runs[True]) == ["full-none", "snapkv-128", "snapkv-256"]
    for config, rows in runs[False].items():
        assert [[r[k] for k in keys] for r in runs[True][config]] == [[r[k] for k in keys] for r in rows], config
    assert {r["tokens_kept"] for r in runs[True]["snapkv-128"]} == {"128"}
    assert all(float(r["e2e_s"]) >= float(r["ttft_s"]) for rows in runs[True].values() for r in rows)


def test_shared_selection_passes_give_the_same_rows_with_one_pass_per_sample(tiny_lm, tmp_path, monkeypatch):
    import ctxopt.compressors.gemfilter as gemfilter
    import ctxopt.compressors.speckv as speckv
    import ctxopt.compressors.specpc as specpc

    passes = []

    def counting(real, name):
        def counted(*args, **kwargs):
            passes.append(name)
            return real(*args, **kwargs)

        return counted

    for module, name in ((gemfilter, "early_layer_scores"), (specpc, "draft_scores"), (speckv, "decode")):
        monkeypatch.setattr(module, name, counting(getattr(module, name), name))
    runs = {}
    for share in (False, True):
        passes.clear()
        out = tmp_path / f"share-{share}"
        results = bench(tiny_lm, out, methods=("gemfilter", "specpc", "speckv"), budgets=(128, 256),
                        include_full=False, share_prefill=share, options={"first_layer": 1})
        runs[share] = {m["config"]: read_csv(rep.config_dir(out, TASK, LENGTH, m["method"], m["budget"])
                                             / "predictions.csv") for m in results}
        per_pass = 2 * (1 if share else 2)  # 2 samples, each pass once or once per budget
        assert sorted(passes) == sorted(["early_layer_scores", "draft_scores", "decode"] * per_pass), passes
    keys = ("sample_id", "prediction", "score", "tokens_prefilled", "tokens_kept", "kv_bytes", "error")
    assert len(runs[True]) == 6 and not any(r["error"] for rows in runs[True].values() for r in rows)
    assert all(float(r["e2e_s"]) >= float(r["ttft_s"]) for rows in runs[True].values() for r in rows)
    for config, rows in runs[False].items():
        assert [[r[k] for k in keys] for r in runs[True][config]] == [[r[k] for k in keys] for r in rows], config


def test_draft_self_drafts_with_the_model_itself(tiny_lm, tmp_path):
    """``--draft self`` (what the README offers) is the model drafting for itself: the same rows as a draft
    given as the model object, and the draft recorded under the model's name."""
    rows = {}
    for name, draft in (("self", "self"), ("object", tiny_lm)):
        [result] = bench(tiny_lm, tmp_path / name, methods=("specpc",), budgets=(128,), include_full=False,
                         draft=draft, options={"first_layer": 1})
        assert result["draft"] == tiny_lm.name
        rows[name] = read_csv(rep.config_dir(tmp_path / name, TASK, LENGTH, "specpc", 128) / "predictions.csv")
    keys = ("sample_id", "prediction", "tokens_kept")
    assert [[r[k] for k in keys] for r in rows["self"]] == [[r[k] for k in keys] for r in rows["object"]]


def test_a_reused_selection_pass_is_charged_to_the_stage(tiny_lm):
    from ctxopt.bench.memo import PrefillMemo
    from ctxopt.compressors.gemfilter import GemFilter
    from ctxopt.pipeline import Pipeline

    memo, context = PrefillMemo(), " ".join(f"word{i}" for i in range(120))
    records = []
    for budget in (16, 32):
        pipe = Pipeline(tiny_lm, stages=[GemFilter(budget, layer=1)], max_new_tokens=2, prefill_memo=memo)
        records.append(next(r for r in pipe.ask("Which word?", context=context).stats.stages
                            if r.stage == "gemfilter"))
    first, second = records
    assert first.extra["selection_reused"] is False and second.extra["selection_reused"] is True
    assert first.tokens_out == 16 and second.tokens_out == 32
    passed = memo.find_pass(("gemfilter", tiny_lm, 1), memo._passes[0][1])[1]
    assert second.extra["shared_pass_seconds"] == passed.seconds and second.seconds >= passed.seconds
    assert second.extra["selection_seconds"] >= passed.seconds
    assert second.peak_memory_bytes >= passed.peak_memory_bytes


def test_prefill_memo_shares_only_equal_captures(tiny_lm):
    from functools import partial

    import torch

    from ctxopt.attention import AttentionCapture
    from ctxopt.bench.memo import PrefillMemo, capture_signature
    from ctxopt.compressors.snapkv import snapkv_scores
    from ctxopt.decoding import prefill
    from ctxopt.measure import measure

    def request(**keywords):
        return AttentionCapture(window=8, reducer=partial(snapkv_scores, **keywords))

    assert capture_signature(request(kernel=5, pooling="max")) == capture_signature(request(kernel=5, pooling="max"))
    assert capture_signature(request(kernel=5, pooling="max")) != capture_signature(request(kernel=3, pooling="max"))
    assert capture_signature(request(kernel=torch.ones(1))) is None  # a tensor argument cannot be compared
    assert capture_signature(AttentionCapture(window=8, stop_after=1)) is None  # an early stop leaves a partial cache

    ids = torch.arange(5, 40).unsqueeze(0)
    memo = PrefillMemo()
    with measure("prefill") as record:
        state = prefill(tiny_lm.model, ids)
    memo.store(ids, None, state, record)
    assert memo.lookup(ids, request(kernel=5, pooling="max")) is None  # stored without a capture: no records
    copy, reused = memo.lookup(ids, None)
    assert reused.seconds == record.seconds and copy.cache is not state.cache
    assert torch.equal(copy.cache.layers[0].keys, state.cache.layers[0].keys)
    assert memo.lookup(ids[:, :-1], None) is None
    captured = request(kernel=5, pooling="max")
    captured.records.update({0: torch.ones(2)})
    memo.store(ids, captured, state, record)
    again = request(kernel=5, pooling="max")
    assert memo.lookup(ids, again) is not None and torch.equal(again.records[0], torch.ones(2))
    memo.clear()
    assert memo.lookup(ids, None) is None


class Boom(TokenStage):
    name = "boom"

    def select(self, prompt, run):
        raise RuntimeError("boom on purpose")


def boom_stages(budget, **_):
    return [Boom()]


def test_sample_errors_go_into_the_csv(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "boom", MethodSpec(f"{__name__}:boom_stages", "always fails"))
    results = bench(tiny_lm, tmp_path, methods=("boom",), include_full=False)
    assert results[0]["n_errors"] == 2 and results[0]["accuracy"] == 0.0
    rows = read_csv(rep.config_dir(tmp_path, TASK, LENGTH, "boom", 192) / "predictions.csv")
    assert all("boom on purpose" in row["error"] for row in rows)


def test_unknown_or_broken_methods_fail_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="'nope'"):
        run_benchmark([TASK], [LENGTH], ["truncate", "nope"], [192], tmp_path, model="no-such-model")
    monkeypatch.setitem(METHODS, "broken", MethodSpec("ctxopt.no_such_module:factory", "cannot import"))
    with pytest.raises(InputError, match="'broken'.*ctxopt.no_such_module"):
        check_methods(["broken"])
    with pytest.raises(InputError, match="Unknown task"):
        run_benchmark(["ruler/nope"], [LENGTH], ["full"], [], tmp_path, model="no-such-model")
    assert not any(tmp_path.iterdir())
    assert main(["bench", "--task", TASK, "--methods", "nope", "--out", str(tmp_path)]) == 2


def test_plan_puts_full_first_and_runs_budgetless_methods_once():
    assert plan(["truncate", "full"], [64, 128]) == [("full", None), ("truncate", 64), ("truncate", 128)]
    assert plan(["truncate"], [64], include_full=False) == [("truncate", 64)]
    with pytest.raises(InputError, match="needs a budget"):
        plan(["truncate"], [])
    # RAPID's budget (its drafter's context) is optional: each budget when given, else once at its default.
    assert plan(["rapid", "refrag"], [64, 128], include_full=False) == [("rapid", 64), ("rapid", 128), ("refrag", None)]
    assert plan(["rapid"], [], include_full=False) == [("rapid", None)]


def test_paired_ratio_pairs_samples_by_id():
    baseline = [{"sample_id": "a", "ttft_s": 2.0}, {"sample_id": "b", "ttft_s": 4.0},
                {"sample_id": "c", "ttft_s": 1.0}, {"sample_id": "d", "ttft_s": 5.0, "error": "x"}]
    rows = [{"sample_id": "b", "ttft_s": 1.0}, {"sample_id": "a", "ttft_s": 1.0},
            {"sample_id": "c", "ttft_s": 3.0}, {"sample_id": "d", "ttft_s": 1.0}, {"sample_id": "e", "ttft_s": 9.0}]
    # pairs: b 1/4, a 1/2, c 3/1 (d: the baseline errored, e: no baseline) -> median 0.5
    assert rep.paired_ratio(rows, baseline, "ttft_s") == 0.5
    # b and a only: median(1/4, 1/2) = 0.375, where the ratio of medians would be median(1, 1) / median(2, 4) = 1/3
    assert rep.paired_ratio(rows[:2], baseline, "ttft_s") == pytest.approx(0.375)
    assert rep.paired_ratio(rows, [], "ttft_s") is None


def handmade_row(sample, score, ttft, kept):
    return {"sample_id": sample, "question": f"q {sample}", "answers": ["x"], "prediction": "x",
            "score": score, "em": score, "f1": score, "ttft_s": ttft, "decode_tokens_per_s": 10.0,
            "e2e_s": ttft + 1, "peak_memory_bytes": 2**30, "kv_bytes": kept * 2**12,
            "prefill_kv_bytes": 4096 * 2**12, "tokens_in": 4096, "tokens_prefilled": kept,
            "tokens_kept": kept, "new_tokens": 8}


HANDMADE_INFO = {"task": "hotpotqa", "length": 4096, "model": "m", "repeats": 1, "seed": 0,
                 "machine": {"device": "cpu"}}


def handmade_folder(out: Path, snapkv_first: bool = False) -> None:
    """Two configurations of one task written through report.write_config with hand-made rows; with
    ``snapkv_first`` snapkv is written as if it ran before the baseline (no ratios in its metrics.json)."""
    full = [handmade_row("s1", 1.0, 2.0, 4096), handmade_row("s2", 0.0, 4.0, 4096)]
    mine = [handmade_row("s1", 1.0, 0.5, 512), handmade_row("s2", 1.0, 2.0, 512)]
    rep.write_config(rep.config_dir(out, "hotpotqa", 4096, "snapkv", 512), mine, None if snapkv_first else full,
                     {**HANDMADE_INFO, "method": "snapkv", "budget": 512})
    rep.write_config(rep.config_dir(out, "hotpotqa", 4096, "full", None), full, full,
                     {**HANDMADE_INFO, "method": "full", "budget": None})


def test_report_table_and_markdown_from_a_handmade_folder(tmp_path):
    handmade_folder(tmp_path)
    text = rep.report(tmp_path, plots=False)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["task", "length", "method", "budget"]
    snapkv = next(line for line in lines if " snapkv " in line).split()
    assert snapkv[:7] == ["hotpotqa", "4096", "snapkv", "512", "2", "0", "100.0"]
    assert snapkv[8] == "0.38"  # median(0.5 / 2, 2 / 4)
    assert snapkv[-1] == "512/4096"
    markdown = (tmp_path / "report.md").read_text()
    assert "| hotpotqa | 4096 | full | none | 2 | 0 | 50.0 |" in markdown
    assert markdown.count("\n|") == 4  # header, rule, two rows
    metrics = json.loads((rep.config_dir(tmp_path, "hotpotqa", 4096, "snapkv", 512) / "metrics.json").read_text())
    assert metrics["scores"] == {"em": 1.0, "f1": 1.0, "score": 1.0}


def test_report_pairs_ratios_from_the_predictions_on_disk(tmp_path):
    handmade_folder(tmp_path, snapkv_first=True)
    snapkv_folder = rep.config_dir(tmp_path, "hotpotqa", 4096, "snapkv", 512)
    assert json.loads((snapkv_folder / "metrics.json").read_text())["ratios_to_full"] is None
    # a peer's rows pair with the baseline its runner recorded, not with ctxopt's full context
    peer = [handmade_row("s1", 1.0, 3.0, 512), handmade_row("s2", 1.0, 3.0, 512)]
    peer_full = [handmade_row("s1", 1.0, 6.0, 4096), handmade_row("s2", 1.0, 12.0, 4096)]
    for method, budget, rows in (("kvpress-snapkv", 512, peer), ("kvpress-full", None, peer_full)):
        rep.write_config(rep.config_dir(tmp_path, "hotpotqa", 4096, method, budget), rows, None,
                         {**HANDMADE_INFO, "method": method, "budget": budget, "baseline": "kvpress-full"})
    ratios = {(m["method"], m["budget"]): m["ratios_to_full"]["ttft_s"] for m in rep.load_results(tmp_path)}
    assert ratios == {("full", None): 1.0, ("snapkv", 512): pytest.approx(0.375),  # median(0.5 / 2, 2 / 4)
                      ("kvpress-full", None): 1.0, ("kvpress-snapkv", 512): pytest.approx(0.375)}  # median(3/6, 3/12)


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    handmade_folder(tmp_path)
    assert "plots:" in rep.report(tmp_path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy-hotpotqa.png", "ttft-hotpotqa.png"]


def test_cli_report_and_errors(tmp_path, capsys):
    handmade_folder(tmp_path)
    assert main(["bench", "report", str(tmp_path), "--no-plots"]) == 0
    assert "snapkv" in capsys.readouterr().out
    assert main(["bench", "report", str(tmp_path / "missing")]) == 2
    assert main(["bench", "--methods", "full"]) == 2  # no --task
    assert "needs --task" in capsys.readouterr().err


def test_dump_samples_matches_the_runner_inputs(tiny_tokenizer, tmp_path):
    from ctxopt.bench.datasets import load_task

    path = tmp_path / "samples.jsonl"
    assert dump_samples([TASK, "hotpotqa"], [LENGTH], 2, 0, tiny_tokenizer, path) == 4
    records = [json.loads(line) for line in path.read_text().splitlines()]
    samples = load_task(TASK, LENGTH, tiny_tokenizer, 2, 0)
    assert [r["id"] for r in records[:2]] == [s.id for s in samples]
    question, _, prefix, instruction = ask_inputs(samples[0])
    assert (records[0]["ask_question"], records[0]["answer_prefix"], records[0]["ask_instruction"]) == \
           (question, prefix, instruction)
    assert records[0]["max_new_tokens"] == 128 and records[2]["max_new_tokens"] == 32
    assert len(records[2]["passages"]) == 10 and records[2]["passages"][0]["title"]


def test_the_gpu_decode_script_runs_every_step_at_smoke_shapes(tmp_path):
    """benchmarks/gpu_decode.sh, the one call a lent GPU gets for the decode loop (random Llama-3.1-8B shapes: no
    weights travel there), runs end to end at tiny shapes on the CPU: batch-1 decode and the batch sweep (context
    KV held once and copied) at both context sizes, each in the dynamic and the fixed decode step (which the GPU
    run replays as a CUDA graph), then RAPID against target-only."""
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_decode.sh"), "--smoke"], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
                                                           OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"random-llama-3.1-8b (smoke)"}
    lengths = sorted({r["prompt_tokens"] for r in rows})
    assert len(lengths) == 2
    for length in lengths:
        here = [r for r in rows if r["prompt_tokens"] == length]
        dynamic, fixed = [r for r in here if r["what"] == "batch1"]
        assert (dynamic["step"], fixed["step"]) == ("dynamic", "fixed")
        assert all(r["ms_per_token"] > 0 and r["new_tokens"] == 8 for r in (dynamic, fixed))
        assert fixed["same_tokens"] and len(fixed["token_ids"]) == 8  # float32: the same greedy tokens
        sweep = {(r["mode"], r["step"], r["batch"]): r for r in here if r["what"] == "sweep"}
        assert set(sweep) == {(m, s, b) for m, s in [("shared_prefix", "dynamic"), ("copied_prefix", "dynamic"),
                                                     ("copied_prefix", "fixed")] for b in (1, 16)}
        assert all(r["steps"] >= 6 and r["ms_per_step"] > 0 for r in sweep.values())  # 8 tokens, one warm-up
    speed = json.loads((tmp_path / "gpu_speed.json").read_text())["results"]
    assert {r["method"] for r in speed} >= {"full", "rapid", "rapid-self"} and not [r for r in speed if r.get("error")]


def test_gpu_speed_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_speed.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_speed.json").read_text())
    rows = result["results"]
    # every method but the script's NOT_BY_DEFAULT, REFRAG once more with its chunk embeddings cached, and RAPID
    # twice more drafting for itself (the second time with context-free target weights)
    assert {r["method"] for r in rows} == set(METHODS) - {"color", "extractive"} | {
        "refrag-cached", "rapid-self", "rapid-self-agree"}
    assert not [r for r in rows if r.get("error") or r.get("skipped")]
    full = next(r for r in rows if r["method"] == "full")
    assert full["ttft_s"] > 0 and full["ttft_ratio"] == 1.0
    refrag, cached = (next(r for r in rows if r["method"] == name) for name in ("refrag", "refrag-cached"))
    assert refrag["cached_chunks"] == 0 and cached["cached_chunks"] > 0
    assert cached["tokens_kept"] == refrag["tokens_kept"] < full["tokens_kept"]  # decoder positions
    rapid, self_rapid, agree = (next(r for r in rows if r["method"] == name)
                                for name in ("rapid", "rapid-self", "rapid-self-agree"))
    assert rapid["new_tokens"] == self_rapid["new_tokens"] == agree["new_tokens"] == 4 * full["new_tokens"]
    assert self_rapid["acceptance_rate"] is not None
    assert agree["acceptance_rate"] == 1.0  # drafter and target agree once the next token ignores the context
    # where TTFT goes: the prompt and every stage before decoding, each timed; TTFT adds the first decode step
    assert set(refrag["stage_seconds"]) == {"prompt", "refrag", "decode"}
    before_decode = sum(s for name, s in full["stage_seconds"].items() if name != "decode")
    assert 0 < before_decode <= full["ttft_s"] < before_decode + full["stage_seconds"]["decode"]
    assert any(line.startswith("context  method") and "TTFT s" in line for line in done.stdout.splitlines())
    costs = result["forward_costs"]["512"]  # RAPID's verification forwards next to a decode step
    assert set(costs) == {"sdpa", "ctxopt_sdpa"} and all(set(c) == {"1", "2", "5", "11"} for c in costs.values())
    assert all(seconds > 0 for c in costs.values() for seconds in c.values())


def test_chunked_prefill_profile_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chunked_prefill_profile.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    chunks = next(line for line in done.stdout.splitlines() if line.startswith("chunks of 256"))
    assert chunks.count(",") == 2048 // 256 - 1  # one time per chunk
    assert "aten::" in (tmp_path / "last_chunk_profile.txt").read_text()


def test_forward_costs_leave_the_cache_as_they_found_it(tiny_lm):
    """Each timed forward is cropped off again, so the cache decodes exactly as before the timings."""
    import torch

    from ctxopt.bench.costs import forward_costs, forward_costs_table
    from ctxopt.cache import cache_length, crop_cache
    from ctxopt.decoding import forward, prefill

    state = prefill(tiny_lm.model, torch.arange(3, 40))

    def next_logits():
        with torch.inference_mode():
            out = forward(tiny_lm.model, torch.tensor([7]), positions=torch.tensor([37]), cache=state.cache)
        crop_cache(state.cache, 37)
        return out.logits[0, -1]

    before = next_logits()
    costs = forward_costs(tiny_lm, state, sizes=(1, 4), repeats=2)
    assert cache_length(state.cache) == 37
    assert torch.equal(next_logits(), before)
    assert set(costs) == {"sdpa", "ctxopt_sdpa"} and all(set(c) == {1, 4} for c in costs.values())
    assert "| sdpa |" in forward_costs_table(costs, 37, repeats=2)
