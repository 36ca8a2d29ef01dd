"""A bounded load run of ``ctxopt serve`` over localhost: requests/s, latency percentiles and errors at several
client concurrencies, for each method, on distinct ~4K-token contexts; and the gateway's own overhead (p50
through the gateway with ``--method full`` minus the engine asked directly, concurrency 1).

Each (method, concurrency) level sends at most ``--requests`` requests and starts none after ``--duration``
seconds; every request sent must come back with an HTTP answer: answered (200), rejected (429/503) or an
explicit error (a 504 past the gateway's --request-timeout, say); a request with no answer at all is "lost", and
the run says whether any was.
Each context hides a distinct code ("The access code for ledger 17 is 4817.") at a random depth, and the answer is
checked for it. The context is a user message before the question (a system message would be the system prompt,
not context). Every target and method gets the same contexts at the same concurrency (so their answers are
compared on the same samples), and distinct ones across levels.

    # against a running engine (the gateway runs in this process, on a free port)
    python benchmarks/gateway_load.py --engine http://127.0.0.1:8000/v1 --methods full,specpc:1024 --direct
    # start vLLM too (from the engine venv of scripts/engine.sh)
    python benchmarks/gateway_load.py --start-engine --methods full,specpc:1024 --direct
    # against a gateway already running elsewhere
    python benchmarks/gateway_load.py --gateway http://127.0.0.1:8080 --methods full
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "granite", "harbor", "iris", "juniper", "kestrel",
         "lagoon", "meadow", "nectar", "obsidian", "prairie", "quartz", "river", "sierra", "tundra", "umber",
         "valley", "willow", "yarrow", "zephyr")
REJECTED = (429, 503)


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (a transport error or a client timeout)
    seconds: float
    correct: bool = False
    prompt_tokens: int | None = None
    tokens_saved: int | None = None
    error: str = ""
    item: int = -1  # which of the level's contexts it asked about


@dataclass
class Level:
    target: str
    method: str
    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0

    def row(self) -> dict:
        sent = len(self.outcomes)
        answered = [o for o in self.outcomes if o.status == 200]
        rejected = sum(o.status in REJECTED for o in self.outcomes)
        lost = sum(o.status is None for o in self.outcomes)  # no HTTP answer at all: the one real failure
        errors = sent - len(answered) - rejected - lost  # an HTTP error status (400, 502, 504...)
        latencies = sorted(o.seconds for o in answered)
        saved = [o.tokens_saved for o in answered if o.tokens_saved is not None]
        return {
            "target": self.target, "method": self.method, "concurrency": self.concurrency, "sent": sent,
            "answered": len(answered), "rejected": rejected, "errors": errors, "lost": lost,
            "accounted": lost == 0,
            "requests_per_s": len(answered) / self.wall if self.wall else 0.0,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99),
            "correct": sum(o.correct for o in answered),
            "mean_tokens_saved": statistics.mean(saved) if saved else None,
            "answered_items": sorted(o.item for o in answered),
            "correct_items": sorted(o.item for o in answered if o.correct),
            "error_samples": sorted({o.error for o in self.outcomes if o.error})[:3],
        }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile in milliseconds (nearest rank), None without values."""
    if not values:
        return None
    rank = max(0, min(len(values) - 1, round(q / 100 * len(values) + 0.5) - 1))
    return 1000 * values[rank]


