"""ctxopt's own prefill and decode loop, with explicit positions.

A compressed cache can be shorter than the prompt it stands for (SpecKV keeps 512 of 8K positions), so
the position of the next token is carried explicitly instead of being inferred from the cache length,
which is what transformers' ``generate()`` does and why ctxopt does not use it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .attention.kernels import attention_override, grouped_sdpa_attention, one_query_attention, runs_grouped_sdpa
from .cache import SlotCache, clone_cache, layer_kv, new_cache, num_layers, set_layer_kv
from .checks import require_int
from .errors import InputError


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """``cache`` on transformers >= 5.2x, ``past_key_values`` before (5.17 on the GPU machine)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    positions: torch.Tensor,
    cache=None,
    inputs_embeds: torch.Tensor | None = None,
    logits_to_keep: int = 1,
    **kwargs,
):
    """One causal-LM forward over a batch-1 sequence at explicit ``positions``, extending ``cache``: a transformers
    cache, or a one-row :class:`SlotCache`, whose new entries go to the slots after its row (more slots are
    allocated, the row copied, only when they run out)."""
    if input_ids is not None and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if inputs_embeds is not None and inputs_embeds.dim() == 2:
        inputs_embeds = inputs_embeds.unsqueeze(0)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    device = model.device
    kwargs[_cache_kwarg(type(model))] = cache
    call = functools.partial(
        model,
        input_ids=None if input_ids is None else input_ids.to(device),
        inputs_embeds=inputs_embeds,
        position_ids=positions.to(device),
        use_cache=cache is not None,
        logits_to_keep=logits_to_keep,
    )
    if not isinstance(cache, SlotCache) or "attention_mask" in kwargs:  # (slot_forward passes its step's mask)
        return call(**kwargs)
    if cache.rows != 1:
        raise ValueError(f"forward extends one sequence; this SlotCache holds {cache.rows} rows (use slot_forward)")
    width = positions.shape[-1]
    if cache.lengths[0] + width > cache.capacity:
        cache.reserve(1, round_up(cache.lengths[0] + width))
    kwargs["attention_mask"] = model_mask(model, cache.step_mask([width], width))
    with torch.inference_mode(), step_attention(model, cache):  # the slots are inference tensors
        out = call(**kwargs)
    cache.advance([width])
    return out


@dataclass
class Prefill:
    """A prefilled KV cache ready to decode from.

    ``next_position`` is where the next fed token sits in the ORIGINAL prompt's numbering. ``logits`` predict
    the first answer token; when ``pending_ids`` is set instead (SpecKV drops the last prompt token and feeds
    it again), those ids are fed at ``next_position...`` first and their last logits start the decode.
    """

    cache: object
    next_position: int
    logits: torch.Tensor | None = None
    pending_ids: torch.Tensor | None = None
    seconds: float = 0.0

    def copy(self) -> "Prefill":
        """The same state over a deep copy of the cache, so that decoding from it leaves this one intact."""
        return dataclasses.replace(self, cache=clone_cache(self.cache))


