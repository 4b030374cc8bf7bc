"""Judge clients: one async interface, three implementations.

Two kinds of call: `complete` (a chat completion, optionally with structured output) and
`prompt_logprob` (log p(prompt) from vLLM's `prompt_logprobs`, for channel classification).

- `ServeLLMJudge`: a Ray Serve LLM (`ray.serve.llm`) deployment, called through its DeploymentHandle.
- `OpenAIJudge` (serve/openai_judge.py): a vLLM OpenAI-compatible server over HTTP.
- `ScriptedJudge` (serve/scripted.py): a function of the messages, for unit tests (no model).

Structured output goes through vLLM's `structured_outputs` (a `choice` list or a JSON schema),
never the removed `guided_*` fields. Every call has a deadline. Failures are typed:
`JudgeUnavailable` (cannot reach the judge: the API answers 503) and `JudgeError` (the judge
answered with an error: 502).
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]


def redact_url(url: str) -> str:
    """`url` without credentials: user:password@ and the query string (a signed URL's key) go."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(url)
        host = u.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        if u.port:
            host = f"{host}:{u.port}"
        return urlunsplit((u.scheme, host if u.netloc else "", u.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


class JudgeUnavailable(RuntimeError):
    """The judge cannot be reached or did not answer in time (transient: retry later)."""


class JudgeError(RuntimeError):
    """The judge answered, but with an error or unusable output."""


@dataclass(frozen=True)
class Completion:
    text: str
    logprob: float | None = None  # sum of the sampled tokens' log-probabilities, when asked

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(min(self.logprob, 0.0))  # a judge's >0: 1


def structured(choice: list[str] | None, json_schema: dict | None) -> dict[str, Any] | None:
    if choice is not None:
        return {"choice": list(choice)}
    if json_schema is not None:
        return {"json": json_schema, "disable_any_whitespace": True}
    return None


def _prefill_fields(messages: Messages, prefill: str | None) -> dict[str, Any]:
    if not prefill:
        return {"messages": messages}
    return {
        "messages": [*messages, {"role": "assistant", "content": prefill}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }


class JudgeClient(ABC):
    """What the labeller needs of a judge (serve/labeller.py). A new backend implements `complete`
    and `health` (and `prompt_logprob` for channel classification) and keeps these rules:

    - with `prefill`, the returned text is the continuation only, without the prefill;
    - with `choice`, the text is exactly one of the choices (structured output);
    - with `json_schema`, the text is JSON matching it (the labeller falls back to a choice);
    - transient trouble (unreachable, 429, 5xx, time-outs) raises `JudgeUnavailable` (the service
      answers 503 with Retry-After); anything else the judge refused raises `JudgeError`, whose
      message names the cause: a prompt over the context window must match
      `serve.prompts._TOO_LONG` (the labeller then retries with less evidence), and a chat template
      without a system role `_NO_SYSTEM_ROLE` (it then folds the system message into the user turn);
    - `model` is the served model's name: it is part of every cache key and label.

    Settings pick the backend by `judge.kind` (serve/settings.py, serve/app.py)."""

    model: str

    @abstractmethod
    async def complete(
        self,
        messages: Messages,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        choice: list[str] | None = None,
        json_schema: dict | None = None,
        logprobs: bool = False,
        prefill: str | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        """One chat completion. `prefill`: the start of the assistant's answer, continued by the
        judge (the returned text is the continuation only)."""

    async def prompt_logprob(self, messages: Messages, prefill: str | None = None) -> float:
        """Total log-probability the judge assigns to the prompt's tokens (after the first), i.e.
        log p(prompt); with `prefill`, the rendered prompt ends with that start of an answer."""
        raise JudgeError(f"{type(self).__name__} cannot score prompts (needs vLLM's prompt_logprobs)")

    @abstractmethod
    async def health(self) -> str | None:
        """Return if the judge answers (optionally a note for /healthz's `detail`); raise
        JudgeUnavailable otherwise."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


def _sum_logprobs(content: Any) -> float | None:
    if not content:
        return None
    try:
        vals = [c["logprob"] if isinstance(c, dict) else c.logprob for c in content]
        return float(sum(v for v in vals if v is not None and math.isfinite(v)))
    except (KeyError, TypeError, AttributeError, ValueError):
        raise JudgeError(
            f"the judge's token log-probabilities are unreadable: {str(content)[:200]}"
        ) from None


_LOGPROB_FLOOR = -100.0  # a prompt token the judge scores -inf or NaN counts this much


def _sum_prompt_logprobs(plps: Any, ids: Any) -> float:
    """Sum of vLLM's prompt_logprobs (one dict per prompt token, keyed by token id; the first is None)."""
    if not plps:
        raise JudgeError("the judge returned no prompt log-probabilities")
    try:
        return _prompt_total(plps, ids)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise JudgeError(f"the judge's prompt log-probabilities are unreadable: {str(plps)[:200]}") from None


def _prompt_total(plps: Any, ids: Any) -> float:
    total = 0.0
    for i, d in enumerate(plps):
        if not d:
            continue
        entry = None
        if ids is not None and i < len(ids):
            entry = d.get(ids[i], d.get(str(ids[i])))
        if entry is None:
            if len(d) != 1:
                raise JudgeError("cannot tell the prompt token among the returned log-probabilities")
            entry = next(iter(d.values()))
        lp = entry["logprob"] if isinstance(entry, dict) else entry.logprob
        lp = float(lp) if lp is not None else math.nan
        total += lp if math.isfinite(lp) else _LOGPROB_FLOOR  # -inf / NaN: as unlikely as we count
    return total


_RETRYABLE = {429, 500, 502, 503, 504}  # the engine is busy, restarting or dead: another try may do


def _error_response(resp: Any, fallback: str) -> RuntimeError:
    """The exception for a vLLM ErrorResponse (``message``/``code`` on it or under ``error``): an
    overloaded or failed engine is JudgeUnavailable (503, retried), a refused request JudgeError."""
    err = getattr(resp, "error", None) or resp
    msg = getattr(resp, "message", None) or getattr(err, "message", None) or fallback
    code = getattr(resp, "code", None) or getattr(err, "code", None)
    try:
        code = int(code) if code is not None else None
    except (TypeError, ValueError):
        code = None
    if code in _RETRYABLE:
        return JudgeUnavailable(f"judge unavailable ({code}): {msg}")
    return JudgeError(f"judge error: {msg}")


class ServeLLMJudge(JudgeClient):
    """A `ray.serve.llm` LLMServer deployment, through a DeploymentHandle."""

    def __init__(self, handle, model: str, timeout_s: float = 60.0):
        self.handle = handle.options(stream=True)
        self.model = model
        self.timeout_s = timeout_s

    async def _chat(self, req) -> Any:
        gen = self.handle.chat.remote(req)
        try:
            async for item in gen:
                return item
        finally:
            cancel = getattr(gen, "cancel", None)
            if cancel is not None:
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - best effort
                    pass
        raise JudgeError("the judge deployment returned nothing")

    async def _request(self, req) -> Any:
        """One chat request with the deadline; failures to reach the deployment -> JudgeUnavailable."""
        try:
            return await asyncio.wait_for(self._chat(req), self.timeout_s)
        except TimeoutError:
            raise JudgeUnavailable(f"the judge did not answer within {self.timeout_s:.0f} s") from None
        except JudgeError:
            raise
        except Exception as e:  # actor died, no replicas, backpressure, ...
            raise JudgeUnavailable(f"judge deployment unavailable: {type(e).__name__}: {e}") from None

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
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        req = ChatCompletionRequest(
            model=self.model,
            **_prefill_fields(messages, prefill),
            max_tokens=max_tokens,
            temperature=temperature,
            structured_outputs=structured(choice, json_schema),
            logprobs=logprobs,
            stop=stop or None,
        )
        resp = await self._request(req)
        choices = getattr(resp, "choices", None)
        if not choices:
            raise _error_response(resp, type(resp).__name__)
        c = choices[0]
        lp = _sum_logprobs(getattr(c.logprobs, "content", None)) if logprobs and c.logprobs else None
        return Completion(text=c.message.content or "", logprob=lp)

    async def prompt_logprob(self, messages, prefill=None):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        req = ChatCompletionRequest(
            model=self.model,
            **_prefill_fields(messages, prefill),
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            return_token_ids=True,
        )
        resp = await self._request(req)
        plps = getattr(resp, "prompt_logprobs", None)
        if plps is None:
            raise _error_response(resp, "no prompt log-probabilities in the answer")
        return _sum_prompt_logprobs(plps, getattr(resp, "prompt_token_ids", None))

    async def health(self) -> None:
        try:
            await asyncio.wait_for(self.handle.options(stream=False).check_health.remote(), self.timeout_s)
        except TimeoutError:
            raise JudgeUnavailable("judge health check timed out") from None
        except Exception as e:
            raise JudgeUnavailable(f"judge deployment unhealthy: {type(e).__name__}: {e}") from None


def __getattr__(name: str):  # implementations that import this module live in their own
    if name == "ScriptedJudge":  # the test double
        from serve.scripted import ScriptedJudge

        return ScriptedJudge
    if name in ("OpenAIJudge", "VLLM_FIELDS"):
        import serve.openai_judge

        return getattr(serve.openai_judge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