def make_contexts(count: int, tokens: int, seed: int) -> list[tuple[str, str, str]]:
    """``count`` distinct (context, question, code) of about ``tokens`` tokens (~1.3 tokens per word): sentences
    of 13 random words, each capitalised and ending in a full stop (so a sentence splitter finds them), with the
    code's sentence among them at a random depth."""
    rng = random.Random(seed)
    sentences = max(2, int(tokens / 1.3) // 13)
    items = []
    for _ in range(count):
        body = [" ".join(rng.choice(WORDS) for _ in range(13)).capitalize() + "." for _ in range(sentences)]
        code = str(rng.randrange(1000, 10000))
        ledger = rng.randrange(10, 100)
        body.insert(rng.randrange(sentences // 10, sentences - sentences // 10),
                    f"The access code for ledger {ledger} is {code}.")
        items.append((" ".join(body), f"What is the access code for ledger {ledger}?", code))
    return items


def context_messages(context: str, question: str) -> list[dict]:
    """The chat: the context as a user message, then the question."""
    return [{"role": "user", "content": context}, {"role": "user", "content": question}]


def one_request(http: httpx.Client, url: str, body: dict, code: str, timeout: float) -> Outcome:
    began = time.perf_counter()
    try:
        response = http.post(url, json=body, timeout=timeout)
    except httpx.HTTPError as error:
        return Outcome(None, time.perf_counter() - began, error=f"{type(error).__name__}: {error}"[:200])
    seconds = time.perf_counter() - began
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        return Outcome(response.status_code, seconds, error=f"HTTP {response.status_code}: {message}"[:200])
    data = response.json()
    text = data["choices"][0]["message"]["content"] or ""
    extra = data.get("ctxopt") or {}
    return Outcome(200, seconds, correct=code in text, prompt_tokens=data.get("usage", {}).get("prompt_tokens"),
                   tokens_saved=extra.get("tokens_saved"))


def run_level(target: str, url: str, model: str, method: str, concurrency: int, items, args,
              gateway: bool) -> Level:
    """Up to ``args.requests`` requests from ``concurrency`` client threads, none started after the duration."""
    level = Level(target, method, concurrency)
    name, _, budget = method.partition(":")
    next_item = iter(range(args.requests))
    lock = threading.Lock()
    began = time.perf_counter()
    deadline = began + args.duration

    def client() -> None:
        with httpx.Client(trust_env=False) as http:
            while True:
                with lock:
                    index = next(next_item, None)
                if index is None or time.perf_counter() > deadline:
                    return
                context, question, code = items[index]
                body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0,
                        "messages": context_messages(context, question)}
                if gateway:
                    overrides = {"method": name}
                    if budget:
                        overrides["budget"] = float(budget) if "." in budget else int(budget)
                    body["ctxopt"] = overrides
                outcome = one_request(http, url, body, code, args.timeout)
                outcome.item = index
                with lock:
                    level.outcomes.append(outcome)

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    level.wall = time.perf_counter() - began
    return level


def measure_overhead(engine_url: str, engine_model: str, gateway_url: str, model: str, args) -> dict:
    """p50 through the gateway (method full) minus the engine asked directly for the SAME prompt (the chat prompt
    ctxopt builds, as text to /v1/completions), one answer token, alternating, after two warm-up rounds that put
    the prompt in the engine's prefix cache: the engine does the same work both ways, so the difference is the
    gateway's own cost (its tokenization, less the engine's, plus one more HTTP hop)."""
    from ctxopt.models import load_model
    from ctxopt.pipeline import Pipeline
    from ctxopt.types import Passage

    context, question, _ = make_contexts(1, args.context_tokens, args.seed + 999)[0]
    lm = load_model(args.model)
    text = Pipeline(lm).build_prompt(question, [Passage(text=context, source="messages[0]")]).text
    bodies = {
        "direct": (f"{engine_url}/completions", {"model": engine_model, "prompt": text, "max_tokens": 1,
                                                 "temperature": 0}),
        "gateway": (f"{gateway_url}/v1/chat/completions", {
            "model": model, "max_tokens": 1, "temperature": 0, "ctxopt": {"method": "full"},
            "messages": context_messages(context, question)}),
    }
    seconds: dict[str, list[float]] = {"direct": [], "gateway": []}
    inside: dict[str, list[float]] = {"ctxopt_side": [], "prompt_stage": [], "engine_via_gateway": []}
    tokens: dict[str, int] = {}
    with httpx.Client(trust_env=False, timeout=args.timeout) as http:
        for round_ in range(args.overhead + 2):
            for name, (url, body) in bodies.items():
                began = time.perf_counter()
                response = http.post(url, json=body)
                elapsed = time.perf_counter() - began
                response.raise_for_status()
                tokens[name] = response.json()["usage"]["prompt_tokens"]
                if round_ >= 2:
                    seconds[name].append(elapsed)
                    if name == "gateway":  # where the gateway's time went, from its own ctxopt field
                        extra = response.json()["ctxopt"]
                        stages = {s["stage"]: s["seconds"] for s in extra["stages"]}
                        inside["engine_via_gateway"].append(stages.get("decode:engine", 0.0))
                        inside["ctxopt_side"].append(extra["seconds"] - stages.get("decode:engine", 0.0))
                        inside["prompt_stage"].append(stages.get("prompt", 0.0))
    direct, through = statistics.median(seconds["direct"]), statistics.median(seconds["gateway"])
    return {"prompt_tokens_direct": tokens["direct"], "prompt_tokens_gateway": tokens["gateway"],
            "requests_each": args.overhead, "direct_p50_ms": 1000 * direct, "gateway_p50_ms": 1000 * through,
            "overhead_p50_ms": 1000 * (through - direct),
            **{f"{name}_p50_ms": 1000 * statistics.median(values) for name, values in inside.items()}}


def against_direct(row: dict, rows: list[dict]) -> str:
    """A gateway level against the engine's direct level at the same concurrency: requests/s ratio, and codes
    found on the samples both answered."""
    direct = next((r for r in rows if r["target"] == "engine" and r["concurrency"] == row["concurrency"]), None)
    if direct is None or not direct["requests_per_s"]:
        return f"{row['method']} c={row['concurrency']}: no direct level to compare with"
    shared = set(row["answered_items"]) & set(direct["answered_items"])
    ours = len(shared & set(row["correct_items"]))
    theirs = len(shared & set(direct["correct_items"]))
    return (f"{row['method']} c={row['concurrency']} vs engine direct: requests/s x"
            f"{row['requests_per_s'] / direct['requests_per_s']:.2f}; on the {len(shared)} samples both answered, "
            f"code found {ours} vs {theirs}")


def print_row(row: dict) -> None:
    def ms(value):
        return f"{value:8.1f}" if value is not None else "       -"

    print(f"{row['target']:8s} {row['method']:14s} c={row['concurrency']:<3d} sent {row['sent']:3d} answered "
          f"{row['answered']:3d} rejected {row['rejected']:3d} errors {row['errors']:2d} lost {row['lost']:2d} | "
          f"{row['requests_per_s']:6.2f} req/s | p50 {ms(row['p50_ms'])} p95 {ms(row['p95_ms'])} "
          f"p99 {ms(row['p99_ms'])} ms | correct {row['correct']}/{row['answered']} | every request answered or "
          f"refused: {'yes' if row['accounted'] else 'NO'}", flush=True)
    for sample in row["error_samples"]:
        print(f"    {sample}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine", help="engine base URL (http://127.0.0.1:8000/v1); a gateway starts here")
    where.add_argument("--start-engine", action="store_true", help="start vLLM (scripts/engine.sh's venv) here")
    where.add_argument("--gateway", help="a running gateway's URL (http://127.0.0.1:8080); no engine baseline")
    parser.add_argument("--engine-model", default=None, help="the engine's served model name")
    parser.add_argument("--model", default="smollm2-135m", help="the model ctxopt loads (the engine's model)")
    parser.add_argument("--methods", default="full", help="comma-separated METHOD[:BUDGET], e.g. full,specpc:1024")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=32, help="requests per level at most (default 32)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per level to start requests in")
    parser.add_argument("--context-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    parser.add_argument("--max-queue", type=int, default=64, help="the in-process gateway's --max-queue")
    parser.add_argument("--warmup", type=int, default=2, help="requests per target before measuring")
    parser.add_argument("--direct", action="store_true", help="also run every level against the engine directly "
                        "(its chat endpoint, same messages): the baseline")
    parser.add_argument("--direct-concurrency", default=None, help="the levels of --direct (default: --concurrency)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="the in-process gateway's --request-timeout (answered 504 past it)")
    parser.add_argument("--overhead", type=int, default=0, metavar="N",
                        help="first measure the gateway's overhead over N alternating requests (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every row to this file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.duration <= 0:
        parser.error("--requests must be >= 1 and --duration > 0")
    levels = [int(c) for c in args.concurrency.split(",")]
    direct_levels = [int(c) for c in (args.direct_concurrency or args.concurrency).split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    engine_process = None
    server = None
    try:
        engine_url, engine_model = args.engine, args.engine_model
        if args.start_engine:
            sys.path.insert(0, str(REPO / "tests"))
            from engine_server import start_engine

            from ctxopt.models import registry_path

            engine_process = start_engine(registry_path(args.model, progress=False), max_model_len=8192)
            engine_url, engine_model = engine_process.base_url, engine_process.model
            print(f"engine: {engine_url} ({engine_model}), started in {engine_process.started_s:.0f} s")
        if args.gateway:
            gateway_url = args.gateway.rstrip("/")
            model = httpx.get(f"{gateway_url}/v1/models", trust_env=False).json()["data"][0]["id"]
        else:
            from ctxopt.server import BackgroundServer, ServeConfig, create_app

            config = ServeConfig(model=args.model, engine=engine_url, engine_model=engine_model,
                                 concurrency=max(levels), max_queue=args.max_queue, max_new_tokens=args.max_tokens,
                                 pipeline_cache=max(4, len(methods)),
                                 request_timeout=args.request_timeout or 600.0)
            server = BackgroundServer(create_app(config)).start()
            gateway_url = server.base_url
            deadline = time.monotonic() + 300
            while httpx.get(f"{gateway_url}/health", trust_env=False).status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the gateway was not ready: {httpx.get(f'{gateway_url}/health').text}")
                time.sleep(0.5)
            model = httpx.get(f"{gateway_url}/v1/models", trust_env=False).json()["data"][0]["id"]
            engine_model = engine_model or httpx.get(f"{engine_url}/models", trust_env=False).json()["data"][0]["id"]
        print(f"gateway: {gateway_url} (model {model}); levels {levels}; methods {methods}; at most {args.requests} "
              f"requests and {args.duration:g} s per level; ~{args.context_tokens}-token contexts; max_tokens "
              f"{args.max_tokens}")

        # Within a target, every request gets a context of its own (a repeated one would be read from the
        # engine's prefix cache): each level has its own contexts (seeded by its concurrency, warm-ups by 0), the
        # same for every target and method, so their answers are compared on the same samples.
        def fresh(count: int, level: int) -> list[tuple[str, str, str]]:
            return make_contexts(count, args.context_tokens, args.seed * 10**6 + 1000 * level + count)

        if args.overhead and engine_url:
            overhead = measure_overhead(engine_url, engine_model, gateway_url, model, args)
            print("gateway overhead, same prompt both ways, concurrency 1: " + json.dumps(
                {k: round(v, 1) if isinstance(v, float) else v for k, v in overhead.items()}), flush=True)
        targets = [("gateway", f"{gateway_url}/v1/chat/completions", model, True)]
        if args.direct and engine_url:
            targets.insert(0, ("engine", f"{engine_url}/chat/completions", engine_model, False))
        rows = []
        for target, url, name, is_gateway in targets:
            for method in (methods if is_gateway else ["direct"]):
                if args.warmup:
                    run_level(target, url, name, method, 1, fresh(args.warmup, 0),
                              argparse.Namespace(**{**vars(args), "requests": args.warmup}), is_gateway)
                for concurrency in (levels if is_gateway else direct_levels):
                    row = run_level(target, url, name, method, concurrency, fresh(args.requests, concurrency), args,
                                    is_gateway).row()
                    rows.append(row)
                    print_row(row)
        for row in rows:
            if row["target"] == "gateway":
                print(against_direct(row, rows))
        direct = next((r for r in rows if r["target"] == "engine" and r["concurrency"] == 1), None)
        full = next((r for r in rows if r["target"] == "gateway" and r["method"] == "full"
                     and r["concurrency"] == 1), None)
        if direct and full and direct["p50_ms"] is not None and full["p50_ms"] is not None:
            print(f"p50 at concurrency 1, distinct contexts, gateway full - engine chat: "
                  f"{full['p50_ms'] - direct['p50_ms']:.1f} ms ({full['p50_ms']:.1f} - {direct['p50_ms']:.1f}; "
                  "the prompts differ: ctxopt's template vs the engine's chat template)")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0 if all(r["accounted"] for r in rows) else 1
    finally:
        if server is not None:
            server.stop()
        if engine_process is not None:
            engine_process.stop()


if __name__ == "__main__":
    sys.exit(main())