def prefill(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    cache=None,
    chunk_size: int | None = None,
    room: int = 0,
) -> Prefill:
    """Run the prompt through the model into a (new or given) cache; return the cache and last logits.

    A new cache is a one-row :class:`SlotCache` with slots for the prompt and ``room`` more (for an answer decoded
    in place, as RAPID's verifier does; a transformers cache on a model with sliding-window layers).
    ``chunk_size`` bounds attention memory on long prompts by feeding the prompt in pieces.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None or source.shape[0] == 0:
        raise InputError("Nothing to prefill: the prompt has no tokens.")
    n = source.shape[0]
    start = 0 if cache is None else int(cache.get_seq_length())
    positions = torch.arange(start, start + n) if positions is None else positions
    if cache is None:
        # A new cache is one row of preallocated slots (cache stages then compact it in place), except on a model
        # with sliding-window layers, whose transformers cache keeps each layer's window.
        cache = new_cache(model) if windowed_layer_types(model) else SlotCache.for_model(model, round_up(n + room))
    step = chunk_size or n
    began = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, n, step):
            piece = slice(lo, min(n, lo + step))
            out = forward(
                model,
                None if input_ids is None else input_ids[piece],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[piece],
                positions=positions[piece],
                cache=cache,
            )
    return Prefill(
        cache=cache,
        next_position=int(positions[-1]) + 1,
        logits=out.logits[0, -1].float(),
        seconds=time.perf_counter() - began,
    )


@dataclass
class GenerationConfig:
    """Decoding knobs. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_strings: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self.max_new_tokens = require_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token_distribution(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering, for sampling."""
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs[before >= config.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs /= probs.sum(-1, keepdim=True)
    return probs


def choose_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    if config.greedy:
        return int(logits.argmax(-1))
    probs = next_token_distribution(logits, config)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def make_generator(config: GenerationConfig) -> torch.Generator | None:
    if config.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    return generator


@dataclass
class DecodeResult:
    token_ids: list[int]
    text: str
    seconds: float
    first_token_seconds: float
    forward_passes: int
    stopped_by: str
    extra: dict = field(default_factory=dict)
    kv_bytes: int | None = None  # the entries the request held in the decoder's cache at the end


class StopChecker:
    """Tracks decoded text, streams new text to a callback, and reports EOS / stop strings.

    ``text`` is always ``tokenizer.decode(ids, skip_special_tokens=True)`` (cut before a stop string), but it
    is built incrementally, so an answer costs time linear in its length: each token decodes only a short
    window of recent ids, ``ids[window:]``, and the text it adds is what that decode has beyond the decode of
    ``ids[window:read]``, the ids already read. Decoding from a few ids back, not from the new token alone,
    keeps what a token's text depends on its left neighbour for (SentencePiece's leading space, which a
    decode drops at the start of the ids it is given; byte-level tokens that only together make a UTF-8
    character). Text is settled, and the window moves up to the ids read, only when the new decode is longer
    and does not end in an incomplete character (U+FFFD). When a new id changes text already settled (a
    byte-fallback decoder turns a whole run of byte tokens into U+FFFD once one of them is invalid), the
    window decode no longer starts with the decode of its first ids: the last settled pieces are taken back,
    the window reaching back twice as far each time, until it does.
    """

    def __init__(
        self, tokenizer, eos_ids: Sequence[int], stop_strings: Sequence[str], on_text: Callable[[str], None] | None
    ):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.on_text = on_text
        self.ids: list[int] = []
        self.streamed = 0
        self.reason = "max_new_tokens"
        self._settled: list[str] = []  # text no later id has changed so far, one piece per settling
        self._reads: list[int] = []  # after each piece, how many ids made the text up to it
        self._settled_length = 0
        self._tail = ""  # the text after the settled pieces
        self._window = self._read = 0  # ids[window:] are decoded for each new id; ids[:read] make the settled text
        self._window_text = ""  # decode(ids[window:read])
        self._joined: str | None = ""
        self._hold = sum(len(stop) - 1 for stop in self.stop_strings)  # the most stop-string prefixes hold back

    @property
    def text(self) -> str:
        """The answer's text so far: the decode of ``ids``, cut before the first stop string found (joined from
        its pieces when read, so read it once at the end rather than after every token)."""
        if self._joined is None:
            self._joined = "".join(self._settled) + self._tail
        return self._joined

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _suffix(self, start: int) -> str:
        """``text[start:]``, reading only the settled pieces it needs."""
        if start >= self._settled_length:
            return self._tail[start - self._settled_length:]
        pieces, length = [self._tail], self._settled_length
        for piece in reversed(self._settled):
            pieces.append(piece)
            length -= len(piece)
            if length <= start:
                break
        return "".join(reversed(pieces))[start - length:]

    def _rewindow(self) -> None:
        """Point the window at the settling before the last one, or further back while the ids between it and
        the last settling decode to nothing on their own (a decoder that strips the leading space of what it
        is given turns a lone space into ""): the window decode can only show a change in text it holds."""
        reads = self._reads
        self._read = reads[-1] if reads else 0
        before = len(reads) - 2
        while True:
            self._window = reads[before] if before >= 0 else 0
            self._window_text = self._decode(self.ids[self._window:self._read])
            if self._window_text or before < 0:
                return
            before -= 1

    def _read_token(self) -> int:
        """Update the text for the newest id; return the index from which the text may have changed."""
        self._joined = None
        back = 1
        while True:
            decoded = self._decode(self.ids[self._window:])
            if decoded.startswith(self._window_text):
                break
            for _ in range(min(back, len(self._reads))):  # never reached with no settled piece: "" starts all
                self._settled_length -= len(self._settled.pop())
                self._reads.pop()
            back *= 2
            self._rewindow()
        self._tail = decoded[len(self._window_text):]
        changed_from = self._settled_length
        if self._tail and not decoded.endswith("\ufffd"):
            self._settled.append(self._tail)
            self._settled_length += len(self._tail)
            self._reads.append(len(self.ids))
            self._tail = ""
            self._rewindow()
        return changed_from

    def push(self, token: int) -> bool:
        """Record one token; True when decoding must stop."""
        if token in self.eos_ids:
            self.reason = "eos"
            return True
        self.ids.append(token)
        changed_from = self._read_token()
        for stop in self.stop_strings:
            # The text before ``changed_from`` was searched already: only a match reaching past it is new.
            start = max(0, changed_from - len(stop) + 1)
            found = self._suffix(start).find(stop)
            if found >= 0:
                self._cut(start + found)
                self.reason = "stop_string"
                self._stream(final=True)
                return True
        self._stream(final=False)
        return False

    def _cut(self, length: int) -> None:
        """Keep only ``text[:length]`` (the answer ends here: no more ids are read)."""
        head = self.text[:length]
        self._settled, self._reads, self._settled_length = [head], [len(self.ids)], length
        self._tail, self._joined = "", head

    def _stream(self, final: bool) -> None:
        if self.on_text is None:
            return
        length = self._settled_length + len(self._tail)
        safe = length
        if not final:
            # Hold back a possibly incomplete character: every U+FFFD at the end (a byte-fallback tokenizer
            # gives one per byte of it). Settled text never ends in one, so they are all in the tail.
            safe -= len(self._tail) - len(self._tail.rstrip("\ufffd"))
        base = max(0, min(self.streamed, safe - self._hold))
        recent = self._suffix(base)  # text[base:]: what is not streamed yet and all that may be held back
        if not final:
            # Hold back any prefix of a stop string.
            for stop in self.stop_strings:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if recent[:safe - base].endswith(stop[:k]):
                        safe -= k
                        break
        if safe > self.streamed:
            self.on_text(recent[self.streamed - base:safe - base])
            self.streamed = safe

    def finish(self) -> None:
        self._stream(final=True)


def windowed_layer_types(model) -> list[str]:
    """The attention layer types of ``model`` other than full attention (Gemma 3's sliding-window layers)."""
    config = getattr(model.config, "text_config", None) or model.config
    return sorted({t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"})


class DecodeRequest:
    """One request of a :class:`BatchDecoder`: a prefilled state, its settings and, once done, its ``result``."""

    def __init__(self, state: Prefill, config: GenerationConfig, tokenizer, eos_ids: Sequence[int],
                 on_text: Callable[[str], None] | None):
        if state.logits is None and (state.pending_ids is None or not len(state.pending_ids)):
            raise InputError("The prefill carries neither logits nor pending ids to start decoding from.")
        self.state, self.config, self.on_text = state, config, on_text
        self.stopper = StopChecker(tokenizer, eos_ids, config.stop_strings, on_text)
        self.generator = make_generator(config)
        self.position = state.next_position
        self.logits: torch.Tensor | None = state.logits  # predicts the next token; None while the row must be fed
        self.pending: list[int] = [] if state.pending_ids is None else state.pending_ids.tolist()
        self.began: float | None = None
        self.first_token_seconds: float | None = None
        self.forward_passes = 0
        self.batch_size = 0  # the most requests that decoded together with it, itself included
        self.hand_over = False  # BatchDecoder.hand_over
        self.release = False  # drop the state's cache once copied into the batch (SharedDecoder.decode's release)
        self.result: DecodeResult | None = None
        self.error: BaseException | None = None  # a failed step's error (SharedDecoder)

    @property
    def done(self) -> bool:
        return self.result is not None


class BatchDecoder:
    """Greedy or sampled decoding of several prefilled requests together: one forward per step feeds every active
    request its last token, each at its own explicit position, over its own cache entries (a row of a
    :class:`ctxopt.cache.SlotCache`: rows hold different numbers of entries, pruned or not). Requests join
    between steps (``submit``; a request that still has ids to feed, ``Prefill.pending_ids``, has them fed in
    one forward with the other requests joining in that step) and leave when done (end of sequence, a stop
    string, ``max_new_tokens``): continuous batching.

    With ``prefix`` (a :class:`ctxopt.attention.shared_prefix.SharedPrefix`) every request continues that one
    prefix, held once: a request's cache then holds only what follows the prefix (or nothing, its ids all
    pending), and attention is split into a batched part over the prefix and a per-request part over its own
    entries (Hydragen). That needs the model to run ``GROUPED_SDPA``.

    ``step`` is how a decode step (one token per row) runs: ``"dynamic"`` reads each step's slots up to the
    longest row, shapes growing step by step; ``"fixed"``, ``"graph"`` and ``"compile"`` run :class:`FixedStep`
    (fixed shapes; replayed as a CUDA graph; through ``torch.compile``). The default is ``$CTXOPT_DECODE_STEP`` or
    ``"dynamic"`` (:func:`decode_step_mode`). Forwards that feed several tokens a row (a joining request's
    pending ids) and shared-prefix steps always run dynamic.

    A request decoded in a batch gets the tokens it gets alone, up to the rounding of batched arithmetic.
    """

    def __init__(self, model, tokenizer, eos_ids: Sequence[int] = (), prefix=None, step: str | None = None):
        if prefix is not None and not runs_grouped_sdpa(model):
            raise InputError("Shared-prefix decoding needs a model that runs GROUPED_SDPA (as load_model's do).")
        windowed = windowed_layer_types(model)
        if windowed:
            raise InputError(
                f"ctxopt's decode loop attends every layer to all of a request's cache entries; this model has "
                f"{', '.join(windowed)} layers (a sliding window), which it does not support yet."
            )
        self.model, self.tokenizer, self.eos_ids, self.prefix = model, tokenizer, list(eos_ids), prefix
        mode = decode_step_mode(step)
        if mode == "graph" and step is None and model.device.type != "cuda":
            mode = "dynamic"  # $CTXOPT_DECODE_STEP=graph asks for graphs where they run (a CPU draft runs dynamic)
        self.fixed_step = FixedStep.for_model(model, mode) if mode != "dynamic" and prefix is None else None
        self.cache: SlotCache | None = None
        self.active: list[DecodeRequest] = []  # active[r] decodes in row r of the cache
        self.waiting: list[DecodeRequest] = []
        self.steps = 0

    def submit(
        self,
        state: Prefill,
        config: GenerationConfig,
        on_text: Callable[[str], None] | None = None,
        eos_ids: Sequence[int] | None = None,
    ) -> DecodeRequest:
        """Queue a request; it joins at the next step. Its cache is copied into the batch's slots when it joins
        (the state's own cache is left as it is)."""
        request = DecodeRequest(state, config, self.tokenizer, self.eos_ids if eos_ids is None else eos_ids, on_text)
        self.waiting.append(request)
        return request

    def hand_over(self, request: DecodeRequest) -> None:
        """Point the request's own cache (``request.state.cache``) at its row of slots from now on, releasing the
        tensors it held, and, when the request is done, leave it holding the entries the row holds then (the
        prompt and the fed tokens, as a fresh prefill of them would): the cache a decode extends in place. Views,
        not copies, while the row stays where it is (a batch of one); a copy when another row moves into it."""
        if request.state.cache is None:
            raise InputError("A request without a cache of its own has none to hand over.")
        request.hand_over = True
        if request in self.active:
            self._point(request.state.cache, self.cache.row_layers(self.active.index(request)))

    def cancel(self, request: DecodeRequest) -> None:
        """Drop a request that is not done (waiting or active) without a result; its row is freed."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.active:
            row = self.active.index(request)
            self.cache.remove_row(row)
            last = self.active.pop()
            if last is not request:
                self.active[row] = last
            if not self.active:
                self.cache = None

    def kv_bytes(self, request: DecodeRequest) -> int:
        """Bytes of the entries an active request holds in the batch's cache (the shared prefix not counted)."""
        return self.cache.row_bytes(self.active.index(request))

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    @property
    def rows(self) -> int:
        return len(self.active)

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.busy:
            self.step()

    def step(self) -> list[DecodeRequest]:
        """Admit the waiting requests, choose every active request's next token, and feed those not done in one
        forward. Returns the requests that finished in this step."""
        now = time.perf_counter()
        for request in self.active + self.waiting:
            if request.began is None:
                request.began = now
        with torch.inference_mode():
            self.admit()
            finished = self._choose()
            if self.active:
                self._feed()
        return finished

    def admit(self) -> None:
        """Give each waiting request a row (its cache copied in) and feed the pending ids of those that have
        some, in one forward over their rows (left-padded to the longest)."""
        if not self.waiting:
            return
        joining, self.waiting = self.waiting, []
        joining.sort(key=lambda r: bool(r.pending))  # the rows to feed come last, next to each other
        width = max(len(r.pending) for r in joining)  # the join forward's width (padding slots included)
        with torch.inference_mode():
            own = [self._own_layers(request.state) for request in joining]
            held = [layers[0][0].shape[2] if layers else 0 for layers in own]
            # Room for the entries held, then the most ids each will feed (or the join forward's padding).
            needed = [h + max(width, len(r.pending) + r.config.max_new_tokens - 1) for h, r in zip(held, joining)]
            rows, capacity = self.rows + len(joining), round_up(max(needed))
            if self.cache is None:
                self.cache = SlotCache.like(own[0], 0, 0)
            elif rows > self.cache.row_capacity or capacity > self.cache.capacity:
                # Joining a running batch that is too small: grow with room to spare, so that requests joining
                # one by one (concurrent callers) do not copy the whole batch each time.
                rows = max(rows, 2 * self.cache.row_capacity)
                capacity = max(capacity, round_up(self.cache.capacity * 5 // 4))
            self.cache.reserve(rows, capacity)
            for request, layers, room in zip(joining, own, needed):
                row = self.cache.add_row(layers, room)
                self.active.append(request)
                if request.hand_over:
                    self._point(request.state.cache, self.cache.row_layers(row))
                elif request.release:  # the caller handed its cache over: free the prefill's buffer now
                    request.state.cache = None
                else:  # the row holds a copy: the request keeps no reference to the state's cache
                    request.state = dataclasses.replace(request.state, cache=None)
            del own
            feeding = [r for r in joining if r.pending]
            if feeding:
                first = len(self.active) - len(feeding)
                tokens, positions = [], []
                for r in feeding:
                    padding = width - len(r.pending)
                    tokens.append([r.pending[0]] * padding + r.pending)
                    positions.append([r.position] * padding + list(range(r.position, r.position + len(r.pending))))
                logits = self._forward(tokens, positions, [len(r.pending) for r in feeding], first)
                for request, row_logits in zip(feeding, logits):
                    request.position += len(request.pending)
                    request.pending, request.logits = [], row_logits
        width = len(self.active)
        for request in self.active:
            request.batch_size = max(request.batch_size, width)

    def _own_layers(self, state: Prefill) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = state.cache
        if cache is None:
            if self.prefix is None:
                raise InputError("A request without a cache needs a shared prefix to continue.")
            return self.prefix.empty_layers()
        return [layer_kv(cache, layer) for layer in range(num_layers(cache))]

    def _choose(self) -> list[DecodeRequest]:
        """Each active request's next token from its logits; the requests that stop leave their rows."""
        if not self.active:
            return []
        greedy = [r for r in self.active if r.config.greedy]
        choices = torch.stack([r.logits for r in greedy]).argmax(-1).tolist() if greedy else []
        picked = dict(zip(map(id, greedy), choices))
        now = time.perf_counter()
        finished = []
        for request in self.active:
            token = picked.get(id(request))
            if token is None:
                token = choose_token(request.logits, request.config, request.generator)
            if request.first_token_seconds is None:
                request.first_token_seconds = now - request.began
            stopper = request.stopper
            request.logits, request.pending = None, [token]
            if stopper.push(token) or len(stopper.ids) >= request.config.max_new_tokens:
                finished.append(request)
        for request in finished:
            self._finish(request)
        if not self.active:
            self.cache = None  # an empty batch holds no memory; the next request allocates anew
        return finished

    @staticmethod
    def _point(cache, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (keys, values) in enumerate(layers):
            set_layer_kv(cache, layer, keys, values)

    def _finish(self, request: DecodeRequest) -> None:
        row = self.active.index(request)
        if request.hand_over:
            layers = self.cache.row_layers(row)
            if row != self.rows - 1:  # the last row moves into this one
                layers = [(k.clone(), v.clone()) for k, v in layers]
            self._point(request.state.cache, layers)
        request.stopper.finish()
        stopper = request.stopper
        request.result = DecodeResult(
            token_ids=stopper.ids,
            text=stopper.text,
            seconds=time.perf_counter() - request.began,
            first_token_seconds=request.first_token_seconds or 0.0,
            forward_passes=request.forward_passes,
            stopped_by=stopper.reason,
            extra={"batch_size": request.batch_size},
            kv_bytes=self.cache.row_bytes(row),
        )
        self.cache.remove_row(row)
        last = self.active.pop()
        if last is not request:
            self.active[row] = last

    def _feed(self) -> None:
        """One forward: every active request's last token at its position; their next logits."""
        if self.fixed_step is not None:
            logits = self.fixed_step(self.cache, [r.pending[0] for r in self.active], [r.position for r in self.active])
            self._counted(len(self.active), 0)
        else:
            tokens = [r.pending for r in self.active]
            positions = [[r.position] for r in self.active]
            logits = self._forward(tokens, positions, [1] * len(self.active), 0)
        for request, row_logits in zip(self.active, logits):
            request.position += 1
            request.pending, request.logits = [], row_logits

    def _forward(self, tokens: list[list[int]], positions: list[list[int]], counts: list[int], first: int):
        """Feed rows ``first ..`` their (left-padded) tokens; the logits after each row's last token."""
        logits = slot_forward(self.model, self.cache, tokens, positions, counts, first, self.prefix)
        self._counted(len(tokens), first)
        return logits[:, -1].float()

    def _counted(self, rows: int, first: int) -> None:
        self.steps += 1
        for request in self.active[first:first + rows]:
            request.forward_passes += 1


class SharedDecoder:
    """A :class:`BatchDecoder` that concurrent callers decode through together (continuous batching across
    threads): each caller queues its request, then steps the batch -- one thread at a time, under a lock --
    until its own request is done. Whichever thread steps admits the queued requests and advances every request
    in the batch, so concurrent calls share forwards instead of waiting for one another's whole answers. Each
    caller's ``on_text`` is called from its own thread. A step that fails fails every request in the batch
    (each of their callers raises the error); the next call starts a new batch. An idle shared decoder holds no
    batch and only a weak reference to the model (``ctxopt.generators.local`` keeps one per model)."""

    def __init__(self, model, tokenizer, eos_ids: Sequence[int] = ()):
        self._model = weakref.ref(model)
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self._decoder: BatchDecoder | None = None  # the running batch; None while idle
        self._step_lock = threading.Lock()  # held while a thread steps the batch
        self._queue_lock = threading.Lock()  # held while a request is queued or the queue is taken
        self._queued: list[DecodeRequest] = []
        self.forwards = 0  # forwards of the batch run so far (one per step that feeds)

    def decode(
        self,
        state: Prefill,
        config: GenerationConfig,
        on_text: Callable[[str], None] | None = None,
        eos_ids: Sequence[int] | None = None,
        release: bool = False,
    ) -> DecodeResult:
        """Decode ``state`` in the shared batch (joining at its next step). The state's cache is left as it is, or,
        with ``release``, dropped from the state (``state.cache = None``) once copied into the batch, so that the
        prefill's buffer is freed while the answer decodes instead of when the caller returns."""
        texts: queue.SimpleQueue | None = queue.SimpleQueue() if on_text is not None else None
        request = DecodeRequest(state, config, self.tokenizer, self.eos_ids if eos_ids is None else eos_ids,
                                None if texts is None else texts.put)
        request.release = release
        with self._queue_lock:
            self._queued.append(request)
        try:
            while True:
                with self._step_lock:
                    if request.result is None and request.error is None:
                        self._step()
                while texts is not None and not texts.empty():
                    on_text(texts.get())  # may raise: the caller gives up (a server's cancelled request)
                if request.error is not None:
                    raise request.error
                if request.result is not None:
                    return request.result
        except BaseException:
            with self._step_lock, self._queue_lock:  # leave the batch: no more steps spent on this request
                if request in self._queued:
                    self._queued.remove(request)
                if self._decoder is not None:
                    self._decoder.cancel(request)
                    if not self._decoder.busy:
                        self._decoder = None
            raise

    def _step(self) -> None:
        with self._queue_lock:
            queued, self._queued = self._queued, []
        if self._decoder is None:
            self._decoder = BatchDecoder(self._model(), self.tokenizer, self.eos_ids)
        decoder = self._decoder
        decoder.waiting += queued
        before = decoder.steps
        try:
            decoder.step()
        except BaseException as error:
            for request in decoder.active + decoder.waiting:
                request.error = error
            self._decoder = None
            raise
        finally:
            self.forwards += decoder.steps - before
        if not decoder.busy:
            self._decoder = None


def slot_forward(
    model,
    cache: SlotCache,
    tokens: list[list[int]],
    positions: list[list[int]],
    counts: list[int] | None = None,
    first: int = 0,
    prefix=None,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """The decode step: one forward of rows ``first .. first + len(tokens) - 1`` of ``cache``, each fed its tokens
    at their explicit positions (left-padded, the last ``counts[i]`` real; all real by default), each attending to
    its own entries (and the shared ``prefix``, if given) and causally to its new tokens. The cache then holds
    the real tokens after each row's entries. Returns the logits of each row's last ``logits_to_keep`` tokens."""
    width = len(tokens[0])
    counts = [width] * len(tokens) if counts is None else counts
    with torch.inference_mode():
        return _slot_forward(model, cache, tokens, positions, counts, first, prefix, logits_to_keep)


def _slot_forward(model, cache, tokens, positions, counts, first, prefix, logits_to_keep) -> torch.Tensor:
    mask = model_mask(model, cache.step_mask(counts, len(tokens[0]), first))
    with step_attention(model, cache, prefix):
        out = forward(model, torch.tensor(tokens), positions=torch.tensor(positions), cache=cache,
                      attention_mask=mask, logits_to_keep=logits_to_keep)
    cache.advance(counts, first)
    return out.logits


def model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A slot step's boolean mask as the model's attention reads a 4-D mask given to it: as is for the SDPA ones,
    additive floats for eager attention (0 where allowed, the dtype's minimum elsewhere, as transformers builds)."""
    config = getattr(model.config, "text_config", None) or model.config
    if config._attn_implementation != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def step_attention(model, cache: SlotCache, prefix=None):
    """The attention a prepared slot step runs (``cache.step_mask`` first): the shared prefix's split attention;
    on a GROUPED_SDPA model, SDPA without the mask where it allows everything or is plain causal; else the
    model's attention under the mask. A context variable, not FixedStep's ``step_attention=`` argument: under
    it GROUPED_SDPA still calls ``capture_attention``'s observer first (SpecPC's lookahead and the local prefill
    capture steps into a SlotCache), which the argument path skips so that a compiled step reads no context."""
    if prefix is not None:
        return attention_override(prefix.attention)
    if runs_grouped_sdpa(model) and cache.unmasked:
        return attention_override(unmasked_attention)
    if runs_grouped_sdpa(model) and cache.causal:
        return attention_override(causal_attention)
    return nullcontext()


def causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """GROUPED_SDPA for a slot step whose mask is plain causal (a prefill into empty rows): SDPA with
    ``is_causal`` and no mask, as a prefill into a transformers cache runs (a materialised mask would cost CPU SDPA
    its fused causal kernel)."""
    return grouped_sdpa_attention(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)


def unmasked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """GROUPED_SDPA for a slot step whose mask allows everything (a decode step of rows of one length, a batch of
    one above all): SDPA without the mask, grouping the query heads itself. A boolean mask costs CPU SDPA 1.6-2x
    on a decode step (SmolLM2 shapes, 2K slots); the old loop had no mask there either."""
    if dropout or any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "sinks", "s_aux")):
        return grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


DECODE_STEPS = ("dynamic", "fixed", "graph", "compile")


def decode_step_mode(step: str | None = None) -> str:
    """``step``, or ``$CTXOPT_DECODE_STEP``, or ``"dynamic"``: how a :class:`BatchDecoder` runs its decode steps."""
    step = step or os.environ.get("CTXOPT_DECODE_STEP") or "dynamic"
    if step not in DECODE_STEPS:
        raise InputError(f"Unknown decode step {step!r}; choose one of {', '.join(DECODE_STEPS)}.")
    return step


class FixedStep:
    """The decode step with the same shapes at every call, so that it can be captured once and replayed.

    One new token for each row of a :class:`ctxopt.cache.SlotCache` in use, reading all of the cache's slots under
    a mask that the step builds on the device from the rows' lengths (``SlotCache.fixed_step_mask``), the new
    entries written where the lengths point. No value of a tensor is read on the host inside it, and the inputs
    are copied into the same buffers each time, which is what CUDA graph capture needs: the launch-bound eager
    step (one kernel launch after another, 20-35 ms per token for 8B shapes on an H200) becomes one graph launch.
    Modes: ``"fixed"`` runs it eagerly (the reference, and for measuring what reading every slot costs);
    ``"graph"`` captures it as a CUDA graph per batch size (CUDA only; the graphs share one memory pool and serve
    one cache's buffers at a time: they are captured again when the step meets other buffers, a reallocated or
    another decoder's cache; ``captures`` counts them); ``"compile"`` runs it through ``torch.compile`` (new
    shapes recompile until torch marks them dynamic).
    The tokens are those of the dynamic step (tests compare them); the attention reads the capacity's free slots
    too, masked out, which costs little when the cache is sized for the answer, as the decoder sizes it.
    """

    def __init__(self, model, mode: str):
        if mode not in ("fixed", "graph", "compile"):
            raise InputError(f"A fixed step runs 'fixed', 'graph' or 'compile', not {mode!r}.")
        if mode == "graph" and model.device.type != "cuda":
            raise InputError(f"A CUDA graph needs a model on a CUDA device; this one is on {model.device}.")
        self._model, self.mode = weakref.ref(model), mode  # (held per model, weakly keyed: no strong reference)
        self._graphs: dict[int, tuple] = {}  # batch size -> (graph, its input buffers, its logits buffer)
        self._graph_lock = threading.Lock()  # decoders of the model on several threads share the graphs
        self._pool = None  # the graphs' shared memory pool (each replay's logits are copied out at once)
        self.captures = 0
        self._buffers: tuple | None = None  # the cache buffers (addresses, capacity) the graphs write into
        self._cache_kwarg = _cache_kwarg(type(model))
        self._compiled = torch.compile(self._run) if mode == "compile" else None

    @classmethod
    def for_model(cls, model, mode: str) -> "FixedStep":
        """The model's fixed step for ``mode``: one per model and mode, so that its graphs (or compiled code) serve
        every decoder of the model."""
        with _FIXED_STEPS_LOCK:
            steps = _FIXED_STEPS.setdefault(model, {})
            if mode not in steps:
                steps[mode] = cls(model, mode)
            return steps[mode]

    def __call__(self, cache: SlotCache, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed row r of ``cache`` the token ``tokens[r]`` at ``positions[r]``; the rows' next logits (float)."""
        rows = len(tokens)
        if rows != cache.rows or len(positions) != rows:
            raise ValueError(f"a fixed step feeds every row in use ({cache.rows}); got {rows} tokens")
        if max(cache.lengths) >= cache.capacity:
            raise ValueError(f"a row holds {max(cache.lengths)} of {cache.capacity} slots: no room for a step")
        device = cache.keys[0].device
        inputs = (torch.tensor(tokens, device=device).view(rows, 1),
                  torch.tensor(positions, device=device).view(rows, 1),
                  torch.tensor(cache.lengths, device=device))
        with torch.inference_mode():
            if self.mode == "graph":
                with self._graph_lock:
                    logits = self._replay(cache, *inputs)
            else:
                logits = (self._compiled or self._run)(cache, *inputs)
        cache.advance([1] * rows)
        return logits.float()

    def _run(self, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor):
        model = self._model()
        mask = model_mask(model, cache.fixed_step_mask(lengths))
        # GROUPED_SDPA runs one_query_attention, passed down as an argument: a context variable (attention_override)
        # would break a compiled graph.
        grouped = {"step_attention": one_query_attention} if runs_grouped_sdpa(model) else {}
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                    **{self._cache_kwarg: cache}, **grouped)
        return out.logits[:, -1]

    def _replay(self, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor):
        buffers = (cache.capacity, *(t.data_ptr() for t in cache.keys + cache.values))
        if buffers != self._buffers:  # another cache, or this one reallocated: the graphs write into old buffers
            self._graphs.clear()
            self._buffers = buffers
        rows = ids.shape[0]
        if rows in self._graphs:
            graph, inputs, logits = self._graphs[rows]
            for buffer, value in zip(inputs, (ids, positions, lengths)):
                buffer.copy_(value)
            graph.replay()
            return logits.clone()
        # Warm up on a side stream (as capture requires), then capture. Both warm-up runs are this step itself:
        # running it again writes the same entries to the same slots, so the cache is right whatever runs.
        inputs = (ids, positions, lengths)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                result = self._run(cache, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        # thread_local: other threads may run CUDA work meanwhile (a concurrent request's prefill)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._run(cache, *inputs)
        self._graphs[rows] = (graph, inputs, logits)
        self.captures += 1
        return result.clone()


_FIXED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {mode: FixedStep}
_FIXED_STEPS_LOCK = threading.Lock()


def round_up(n: int, multiple: int = 32) -> int:
    return -(-n // multiple) * multiple


def decode(
    model,
    tokenizer,
    state: Prefill,
    config: GenerationConfig,
    eos_ids: Sequence[int] = (),
    on_text: Callable[[str], None] | None = None,
) -> DecodeResult:
    """Greedy or sampled decoding from a prefilled cache, one token per forward, at explicit positions: a
    :class:`BatchDecoder` of one request. The state's cache ends holding the prompt and the tokens fed (each
    answer token but the last), in the decoder's slots (``BatchDecoder.hand_over``)."""
    decoder = BatchDecoder(model, tokenizer, eos_ids)
    request = decoder.submit(state, config, on_text)
    decoder.hand_over(request)
    decoder.run()
    return request.result
