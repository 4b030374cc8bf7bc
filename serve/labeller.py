"""The labelling logic: evidence -> explanation -> category (+ detection score), cached.

Independent of HTTP and of the judge's implementation (any `JudgeClient`), so the FastAPI
ingress, the tests and a notebook all use the same code.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from pydantic import ValidationError

from diffing.evidence import LatentEvidence, LatentLabel
from diffing.logs import get_logger
from serve import prompts
from serve.cache import LabelCache, cache_key, calibration_texts, fingerprint, judge_view  # noqa: F401
from serve.channel import ChannelScoring, gather_all
from serve.judge import JudgeClient, JudgeError
from serve.prompts import _NO_SYSTEM_ROLE, TaxonomyTooLong, fold_system, prompt_too_long, shrink  # noqa: F401
from serve.settings import MethodSettings
from serve.taxonomy import Taxonomy

log = get_logger("crossdiff.serve")


class _NoFit(Exception):
    """Internal: the explanation prompt overflows the judge's context window even with one example."""


class _Shared:
    """A label being made, and how many requests wait for it."""

    def __init__(self, task: asyncio.Future):
        self.task, self.waiters = task, 0


class Labeller(ChannelScoring):
    def __init__(
        self,
        judge: JudgeClient,
        taxonomy: Taxonomy,
        method: MethodSettings,
        *,
        temperature: float = 0.0,
        cache: LabelCache | None = None,
        system_role: str = "auto",
        judge_setup: dict | None = None,
    ):
        """``judge_setup``: what beside its name decides the judge's answers (JudgeSettings.setup),
        part of every cache key."""
        if system_role not in ("auto", "message", "fold"):
            raise ValueError(f"system_role must be 'auto', 'message' or 'fold', got {system_role!r}")
        self.system_role = system_role
        self.judge_setup = judge_setup
        self._fold = system_role == "fold"
        self.judge = judge
        self.taxonomy = taxonomy
        self.method = method
        self.temperature = temperature
        self.cache = cache or LabelCache(10_000)
        self.sem = asyncio.Semaphore(method.max_concurrent_calls)
        # per calibration set (None: the neutral text): log p(request_c + text) averaged over its texts
        self._channel_priors: OrderedDict[str | None, dict[str, float]] = OrderedDict()
        self._channel_pending: dict[str | None, asyncio.Task] = {}
        self._inflight: dict[str, _Shared] = {}  # cache key -> the label being made
        self.schema = prompts.classification_schema(taxonomy)
        # output budgets that hold the longest category name (a byte-level tokenizer spends at most
        # a token per UTF-8 byte: a 25-character Chinese name is ~47 tokens, over the old 24)
        longest = max(len(n.encode()) for n in taxonomy.names)
        self._choice_tokens = max(24, longest + 8)
        self._json_tokens = max(method.classify_max_tokens, 2 * longest + 32)
        self.model_cls = prompts.classification_model(taxonomy)

    async def _send(self, fn, messages, *args, **kw):
        """fn(messages, ...) with the system message folded where the judge has no system role."""
        if self._fold:
            return await fn(fold_system(messages), *args, **kw)
        try:
            return await fn(messages, *args, **kw)
        except JudgeError as e:
            has_system = bool(messages) and messages[0]["role"] == "system"
            if self.system_role != "auto" or not has_system or not _NO_SYSTEM_ROLE.search(str(e)):
                raise
            if not self._fold:
                self._fold = True
                log.warning("judge.system_role_folded", judge=self.judge.model, reason=str(e)[:200])
            return await fn(fold_system(messages), *args, **kw)

    async def _call(self, messages, **kw):
        async with self.sem:
            return await self._send(self.judge.complete, messages, temperature=self.temperature, **kw)

    async def explain(self, ev: LatentEvidence, examples, context: str | None) -> str:
        msgs = prompts.explain_messages(ev, examples, self.method, context)
        for _ in range(self.method.max_retries + 1):
            out = await self._call(
                msgs, max_tokens=self.method.explain_max_tokens, prefill=prompts.EXPLAIN_PREFILL, stop=[". "]
            )
            text = prompts.clean_explanation(out.text)
            if text:
                return prompts.clean_explanation(f"{prompts.EXPLAIN_PREFILL} {text}")
        return "(the judge gave no explanation)"

    async def classify(
        self, ev: LatentEvidence, examples, explanation: str, calibration: tuple[str, ...] = ()
    ) -> tuple[str, str | None, float]:
        """(category, secondary, confidence); always a taxonomy member (choice fallback)."""
        names = self.taxonomy.names
        if self.method.classify_mode == "channel":
            return await self.classify_channel(ev, calibration)
        if self.method.classify_mode == "json":
            msgs = prompts.classify_messages(ev, examples, explanation, self.taxonomy, self.method, "json")
            for attempt in range(self.method.max_retries + 1):
                out = await self._call(msgs, max_tokens=self._json_tokens, json_schema=self.schema)
                try:
                    c = self.model_cls.model_validate_json(out.text)
                except (ValidationError, ValueError):
                    log.info("judge.invalid_json", attempt=attempt, text=out.text[:200])
                    continue
                secondary = c.secondary if c.secondary != c.category else None
                return c.category, secondary, c.confidence / len(prompts.CONFIDENCE_LEVELS)
        msgs = prompts.classify_messages(ev, examples, explanation, self.taxonomy, self.method, "choice")
        for _ in range(self.method.max_retries + 1):
            out = await self._call(
                msgs,
                max_tokens=self._choice_tokens,
                choice=[f" {n}" for n in names],
                logprobs=True,
                prefill=prompts.CLASSIFY_PREFILL,
            )
            text = out.text.strip()
            if text in names:
                conf = out.prob if out.prob is not None else 1.0 / len(names)
                return text, None, float(min(1.0, max(0.0, conf)))
        raise JudgeError(f"the judge answered no taxonomy member after {self.method.max_retries + 1} tries")

    async def detect(self, explanation: str, positives, negatives) -> float | None:
        """Balanced accuracy of the judge's yes/no over the held-out examples; an example whose prompt
        does not fit the judge's context window is left out (None when one side is left empty)."""

        async def says_yes(ex) -> bool | None:
            try:
                out = await self._call(
                    prompts.detect_messages(explanation, ex, self.method),
                    max_tokens=4,
                    choice=prompts.DETECT_CHOICES,
                )
            except JudgeError as e:
                if not prompt_too_long(e):
                    raise
                return None
            return out.text.strip() == "yes"

        preds = await gather_all(*(says_yes(x) for x in (*positives, *negatives)))
        pos = [p for p in preds[: len(positives)] if p is not None]
        neg = [p for p in preds[len(positives) :] if p is not None]
        if len(pos) + len(neg) < len(preds):
            log.warning("judge.detection_example_too_long", dropped=len(preds) - len(pos) - len(neg))
        return prompts.balanced_accuracy(pos, neg)

    def key(
        self, ev: LatentEvidence, context: str | None, detection: bool, calibration: tuple[str, ...] = ()
    ) -> str:
        channel = self.method.classify_mode == "channel"
        return cache_key(
            ev,
            context,
            judge_model=self.judge.model,
            taxonomy=self.taxonomy,
            method=self.method,
            detection=detection,
            calibration=fingerprint(calibration) if channel and calibration else None,
            folded_system=self._fold,
            judge_setup=self.judge_setup,
        )

    async def label(
        self,
        ev: LatentEvidence,
        context: str | None = None,
        detection: bool = False,
        calibration: tuple[str, ...] = (),
    ) -> tuple[LatentLabel, bool]:
        """(label, came_from_cache). `calibration`: channel texts of ordinary latents
        (`calibration_texts`); channel classification measures each category against them."""
        folded = self._fold
        key = self.key(ev, context, detection, calibration)
        hit = await self.cache.aget(key)
        if hit is not None:
            return hit.model_copy(update={"latent": ev.latent}), True
        # the same label already being made for another request (a client retrying after a timeout,
        # two clients of one run): wait for it instead of asking the judge twice. The work stops when
        # its last waiter is cancelled (its request failed or went away), as if it were not shared.
        shared = self._inflight.get(key)
        joined = shared is not None
        if shared is None:
            task = asyncio.ensure_future(self._make(ev, context, detection, calibration, key, folded))
            shared = self._inflight[key] = _Shared(task)
            task.add_done_callback(lambda t, k=key, sh=shared: self._made(k, sh))
        shared.waiters += 1
        try:
            lab = await asyncio.shield(shared.task)
        except asyncio.CancelledError:
            if shared.waiters == 1 and not shared.task.done():
                shared.task.cancel()
            raise
        finally:
            shared.waiters -= 1
        return (lab.model_copy(update={"latent": ev.latent}), True) if joined else (lab, False)

    def _made(self, key: str, shared: _Shared) -> None:
        if self._inflight.get(key) is shared:
            del self._inflight[key]
        if not shared.task.cancelled():
            shared.task.exception()  # retrieved: its waiters saw it, or all were cancelled

    async def _make(
        self,
        ev: LatentEvidence,
        context: str | None,
        detection: bool,
        calibration: tuple[str, ...],
        key: str,
        folded: bool,
    ) -> LatentLabel:
        if not [*ev.top, *ev.quantiles]:
            return self._plain_label(ev, "(no activating examples)", key)
        if self.method.classify_mode == "channel" and not prompts.channel_text(ev, self.method).strip():
            # nothing to score: the category would be the calibration prior's alone
            return self._plain_label(ev, "(the activating examples hold no visible text)", key)
        try:
            explanation, category, secondary, conf, score = await self._judge(
                ev, context, detection, calibration
            )
        except _NoFit as e:
            log.warning("judge.prompt_too_long", latent=ev.latent, error=str(e.__cause__)[:200])
            note = "(the evidence does not fit the judge's context window even with one example)"
            return self._plain_label(ev, note, key)
        if self._fold != folded:  # `auto` met a judge without a system role meanwhile: folded prompts
            key = self.key(ev, context, detection, calibration)
        lab = LatentLabel(
            latent=ev.latent,
            explanation=explanation,
            category=category,
            secondary=secondary,
            confidence=conf,
            detection_score=score,
            judge_model=self.judge.model,
            prompt_version=prompts.PROMPT_VERSION,
            cache_key=key,
        )
        await self.cache.aput(key, lab)
        return lab

    async def _judge(
        self, ev: LatentEvidence, context: str | None, detection: bool, calibration: tuple[str, ...]
    ) -> tuple[str, str, str | None, float, float | None]:
        """(explanation, category, secondary, confidence, detection score) from the judge.

        A prompt longer than the judge's context window is retried with less: the explanation (and
        channel scoring) without the context, then with half the examples, down to one (then _NoFit:
        the latent alone gets the fallback label); the classification, keeping the explanation, with
        half the examples down to one (then TaxonomyTooLong: the category block is what does not fit,
        every latent would fail alike); detection leaves an example that does not fit out."""
        held: set[int] = set()
        pos, neg = [], []
        if detection:  # held out once, from the whole evidence: shrinking never moves them
            _, pos, neg = prompts.split_for_detection(ev, self.method.detection_examples)
            held = {id(x) for x in pos}

        def shown(e: LatentEvidence) -> list:
            return [x for x in (*e.top, *e.quantiles) if id(x) not in held]

        channel = self.method.classify_mode == "channel"
        m = self.method

        def less(e: LatentEvidence, view) -> LatentEvidence | None:
            """Smaller evidence whose prompt differs: halving may drop only held-out examples, or
            ones past what the prompt shows (explain_top, classify_examples), and the same prompt
            would fail the same way."""
            v, s = view(e), shrink(e)
            while s is not None and shown(s) and view(s) == v:
                s = shrink(s)
            return s

        def explain_view(e: LatentEvidence):
            return str(prompts.explain_messages(e, shown(e), m)), prompts.channel_text(
                e, m
            ) if channel else ""

        def classify_view(e: LatentEvidence):
            mode = "json" if m.classify_mode == "json" else "choice"
            return str(prompts.classify_messages(e, shown(e), explanation, self.taxonomy, m, mode))

        async def first(e: LatentEvidence, ctx: str | None):
            if channel:  # scoring does not read the explanation: overlap them
                return await gather_all(self.explain(e, shown(e), ctx), self.classify_channel(e, calibration))
            return await self.explain(e, shown(e), ctx), None

        cur, ctx = ev, context
        while True:
            try:
                explanation, scored = await first(cur, ctx)
                break
            except JudgeError as e:
                if not prompt_too_long(e):
                    raise
                smaller = cur if ctx else less(cur, explain_view)
                if smaller is None or not shown(smaller):
                    raise _NoFit() from e
                self._log_shrunk(ev, ctx, smaller, "explain")
                cur, ctx = smaller, None
        while scored is None:
            try:
                scored = await self.classify(cur, shown(cur), explanation)
            except JudgeError as e:
                if not prompt_too_long(e):
                    raise
                smaller = less(cur, classify_view)
                if smaller is None or not shown(smaller):
                    log.error(
                        "judge.taxonomy_too_long", categories=len(self.taxonomy.names), error=str(e)[:200]
                    )
                    raise TaxonomyTooLong(self.taxonomy) from e
                self._log_shrunk(ev, None, smaller, "classify")
                cur = smaller
        category, secondary, conf = scored
        score = await self.detect(explanation, pos, neg) if pos and neg else None
        return explanation, category, secondary, conf, score

    @staticmethod
    def _log_shrunk(ev: LatentEvidence, ctx: str | None, smaller: LatentEvidence, step: str) -> None:
        log.info(
            "judge.prompt_shrunk",
            latent=ev.latent,
            step=step,
            context=bool(ctx),
            top=len(smaller.top),
            quantiles=len(smaller.quantiles),
        )

    def _plain_label(self, ev: LatentEvidence, explanation: str, key: str) -> LatentLabel:
        """The fallback category at confidence 0, for a latent the judge cannot read (not cached)."""
        return LatentLabel(
            latent=ev.latent,
            explanation=explanation,
            category=self._fallback(),
            confidence=0.0,
            judge_model=self.judge.model,
            prompt_version=prompts.PROMPT_VERSION,
            cache_key=key,
        )

    def _fallback(self) -> str:
        return "uninterpretable" if "uninterpretable" in self.taxonomy.names else self.taxonomy.names[-1]

    async def label_many(
        self, items, detection: bool = False, calibration=()
    ) -> tuple[list[LatentLabel], int]:
        """Label concurrently (the engine batches the calls); (labels in order, cache hits).
        `calibration`: evidence of ordinary latents of the same run (only channel scoring reads it)."""
        texts = calibration_texts(calibration, self.method) if self.method.classify_mode == "channel" else ()
        items = list(items)
        keys = [self.key(ev, getattr(ev, "context", None), detection, texts) for ev in items]
        first: dict[str, int] = {}  # identical evidence in one request is labelled once
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = sorted(first.values())
        tasks = [
            asyncio.ensure_future(self.label(items[i], getattr(items[i], "context", None), detection, texts))
            for i in unique
        ]
        try:
            results = dict(zip(unique, await asyncio.gather(*tasks), strict=True))
        except BaseException:
            for t in tasks:  # one failure fails the request: stop the rest instead of leaking them
                t.cancel()
            raise
        out, hits = [], 0
        for i, ev in enumerate(items):
            j = first[keys[i]]
            lab, hit = results[j]
            if j != i:  # a repeat of item j: its label under this latent id, counted as a cache hit
                lab, hit = lab.model_copy(update={"latent": ev.latent}), True
            out.append(lab)
            hits += hit
        return out, hits
