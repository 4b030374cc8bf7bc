"""`ScriptedJudge`: a judge that answers from a function of the messages (tests, offline dry runs)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from serve.judge import Completion, JudgeClient, JudgeUnavailable, Messages


class ScriptedJudge(JudgeClient):
    """Answers from `fn(messages, choice, json_schema) -> str | (str, logprob) | Exception` (tests)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        model: str = "scripted",
        delay_s: float = 0.0,
        scorer: Callable[[Messages, str | None], float] | None = None,
    ):
        self.fn = fn
        self.scorer = scorer  # (messages, prefill) -> log p(prompt), for classify_mode "channel"
        self.model = model
        self.delay_s = delay_s
        self.calls = 0
        self.healthy = True

    async def complete(
        self,
        messages,
        *,
        max_tokens,
        temperature=0.0,
        choice=None,
        json_schema=None,
        logprobs=False,
        prefill=None,
        stop=None,
    ):
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out = self.fn(messages, choice, json_schema)
        if isinstance(out, BaseException):
            raise out
        if isinstance(out, tuple):  # (text, log-probability of that text)
            text, lp = out
            return Completion(text=str(text), logprob=lp if logprobs else None)
        return Completion(text=str(out), logprob=-0.1 if logprobs else None)

    async def prompt_logprob(self, messages, prefill=None):
        if self.scorer is None:
            return await super().prompt_logprob(messages, prefill)
        self.calls += 1
        return float(self.scorer(messages, prefill))

    async def health(self) -> None:
        if not self.healthy:
            raise JudgeUnavailable("scripted judge marked unhealthy")
