"""Noisy-channel classification (for small judges) and the labeller's concurrency helper.

`ChannelScoring` is a mixin of `serve.labeller.Labeller`: it reads the labeller's judge, taxonomy,
method, semaphore and `_send`, and keeps the per-calibration-set priors on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import numpy as np

from diffing.evidence import LatentEvidence
from diffing.logs import get_logger
from serve import prompts
from serve.cache import fingerprint
from serve.judge import JudgeError
from serve.prompts import prompt_too_long

log = get_logger("crossdiff.serve")


async def gather_all(*aws: Awaitable) -> list:
    """asyncio.gather, except that one failure cancels the calls still running (they would hold
    judge slots for an answer nobody reads) before the exception propagates."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


class ChannelScoring:
    async def _channel_prior(self, calibration: tuple[str, ...] = ()) -> dict[str, float]:
        """Each category's baseline: log p(request for c + text) for the fixed neutral English text, or
        averaged over the calibration texts (ordinary latents of the same run) when there are some.
        Measured once per calibration set per labeller (the 16 most recently used sets are kept);
        concurrent requests share one measurement, which survives their cancellation."""
        key = fingerprint(calibration) if calibration else None
        if key in self._channel_priors:
            self._channel_priors.move_to_end(key)
            return self._channel_priors[key]
        task = self._channel_pending.get(key)
        if task is None:  # no await between the check and the insert: one measurement per set
            task = asyncio.ensure_future(self._measure_prior(calibration or (prompts.CHANNEL_BASELINE,)))
            self._channel_pending[key] = task

            def done(t: asyncio.Task, key=key) -> None:
                self._channel_pending.pop(key, None)
                if t.cancelled() or t.exception() is not None:
                    return  # not kept: the next request measures again
                self._channel_priors[key] = t.result()
                while len(self._channel_priors) > 16:
                    self._channel_priors.popitem(last=False)
                if key is not None:
                    log.info("labelling.channel_calibrated", texts=len(calibration), calibration=key)

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _measure_prior(self, texts: tuple[str, ...]) -> dict[str, float]:
        """Mean over texts of each category's score; a text longer than the judge's context window is
        left out (all of them: the neutral text instead)."""
        cats = self.taxonomy.categories

        async def per_text(t: str) -> list[float] | None:
            vals = await asyncio.gather(
                *(self._score(prompts.channel_messages(c.description), t) for c in cats),
                return_exceptions=True,
            )
            errs = [v for v in vals if isinstance(v, BaseException)]
            if any(not prompt_too_long(e) for e in errs):
                raise next(e for e in errs if not prompt_too_long(e))
            return None if errs else list(vals)

        # one failure: stop the rest instead of leaving them holding judge slots
        rows = [r for r in await gather_all(*(per_text(t) for t in texts)) if r is not None]
        if len(rows) < len(texts):
            log.warning("labelling.calibration_too_long", dropped=len(texts) - len(rows), texts=len(texts))
        if not rows:
            if texts == (prompts.CHANNEL_BASELINE,):
                raise JudgeError("the neutral channel baseline does not fit the judge's context window")
            return await self._measure_prior((prompts.CHANNEL_BASELINE,))
        per = np.asarray(rows, dtype=float).mean(axis=0)
        return dict(zip(self.taxonomy.names, per.tolist(), strict=True))

    async def _score(self, messages, prefill: str | None) -> float:
        async with self.sem:
            return await self._send(self.judge.prompt_logprob, messages, prefill)

    async def classify_channel(
        self, ev: LatentEvidence, calibration: tuple[str, ...] = ()
    ) -> tuple[str, str | None, float]:
        """argmax_c log p(examples | c's request) - log p(baseline text | c's request), the baseline
        being the calibration texts (mean) or the neutral text; confidence: the softmax of those scores."""
        text = prompts.channel_text(ev, self.method)
        prior = await self._channel_prior(calibration)
        full = await gather_all(
            *(self._score(prompts.channel_messages(c.description), text) for c in self.taxonomy.categories)
        )
        names = self.taxonomy.names
        ll = np.array([f - prior[n] for f, n in zip(full, names, strict=True)])
        ll = np.nan_to_num(ll, nan=-1e9, posinf=1e9, neginf=-1e9)  # a judge's -inf never yields NaN
        p = np.exp(ll - ll.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        return names[order[0]], names[order[1]] if len(names) > 1 else None, float(p[order[0]])
